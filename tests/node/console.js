#!/usr/bin/env node
// Uses botgate's web console (/console) in headless Chromium (Debian's /usr/bin/chromium, driven
// by playwright-core) as a tenant admin would: the one-click development sign-in, a date range
// for the chart of billed sessions per day, a seat assigned through the page's form, then a
// sign-out and a sign-in as another tenant's admin. What the page drew is read back from it
// (`window.botgateConsole`: the data each uPlot chart holds) for the Rust test to compare with
// the usage API.
//
// Usage:
//   node console.js --gateway http://127.0.0.1:P --tenant contoso --user root --from D --to D
//        --assign USER --other-tenant T [--author USER --author-bot BOT] [--new-tenant T]
//        [--webhook-url URL] [--screenshot FILE] [--timeout-ms MS]
//
// With --webhook-url (a receiver of tests/python/webhook_receiver.py), the admin adds that
// endpoint through the page's form, hands the secret the page shows to the receiver (its
// /_control), sends a test event with the row's button and refreshes until the delivery log
// shows the delivery.
//
// stdout: exactly one JSON line
//   success: {"ok":true,"first":{...},"assigned":[...],"other":{...}} (exit 0)
//   failure: {"ok":false,"error":"...","errors":[page errors]} (exit 1)
'use strict';

const { chromium } = require('playwright-core');

function parseArgs(argv) {
    const args = { timeoutMs: 30000 };
    for (let i = 2; i < argv.length; i += 2) {
        const [k, v] = [argv[i], argv[i + 1]];
        if (v === undefined) throw new Error(`missing value for ${k}`);
        const name = k.replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
        args[name] = name === 'timeoutMs' ? Number(v) : v;
    }
    for (const need of ['gateway', 'tenant', 'user', 'from', 'to', 'assign', 'otherTenant']) {
        if (!args[need]) throw new Error(`--${need} is required`);
    }
    return args;
}

async function devSignIn(p, tenant, user, { admin = true, operator = false } = {}) {
    await p.locator('#dev').waitFor({ state: 'visible' });
    await p.fill('#dev-tenant', tenant);
    await p.fill('#dev-user', user);
    await p.setChecked('#dev-admin', admin);
    await p.setChecked('#dev-operator', operator);
    await p.click('#dev-sign-in');
    await p.waitForFunction(() => window.botgateConsole && window.botgateConsole.ready);
}

async function main() {
    const args = parseArgs(process.argv);
    const pageErrors = [];
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        headless: true,
        // This machine has no network beyond loopback: keep Chromium from reaching out.
        args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    try {
        const context = await browser.newContext({ viewport: { width: 1180, height: 900 } });
        const p = await context.newPage();
        p.setDefaultTimeout(args.timeoutMs);
        p.on('pageerror', (e) => { pageErrors.push(String(e)); process.stderr.write(`[page error] ${e}\n`); });
        p.on('console', (m) => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
        await p.goto(`${args.gateway}/console`);
        await devSignIn(p, args.tenant, args.user);

        // The chosen range, drawn.
        await p.fill('#range-from', args.from);
        await p.fill('#range-to', args.to);
        await p.click('#range button[type=submit]');
        await p.waitForFunction(([from, to]) => {
            const c = window.botgateConsole.tenantChart;
            return c && c.days[0] === from && c.days[c.days.length - 1] === to;
        }, [args.from, args.to]);
        const first = await p.evaluate(() => ({
            chart: window.botgateConsole.tenantChart,
            capacity: window.botgateConsole.capacity,
            identity: window.botgateConsole.identity,
            text: document.body.innerText,
        }));
        if (args.screenshot) {
            const card = await p.locator('#capacity-card').boundingBox();
            const chart = await p.locator('#tenant-chart').boundingBox();
            await p.screenshot({
                path: args.screenshot,
                clip: { x: card.x - 8, y: card.y - 8, width: card.width + 16, height: chart.y + chart.height - card.y + 24 },
            });
        }

        // A seat assigned through the page's form.
        await p.fill('#assign-user-id', args.assign);
        await p.click('#assign-user button[type=submit]');
        await p.waitForFunction((u) => window.botgateConsole.seats && window.botgateConsole.seats.users.includes(u), args.assign);
        await p.locator('#users').getByText(args.assign, { exact: true }).waitFor();
        const assigned = await p.evaluate(() => window.botgateConsole.seats.users);

        // A webhook endpoint added through the page, a test event sent, its delivery logged.
        let webhooks = null;
        if (args.webhookUrl) {
            await p.fill('#new-webhook-url', args.webhookUrl);
            await p.click('#new-webhook button[type=submit]');
            await p.waitForFunction((u) => window.botgateConsole.webhooks && window.botgateConsole.webhooks.endpoints.some((e) => e.url === u), args.webhookUrl);
            const shown = await p.locator('#webhook-secret').innerText();
            const secret = shown.slice(shown.indexOf('whsec_'));
            const control = args.webhookUrl.replace(/\/hook$/, '/_control');
            const res = await fetch(control, { method: 'POST', body: JSON.stringify({ secret }) });
            if (!res.ok) throw new Error(`receiver control: ${res.status}`);
            await p.locator('#webhooks tr', { hasText: args.webhookUrl }).getByRole('button', { name: 'Send test' }).click();
            const deadline = Date.now() + args.timeoutMs;
            for (;;) {
                await p.click('#webhooks-refresh');
                const n = await p.evaluate(() => window.botgateConsole.webhooks.deliveries.length);
                if (n > 0) break;
                if (Date.now() > deadline) throw new Error('no delivery in the console log');
                await p.waitForTimeout(100);
            }
            webhooks = await p.evaluate(() => ({ ...window.botgateConsole.webhooks, text: document.getElementById('webhook-deliveries').innerText }));
            webhooks.secret = secret;
        }

        // Another tenant's admin, in the same tab after signing out.
        await p.click('#sign-out');
        await devSignIn(p, args.otherTenant, args.user);
        await p.waitForFunction(() => window.botgateConsole.tenantChart && window.botgateConsole.capacity);
        const other = await p.evaluate(() => ({
            chart: window.botgateConsole.tenantChart,
            capacity: window.botgateConsole.capacity,
            text: document.body.innerText,
        }));
        // An author of the first tenant: their bots, and one bot's analytics.
        let author = null;
        if (args.author) {
            await p.click('#sign-out');
            await devSignIn(p, args.tenant, args.author, { admin: false });
            await p.waitForFunction(() => window.botgateConsole.bots);
            await p.locator('#bots tr', { hasText: args.authorBot }).getByRole('button', { name: 'Analytics' }).click();
            await p.waitForFunction((b) => window.botgateConsole.botChart && window.botgateConsole.botChart.bot === b, args.authorBot);
            author = await p.evaluate(() => ({
                bots: window.botgateConsole.bots,
                chart: window.botgateConsole.botChart,
                adminShown: !document.getElementById('admin').hidden,
            }));
        }

        // The platform operator: the tenants, and a tenant created through the page's form.
        let operator = null;
        if (args.newTenant) {
            await p.click('#sign-out');
            await devSignIn(p, 'platform', 'ops', { admin: false, operator: true });
            await p.waitForFunction(() => window.botgateConsole.tenants);
            await p.fill('#new-tenant-id', args.newTenant);
            await p.click('#new-tenant button[type=submit]');
            await p.waitForFunction((t) => window.botgateConsole.tenants.includes(t), args.newTenant);
            operator = await p.evaluate(() => ({ tenants: window.botgateConsole.tenants }));
        }
        if (pageErrors.length) throw new Error(`page errors: ${pageErrors.join('; ')}`);
        process.stdout.write(JSON.stringify({ ok: true, first, assigned, webhooks, other, author, operator, errors: pageErrors }) + '\n');
    } finally {
        await browser.close();
    }
}

main().catch((e) => {
    process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.stack || e) }) + '\n');
    process.exit(1);
});
