#!/usr/bin/env node
// Chats with a bot through botgate from the official Web Chat (npm `botframework-webchat`, its
// `dist/webchat.js` bundle), rendered in headless Chromium (Debian's /usr/bin/chromium) driven by
// playwright-core, the way a website embeds it: the page fetches a token from the bot's open
// token endpoint (a cross-origin request), renders Web Chat with it, and this script types into
// Web Chat's send box and waits for each reply in the transcript.
//
// Usage:
//   node webchat.js --gateway http://127.0.0.1:P --bot helpdesk --page-port N
//        --mode polling|websocket [--expect-greeting TEXT]
//        ((--say TEXT | --upload FILE) --expect TEXT)... [--timeout-ms MS]
//
// `--upload FILE` attaches the file through Web Chat's upload button (its file input, with
// playwright's setInputFiles, as a user picking a file), then sends it with the send box's
// Enter; Web Chat uploads it to the gateway (multipart, by DirectLineJS).
//
// stdout: exactly one JSON line
//   success: {"ok":true,"mode":"...","replies":N,"websockets":K,"polls":P,"origin":"..."} (exit 0)
//   failure: {"ok":false,"error":"...","title":"<the page's title: why it did not render>"} (exit 1)
// A page-side failure sets the page title: `token failed <status>` (e.g. 403 for an origin the
// bot does not allow), or `failed <error>`.
'use strict';

const fs = require('fs');
const http = require('http');
const path = require('path');
const { chromium } = require('playwright-core');

function parseArgs(argv) {
    const args = { steps: [], mode: 'polling', timeoutMs: 30000 };
    for (let i = 2; i < argv.length; i += 2) {
        const [k, v] = [argv[i], argv[i + 1]];
        if (v === undefined) throw new Error(`missing value for ${k}`);
        switch (k) {
            case '--gateway': args.gateway = v; break;
            case '--bot': args.bot = v; break;
            case '--page-port': args.pagePort = Number(v); break;
            case '--mode': args.mode = v; break;
            case '--expect-greeting': args.greeting = v; break;
            case '--say': args.steps.push({ say: v }); break;
            case '--upload': args.steps.push({ upload: v }); break;
            case '--expect':
                if (!args.steps.length || args.steps[args.steps.length - 1].expect !== undefined) {
                    throw new Error('each --expect follows one --say or --upload');
                }
                args.steps[args.steps.length - 1].expect = v;
                break;
            case '--timeout-ms': args.timeoutMs = Number(v); break;
            default: throw new Error(`unknown argument ${k}`);
        }
    }
    if (!args.gateway || !args.bot || !args.pagePort || args.steps.some((st) => st.expect === undefined)) {
        throw new Error('need --gateway, --bot, --page-port and an --expect after each --say or --upload');
    }
    if (args.mode !== 'polling' && args.mode !== 'websocket') throw new Error(`bad --mode ${args.mode}`);
    return args;
}

// The website: one page that fetches a token from the gateway and renders Web Chat with it.
function page(args) {
    const cfg = JSON.stringify({
        tokenUrl: `${args.gateway}/api/v1/bots/${args.bot}/directline/token`,
        domain: `${args.gateway}/v3/directline`,
        webSocket: args.mode === 'websocket',
    });
    return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>botgate Web Chat test</title></head>
<body style="margin:0"><div id="webchat" role="main" style="height:100vh"></div>
<script src="/webchat.js"></script>
<script>
  (async () => {
    const cfg = ${cfg};
    const res = await fetch(cfg.tokenUrl);
    if (!res.ok) { document.title = 'token failed ' + res.status; return; }
    const { token } = await res.json();
    window.WebChat.renderWebChat({
      directLine: window.WebChat.createDirectLine({ token, domain: cfg.domain, webSocket: cfg.webSocket }),
      userID: 'webchat_user',
    }, document.getElementById('webchat'));
  })().catch(e => { document.title = 'failed ' + e; });
</script></body></html>`;
}

function serve(args) {
    const bundle = path.join(__dirname, 'node_modules', 'botframework-webchat', 'dist', 'webchat.js');
    const server = http.createServer((req, res) => {
        if (req.url === '/webchat.js') {
            res.writeHead(200, { 'content-type': 'text/javascript' });
            fs.createReadStream(bundle).pipe(res);
        } else if (req.url === '/') {
            res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
            res.end(page(args));
        } else {
            res.writeHead(404);
            res.end();
        }
    });
    return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(args.pagePort, '127.0.0.1', () => resolve(server));
    });
}

async function main() {
    const args = parseArgs(process.argv);
    const server = await serve(args);
    const origin = `http://127.0.0.1:${args.pagePort}`;
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        headless: true,
        // This machine has no network beyond loopback: keep Chromium from reaching out.
        args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    let pageHandle;
    try {
        const context = await browser.newContext();
        pageHandle = await context.newPage();
        const p = pageHandle;
        let websockets = 0;
        let polls = 0;
        let uploadRequests = 0;
        p.on('websocket', ws => { if (ws.url().includes('/v3/directline/')) websockets += 1; });
        p.on('request', r => {
            if (r.method() === 'GET' && /\/v3\/directline\/conversations\/[^/]+\/activities/.test(r.url())) polls += 1;
            if (r.method() === 'POST' && /\/v3\/directline\/conversations\/[^/]+\/upload\?/.test(r.url())) uploadRequests += 1;
        });
        p.on('console', m => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
        p.on('pageerror', e => process.stderr.write(`[page error] ${e}\n`));
        p.on('requestfinished', async r => {
            const res = await r.response().catch(() => null);
            process.stderr.write(`[request] ${r.method()} ${r.url()} -> ${res ? res.status() : '?'}\n`);
        });
        p.on('requestfailed', r => process.stderr.write(`[request failed] ${r.method()} ${r.url()} ${r.failure() && r.failure().errorText}\n`));
        p.setDefaultTimeout(args.timeoutMs);
        await p.goto(origin + '/');
        if (args.greeting) await p.getByText(args.greeting, { exact: false }).first().waitFor();
        const input = p.locator('[data-id="webchat-sendbox-input"]');
        let uploads = 0;
        for (const step of args.steps) {
            if (step.upload) {
                await p.locator('input[type="file"]').setInputFiles(step.upload);
                uploads += 1;
                await input.fill('');
            } else {
                await input.fill(step.say);
            }
            await input.press('Enter');
            // The user's message, then the bot's reply, both rendered by Web Chat.
            await p.getByText(step.expect, { exact: false }).first().waitFor();
        }
        const text = await p.locator('#webchat').innerText().catch(() => '');
        const result = { ok: true, mode: args.mode, replies: args.steps.length, uploads, uploadRequests, websockets, polls, origin, transcript: text };
        if (args.mode === 'websocket' && websockets === 0) throw Object.assign(new Error('Web Chat opened no WebSocket'), { result });
        if (args.mode === 'polling' && (websockets !== 0 || polls === 0)) throw Object.assign(new Error(`polling mode: ${websockets} WebSockets, ${polls} polls`), { result });
        process.stdout.write(JSON.stringify(result) + '\n');
    } catch (e) {
        // The page's title says why it did not render Web Chat, if it knows.
        if (pageHandle) e.title = await pageHandle.title().catch(() => '');
        throw e;
    } finally {
        await browser.close().catch(() => {});
        server.close();
    }
}

main().then(() => process.exit(0)).catch(async e => {
    const extra = { ...(e && e.result ? { result: e.result } : {}), ...(e && e.title !== undefined ? { title: e.title } : {}) };
    process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e), ...extra }) + '\n');
    process.exit(1);
});
