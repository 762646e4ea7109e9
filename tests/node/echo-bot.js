#!/usr/bin/env node
// A real Bot Framework SDK (botbuilder 4.x) echo bot, used by botgate's Rust
// integration tests as the "bot" behind the gateway.
//
// - CloudAdapter + ConfigurationBotFrameworkAuthentication with EMPTY
//   MicrosoftAppId/MicrosoftAppPassword: local, unauthenticated mode. Inbound
//   requests are not checked for a token and outbound replies carry no
//   Authorization header.
// - Served by Node's built-in http module; a tiny shim gives CloudAdapter the
//   express/restify-like req.body / res.status / res.send / res.header it wants.
// - Listens on 127.0.0.1:$PORT (default 0 = ephemeral) and prints exactly one
//   stdout line once listening:  echo-bot listening port=<PORT>
// - POST /api/messages: on a `message` activity replies `Echo: <text>`, followed, when the
//   message carries files, by ` [<name> <bytes> <sha256>, ...]` of each file fetched from its
//   contentUrl; all other activity types are ignored (no welcome message).
// - Exits cleanly (code 0) on SIGTERM / SIGINT.
'use strict';

const crypto = require('crypto');
const http = require('http');
const {
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
    ActivityTypes,
} = require('botbuilder');

const auth = new ConfigurationBotFrameworkAuthentication({
    MicrosoftAppId: '',
    MicrosoftAppPassword: '',
    MicrosoftAppType: '',
    MicrosoftAppTenantId: '',
});
const adapter = new CloudAdapter(auth);

adapter.onTurnError = async (context, error) => {
    console.error(`echo-bot: turn error: ${error && error.stack ? error.stack : error}`);
};

// What the bot saw of each file it was sent: it fetches the attachment's contentUrl, as a bot
// does, and names the file, its size and its SHA-256.
async function describeFiles(attachments) {
    const files = (attachments || []).filter((a) => typeof a.contentUrl === 'string');
    const seen = [];
    for (const a of files) {
        const res = await fetch(a.contentUrl);
        if (!res.ok) {
            seen.push(`${a.name} fetch-failed-${res.status}`);
            continue;
        }
        const bytes = Buffer.from(await res.arrayBuffer());
        const sha = crypto.createHash('sha256').update(bytes).digest('hex');
        seen.push(`${a.name} ${bytes.length} ${sha}`);
    }
    return seen.length ? ` [${seen.join(', ')}]` : '';
}

async function botLogic(context) {
    const activity = context.activity;
    if (activity.type === ActivityTypes.Message) {
        const files = await describeFiles(activity.attachments);
        await context.sendActivity(`Echo: ${activity.text == null ? '' : activity.text}${files}`);
    }
    // Other activity types (conversationUpdate, typing, event, ...) are ignored.
}

// Minimal express/restify-like response shim over http.ServerResponse.
function shimResponse(res) {
    return {
        socket: res.socket,
        status(code) {
            res.statusCode = code;
            return this;
        },
        header(name, value) {
            res.setHeader(name, value);
            return this;
        },
        send(body) {
            if (body === undefined || body === null) {
                return this;
            }
            if (typeof body === 'object' && !Buffer.isBuffer(body)) {
                if (!res.hasHeader('content-type')) {
                    res.setHeader('content-type', 'application/json; charset=utf-8');
                }
                res.write(JSON.stringify(body));
            } else {
                res.write(typeof body === 'string' ? body : Buffer.from(body));
            }
            return this;
        },
        end(...args) {
            if (!res.writableEnded) {
                res.end(...args);
            }
            return this;
        },
    };
}

function readBody(req) {
    return new Promise((resolve, reject) => {
        const chunks = [];
        req.on('data', (c) => chunks.push(c));
        req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
        req.on('error', reject);
    });
}

function sendPlain(res, code, text) {
    res.statusCode = code;
    res.setHeader('content-type', 'text/plain; charset=utf-8');
    res.end(text);
}

const server = http.createServer(async (req, res) => {
    try {
        const path = (req.url || '').split('?')[0];
        if (path !== '/api/messages') {
            return sendPlain(res, 404, 'not found');
        }
        if (req.method !== 'POST') {
            return sendPlain(res, 405, 'method not allowed');
        }
        const raw = await readBody(req);
        let body;
        try {
            body = JSON.parse(raw);
        } catch (e) {
            return sendPlain(res, 400, 'invalid JSON body');
        }
        const shimReq = { body, headers: req.headers, method: req.method };
        await adapter.process(shimReq, shimResponse(res), botLogic);
        if (!res.writableEnded) {
            res.end();
        }
    } catch (err) {
        console.error(`echo-bot: request error: ${err && err.stack ? err.stack : err}`);
        if (!res.headersSent) {
            sendPlain(res, 500, String((err && err.message) || err));
        } else if (!res.writableEnded) {
            res.end();
        }
    }
});

const port = Number.parseInt(process.env.PORT || '0', 10) || 0;
server.listen(port, '127.0.0.1', () => {
    process.stdout.write(`echo-bot listening port=${server.address().port}\n`);
});
server.on('error', (err) => {
    console.error(`echo-bot: server error: ${err && err.stack ? err.stack : err}`);
    process.exit(1);
});

let stopping = false;
function shutdown(signal) {
    if (stopping) return;
    stopping = true;
    console.error(`echo-bot: ${signal} received, shutting down`);
    server.close(() => process.exit(0));
    if (typeof server.closeAllConnections === 'function') {
        server.closeAllConnections();
    }
    // Never hang on shutdown.
    setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
