#!/usr/bin/env node
// Drives a Direct Line 3.0 conversation through botgate with the OFFICIAL
// botframework-directlinejs client (the library Web Chat uses), in polling or
// websocket mode, and checks the echo-bot round trip.
//
// Usage:
//   node directline-client.js --domain http://127.0.0.1:1234/v3/directline
//        (--token <token> | --secret <secret>) [--mode polling|websocket]
//        [--messages N] [--timeout-ms MS] [--user ID] [--attach FILE:TYPE]... [--quiet]
//
// With --attach, every message carries those files as attachments: the client serves them on
// a local port, and DirectLineJS fetches them and uploads them (multipart) to the gateway. The
// echo bot fetches each attachment's contentUrl from the gateway and names its size and
// SHA-256 in its reply, which must match the file's.
//
// stdout: exactly one JSON line
//   success: {"ok":true,"mode":"...","sent":N,"echoed":N,"replies":N,"websockets":K}  (exit 0)
//   failure: {"ok":false,"error":"..."}                                            (exit 1)
// stderr: a trace of HTTP requests / WebSockets / activities (unless --quiet).
'use strict';

const USAGE = `usage: node directline-client.js --domain <url> (--token <t> | --secret <s>)
       [--mode polling|websocket] [--messages N] [--timeout-ms MS] [--user ID]
       [--attach FILE:TYPE]... [--quiet]
  --domain      Direct Line base URL, e.g. http://127.0.0.1:1234/v3/directline
  --token       Direct Line token (conversation-scoped or not)
  --secret      Direct Line secret (used as the bearer instead of a token)
  --mode        polling (default) or websocket
  --messages    number of messages to send, each awaited (default 3)
  --timeout-ms  overall deadline (default 20000)
  --user        from.id of the user's activities (default dl_user1)
  --attach      a file and its content type to attach to every message (repeatable)
  --quiet       no trace on stderr
stdout: one JSON line, {"ok":true,...} (exit 0) or {"ok":false,"error":...} (exit 1)`;

let finished = false;
let quiet = false;
let directLine = null;

function trace(...args) {
    if (!quiet) {
        process.stderr.write(`[dl-client +${Date.now() - T0}ms] ${args.join(' ')}\n`);
    }
}
const T0 = Date.now();

function finish(result) {
    if (finished) return;
    finished = true;
    try {
        if (directLine) directLine.end();
    } catch (e) {
        // end() may rethrow "conversation ended" through subscribers; ignore.
    }
    process.stdout.write(JSON.stringify(result) + '\n', () => {
        process.exit(result.ok ? 0 : 1);
    });
    // In case the write callback never fires.
    setTimeout(() => process.exit(result.ok ? 0 : 1), 500).unref();
}

function fail(msg) {
    trace('FAIL:', msg);
    finish({ ok: false, error: String(msg) });
}

process.on('uncaughtException', (err) => fail(`uncaught exception: ${err && err.stack ? err.stack : err}`));
process.on('unhandledRejection', (err) => fail(`unhandled rejection: ${err && err.stack ? err.stack : err}`));

// ---------------------------------------------------------------- arguments
function parseArgs(argv) {
    const opts = { mode: 'polling', messages: 3, timeoutMs: 20000, user: 'dl_user1', attach: [] };
    const valueFlags = {
        '--domain': 'domain',
        '--token': 'token',
        '--secret': 'secret',
        '--mode': 'mode',
        '--messages': 'messages',
        '--timeout-ms': 'timeoutMs',
        '--user': 'user',
    };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        if (arg === '--help' || arg === '-h') {
            opts.help = true;
        } else if (arg === '--quiet') {
            opts.quiet = true;
        } else if (arg === '--attach') {
            if (i + 1 >= argv.length) throw new Error('missing value for --attach');
            const v = argv[++i];
            const at = v.lastIndexOf(':');
            if (at <= 0) throw new Error(`--attach takes FILE:TYPE, got ${v}`);
            opts.attach.push({ path: v.slice(0, at), contentType: v.slice(at + 1) });
        } else if (Object.prototype.hasOwnProperty.call(valueFlags, arg)) {
            if (i + 1 >= argv.length) throw new Error(`missing value for ${arg}`);
            opts[valueFlags[arg]] = argv[++i];
        } else {
            throw new Error(`unknown argument: ${arg}`);
        }
    }
    if (opts.help) return opts;
    opts.messages = Number(opts.messages);
    opts.timeoutMs = Number(opts.timeoutMs);
    if (!opts.domain) throw new Error('--domain is required');
    if (!opts.token && !opts.secret) throw new Error('one of --token or --secret is required');
    if (opts.token && opts.secret) throw new Error('give only one of --token and --secret');
    if (opts.mode !== 'polling' && opts.mode !== 'websocket') throw new Error(`--mode must be polling or websocket, got ${opts.mode}`);
    if (!Number.isInteger(opts.messages) || opts.messages < 1) throw new Error('--messages must be a positive integer');
    if (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs <= 0) throw new Error('--timeout-ms must be a positive number');
    return opts;
}

let opts;
try {
    opts = parseArgs(process.argv.slice(2));
} catch (e) {
    process.stderr.write(`${USAGE}\n`);
    fail(e.message);
    return;
}
if (opts.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
}
quiet = !!opts.quiet;

// ------------------------------------------------ globals for Node (before DirectLine)
// The DirectLine constructor decides websocket vs polling from the GLOBAL WebSocket
// (`typeof WebSocket !== 'undefined'`); passing only options.WebSocket silently
// falls back to polling. rxjs' Observable.ajax uses the global XMLHttpRequest.
const NodeWebSocket = require('ws');
const XHR2 = require('xhr2');

let websocketsCreated = 0;
class CountingWebSocket extends NodeWebSocket {
    constructor(url, ...rest) {
        super(url, ...rest);
        websocketsCreated++;
        trace('WebSocket #' + websocketsCreated, String(url));
        this.addEventListener('open', () => trace('WebSocket open'));
        this.addEventListener('close', (ev) => trace('WebSocket close code=' + ev.code));
        this.addEventListener('error', (ev) => trace('WebSocket error', ev && ev.message ? ev.message : ''));
    }
}

const httpRequests = [];
class TracingXHR extends XHR2 {
    open(method, url, ...rest) {
        this._dlTrace = `${method} ${url}`;
        httpRequests.push(this._dlTrace);
        this.addEventListener('loadend', () => trace('HTTP', this._dlTrace, '->', this.status));
        return super.open(method, url, ...rest);
    }

    // A browser's XMLHttpRequest sends a FormData body as multipart/form-data; xhr2 sends only
    // strings and buffers. Node's own encoder (undici's Response) makes the same body a browser
    // would, boundary header included.
    send(data) {
        if (typeof FormData !== 'undefined' && data instanceof FormData) {
            const encoded = new Response(data);
            encoded.arrayBuffer().then((buf) => {
                this.setRequestHeader('Content-Type', encoded.headers.get('content-type'));
                super.send(Buffer.from(buf));
            }, (e) => fail(`encoding a form failed: ${e}`));
            return undefined;
        }
        return super.send(data);
    }
}

global.XMLHttpRequest = TracingXHR;
global.WebSocket = CountingWebSocket;

const { DirectLine, ConnectionStatus } = require('botframework-directlinejs');

// ------------------------------------------------------------------ files to attach
const fs = require('fs');
const path = require('path');
const files = opts.attach.map((f) => {
    const bytes = fs.readFileSync(f.path);
    const sha = require('crypto').createHash('sha256').update(bytes).digest('hex');
    return { name: path.basename(f.path), contentType: f.contentType, bytes, sha };
});
// What the echo bot must say it fetched: each file's name, size and SHA-256, in any order
// (DirectLineJS appends the files to its form as their fetches complete).
const filesSeen = files.map((f) => `${f.name} ${f.bytes.length} ${f.sha}`).sort().join(', ');
function isEchoOf(text, sent) {
    if (typeof text !== 'string') return false;
    if (!files.length) return text === `Echo: ${sent}`;
    const m = /^Echo: (.*) \[(.*)\]$/.exec(text);
    return !!m && m[1] === sent && m[2].split(', ').sort().join(', ') === filesSeen;
}
let filesBase = null;
function serveFiles() {
    if (!files.length) return Promise.resolve();
    const server = require('http').createServer((req, res) => {
        const i = Number((req.url || '').split('/')[2]);
        if (!files[i]) { res.writeHead(404); return res.end(); }
        res.writeHead(200, { 'content-type': files[i].contentType });
        res.end(files[i].bytes);
    });
    return new Promise((resolve) => server.listen(0, '127.0.0.1', () => {
        filesBase = `http://127.0.0.1:${server.address().port}`;
        server.unref();
        resolve();
    }));
}

// ------------------------------------------------------------------ scenario
const deadline = setTimeout(() => {
    fail(`timeout after ${opts.timeoutMs}ms: ${describeState()}`);
}, opts.timeoutMs);
deadline.unref();
// keep the process alive until finish() (the deadline timer is unref'd)
const keepAlive = setInterval(() => {}, 1 << 30);

const dlOptions = {
    domain: opts.domain,
    webSocket: opts.mode === 'websocket',
    pollingInterval: 200,
};
if (opts.token) dlOptions.token = opts.token;
else dlOptions.secret = opts.secret;

directLine = new DirectLine(dlOptions);
if (opts.mode === 'websocket' && directLine.webSocket !== true) {
    fail('DirectLine did not select websocket mode (global WebSocket missing?)');
    return;
}

const statuses = [];
let pending = null; // the message currently awaited
let sent = 0;
let echoed = 0;
let replies = 0;
let unexpected = 0;
const seenIds = new Set();

function describeState() {
    const st = statuses.map((s) => ConnectionStatus[s]).join('>');
    let p = 'none';
    if (pending) {
        p = `#${pending.i} id=${pending.id === undefined ? '-' : pending.id} echo=${pending.echo} reply=${pending.reply}`;
    }
    return `status=${st} sent=${sent} echoed=${echoed} replies=${replies} pending=${p} websockets=${websocketsCreated} http=${httpRequests.length}`;
}

directLine.connectionStatus$.subscribe(
    (status) => {
        statuses.push(status);
        trace('connectionStatus', ConnectionStatus[status]);
        if (finished) return;
        if (status === ConnectionStatus.FailedToConnect) {
            fail(`connection status FailedToConnect: ${describeState()}`);
        } else if (status === ConnectionStatus.Ended) {
            fail(`conversation ended unexpectedly: ${describeState()}`);
        } else if (status === ConnectionStatus.ExpiredToken) {
            fail(`connection status ExpiredToken: ${describeState()}`);
        }
    },
    (err) => fail(`connectionStatus$ error: ${err && err.message ? err.message : err}`),
);

directLine.activity$.subscribe(
    (activity) => {
        if (finished) return;
        trace('activity', JSON.stringify(activity));
        if (!activity || typeof activity !== 'object') {
            return fail(`activity$ emitted a non-object: ${JSON.stringify(activity)}`);
        }
        if (activity.id !== undefined) {
            if (seenIds.has(activity.id)) {
                return fail(`activity id ${activity.id} delivered twice`);
            }
            seenIds.add(activity.id);
        }
        const cd = activity.channelData || {};
        if (pending && cd.clientActivityID === pending.clientActivityID) {
            // the user's own activity, echoed back by Direct Line
            if (pending.echo) return fail(`user activity ${pending.clientActivityID} echoed twice`);
            if (activity.type !== 'message' || activity.text !== pending.text) {
                return fail(`echoed user activity does not match what was sent: ${JSON.stringify(activity)}`);
            }
            const uploaded = (activity.attachments || []).filter((a) => typeof a.contentUrl === 'string'
                && a.contentUrl.startsWith(new URL(opts.domain).origin + '/v3/directline/attachments/'));
            if (uploaded.length !== files.length) {
                return fail(`echoed user activity has ${uploaded.length} uploaded files, not ${files.length}: ${JSON.stringify(activity)}`);
            }
            if (pending.id !== undefined && activity.id !== pending.id) {
                return fail(`echoed user activity id ${activity.id} != postActivity id ${pending.id}`);
            }
            pending.echo = true;
            pending.echoId = activity.id;
            pending.echoFrom = activity.from && activity.from.id;
            echoed++;
            return progress();
        }
        if (pending && activity.type === 'message' && isEchoOf(activity.text, pending.text)) {
            const fromId = activity.from && activity.from.id;
            if (!fromId || fromId === opts.user || fromId === pending.echoFrom) {
                return fail(`bot reply has the user's from.id: ${JSON.stringify(activity)}`);
            }
            if (!pending.echo) {
                return fail(`bot reply for message #${pending.i} arrived before the user's own activity`);
            }
            if (pending.reply) return fail(`bot reply for message #${pending.i} arrived twice`);
            pending.reply = true;
            replies++;
            return progress();
        }
        unexpected++;
        trace('(ignored unexpected activity)');
    },
    (err) => {
        if (finished) return;
        fail(`activity$ error: ${err && err.message ? err.message : JSON.stringify(err)}`);
    },
    () => {
        if (finished) return;
        fail(`activity$ completed unexpectedly: ${describeState()}`);
    },
);

function progress() {
    if (!pending || !(pending.id !== undefined && pending.echo && pending.reply)) return;
    if (pending.i < opts.messages) {
        sendMessage(pending.i + 1);
    } else {
        pending = null;
        succeed();
    }
}

function succeed() {
    if (opts.mode === 'websocket') {
        if (websocketsCreated < 1) return fail('websocket mode but no WebSocket was constructed');
        if (!statuses.includes(ConnectionStatus.Online)) return fail('websocket mode but connectionStatus never reached Online');
        const polls = httpRequests.filter((r) => /^GET .*\/activities(\?|$)/.test(r));
        if (polls.length > 0) return fail(`websocket mode but the client polled: ${polls[0]}`);
    } else if (websocketsCreated !== 0) {
        return fail(`polling mode but ${websocketsCreated} WebSocket(s) were constructed`);
    }
    finish({
        ok: true,
        mode: opts.mode,
        sent,
        echoed,
        replies,
        websockets: websocketsCreated,
        files: files.length,
    });
}

function sendMessage(i) {
    const activity = {
        type: 'message',
        from: { id: opts.user },
        text: `hello ${i}`,
        channelData: { clientActivityID: `c${i}` },
    };
    if (files.length) {
        activity.attachments = files.map((f, n) => ({ contentType: f.contentType, contentUrl: `${filesBase}/f/${n}`, name: f.name }));
    }
    pending = { i, text: activity.text, clientActivityID: `c${i}`, id: undefined, echo: false, reply: false };
    const mine = pending;
    sent++;
    trace('postActivity', JSON.stringify(activity));
    directLine.postActivity(activity).subscribe(
        (id) => {
            if (finished) return;
            trace('postActivity ->', JSON.stringify(id));
            if (id === 'retry') return fail(`postActivity #${i} returned 'retry'`);
            if (typeof id !== 'string' || id.length === 0) return fail(`postActivity #${i} returned no id: ${JSON.stringify(id)}`);
            if (mine.echo && mine.echoId !== id) {
                return fail(`postActivity #${i} id ${id} != echoed activity id ${mine.echoId}`);
            }
            mine.id = id;
            progress();
        },
        (err) => {
            if (finished) return;
            const status = err && err.status !== undefined ? ` status=${err.status}` : '';
            fail(`postActivity #${i} failed:${status} ${err && err.message ? err.message : JSON.stringify(err)}`);
        },
    );
}

serveFiles().then(() => sendMessage(1));
void keepAlive;
