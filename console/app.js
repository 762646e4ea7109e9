// botgate console: signs in with a bearer token and reads the gateway's JSON APIs. Everything
// shown comes from those APIs; nothing is kept but the token, in this tab's session storage.
// Text from the server is only ever set as textContent, never parsed as HTML.
'use strict';
(function () {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = 'botgate.token';
  const COLORS = ['#2f6fd0', '#e07b39', '#3a9e5c', '#b84a9e', '#c9b02e', '#4bb3c4', '#8a5a2b', '#6b6bd6'];
  const state = { token: sessionStorage.getItem(TOKEN_KEY), charts: {} };
  // What tests and scripts can read from the page: the data each chart draws.
  const page = (window.botgateConsole = { ready: false, tenantChart: null, botChart: null, errors: [] });

  async function api(method, path, body, accept) {
    const headers = { Authorization: 'Bearer ' + state.token };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (accept) headers.Accept = accept;
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
    if (!res.ok) {
      const err = new Error(json && json.error ? json.error.message + ' (' + json.error.code + ')' : 'HTTP ' + res.status);
      err.status = res.status;
      err.code = json && json.error ? json.error.code : '';
      throw err;
    }
    return json === null ? text : json;
  }

  function cell(text) {
    const td = document.createElement('td');
    td.textContent = text === undefined || text === null ? '' : String(text);
    return td;
  }

  function button(label, onClick) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'link';
    b.textContent = label;
    b.addEventListener('click', onClick);
    return b;
  }

  function fill(tableId, items, render) {
    const body = $(tableId).querySelector('tbody');
    body.replaceChildren();
    for (const item of items) {
      const tr = document.createElement('tr');
      for (const c of render(item)) tr.append(c instanceof Node ? wrap(c) : cell(c));
      body.append(tr);
    }
  }

  function wrap(node) {
    const td = document.createElement('td');
    td.append(node);
    return td;
  }

  function showError(id, err) {
    $(id).textContent = err ? err.message : '';
    if (err) page.errors.push(err.message);
  }

  const fmt = (n) => (typeof n === 'number' ? n.toLocaleString('en-US') : '–');
  const dayTs = (d) => Date.parse(d + 'T00:00:00Z') / 1000;

  // A stacked bar chart of per-bot daily series: the first drawn series is the sum of all
  // bots, each next one leaves out the top bot, so every bar shows each bot's share.
  function stackedChart(target, days, bots, key) {
    const ordered = bots.slice().reverse();
    const raw = ordered.map((b) => b[key]);
    const plotted = [days.map(dayTs)];
    for (let i = 0; i < ordered.length; i++) {
      plotted.push(days.map((_, d) => raw.slice(i).reduce((sum, series) => sum + series[d], 0)));
    }
    const series = [{}].concat(ordered.map((b, i) => ({
      label: b.bot,
      stroke: COLORS[(ordered.length - 1 - i) % COLORS.length],
      fill: COLORS[(ordered.length - 1 - i) % COLORS.length],
      paths: uPlot.paths.bars({ size: [0.7, 60] }),
      points: { show: false },
      value: (u, v, si, idx) => (idx === null || idx === undefined ? '–' : fmt(raw[si - 1][idx])),
    })));
    return draw(target, plotted, series, { raw, bots: ordered.map((b) => b.bot), days });
  }

  function lineChart(target, days, lines) {
    const plotted = [days.map(dayTs)].concat(lines.map((l) => l.values));
    const series = [{}].concat(lines.map((l, i) => ({ label: l.label, stroke: COLORS[i % COLORS.length], width: 2 })));
    return draw(target, plotted, series, { days, lines: lines.map((l) => l.label) });
  }

  function draw(target, data, series, meta) {
    if (state.charts[target]) state.charts[target].destroy();
    const el = $(target);
    el.replaceChildren();
    const width = Math.max(el.clientWidth || 0, 600);
    const opts = {
      width,
      height: 300,
      // Whole days on x, with half a day of margin so the first and last bars show whole.
      scales: { x: { time: true, range: (u, min, max) => [min - 43200, max + 43200] }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
      // Counts are whole numbers: integer steps on the y axis.
      axes: [{ incrs: [86400, 2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400], values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(5, 10)) }, { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000], values: (u, ticks) => ticks.map((t) => fmt(t)) }],
      series,
    };
    const chart = new uPlot(opts, data, el);
    state.charts[target] = chart;
    return Object.assign({ plotted: chart.data.map((s) => Array.from(s)) }, meta);
  }

  // ---- tenant admins ----
  async function loadCapacity() {
    const u = await api('GET', '/api/v1/admin/usage');
    $('cap-month').textContent = u.month;
    $('cap-capacity').textContent = fmt(u.capacity);
    $('cap-used').textContent = fmt(u.used);
    $('cap-remaining').textContent = fmt(u.remaining);
    $('cap-overage').textContent = fmt(u.overage);
    $('cap-leased').textContent = fmt(u.leased);
    $('cap-policy').textContent = u.policy === 'allow_overage' ? 'served as overage' : 'new sessions refused';
    const share = u.capacity > 0 ? Math.min(100, (100 * u.used) / u.capacity) : 100;
    $('cap-bar').style.width = share.toFixed(1) + '%';
    const f = u.forecast;
    $('cap-forecast').textContent = f
      ? 'At ' + fmt(f.daily_rate) + ' sessions a day the month ends near ' + fmt(f.projected_billed_sessions) + ' billed sessions' +
        (f.projected_exhaustion ? '; the capacity runs out at ' + f.projected_exhaustion.slice(0, 16).replace('T', ' ') + ' UTC.' : '; the capacity lasts the month.')
      : '';
    page.capacity = u;
  }

  function rangeQuery() {
    const q = new URLSearchParams();
    if ($('range-from').value) q.set('from', $('range-from').value);
    if ($('range-to').value) q.set('to', $('range-to').value);
    return q.toString();
  }

  async function loadTenantChart() {
    showError('range-error', null);
    try {
      const d = await api('GET', '/api/v1/admin/usage/daily?' + rangeQuery());
      $('range-from').value = d.from;
      $('range-to').value = d.to;
      page.tenantChart = stackedChart('tenant-chart', d.days, d.bots, 'billed_sessions');
      page.tenantChart.tenant = d.tenant;
    } catch (e) {
      showError('range-error', e);
    }
  }

  async function downloadCsv(ev) {
    ev.preventDefault();
    const text = await api('GET', '/api/v1/admin/usage/daily?' + rangeQuery(), undefined, 'text/csv');
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([text], { type: 'text/csv' }));
    a.download = 'botgate-usage-' + $('range-from').value + '-' + $('range-to').value + '.csv';
    a.click();
    URL.revokeObjectURL(a.href);
  }

  async function loadMonths() {
    const m = await api('GET', '/api/v1/admin/usage/monthly?months=12');
    fill('months', m.months, (r) => [r.month, fmt(r.capacity), fmt(r.used), fmt(r.overage), fmt(r.billed_sessions), fmt(r.turns)]);
  }

  async function loadSeats() {
    const l = await api('GET', '/api/v1/admin/licenses');
    $('seats-summary').textContent = fmt(l.seats.used) + ' of ' + fmt(l.seats.bought) + ' seats used, ' + fmt(l.seats.free) + ' free.';
    const via = Object.fromEntries(l.seat_holders.map((h) => [h.user, h.via]));
    const users = Array.from(new Set(l.users.concat(Object.keys(via)))).sort();
    fill('users', users, (u) => [
      u,
      via[u] || 'no seat yet',
      l.users.includes(u) ? button('Remove', () => change('DELETE', '/api/v1/admin/licenses/users/' + encodeURIComponent(u))) : '',
    ]);
    fill('groups', l.groups, (g) => [g, button('Remove', () => change('DELETE', '/api/v1/admin/licenses/groups/' + encodeURIComponent(g)))]);
    page.seats = l;
  }

  async function change(method, path) {
    showError('seats-error', null);
    try {
      await api(method, path);
      await Promise.all([loadSeats(), loadAudit()]);
    } catch (e) {
      showError('seats-error', e);
    }
  }

  async function loadSubscriptions() {
    const s = await api('GET', '/api/v1/admin/subscriptions');
    fill('subscriptions', s.subscriptions, (r) => [r.kind.replace('_', ' '), fmt(r.quantity), r.start, r.end || '', r.state, r.id]);
  }

  async function loadSettings() {
    const s = await api('GET', '/api/v1/admin/settings');
    $('self-service').checked = s.allow_ad_hoc_subscriptions;
    $('settings-policy').textContent = 'When the month runs out: ' + (s.capacity_policy === 'allow_overage' ? 'sessions are served as overage.' : 'new sessions are refused.');
  }

  async function loadTrials() {
    const t = await api('GET', '/api/v1/admin/trials');
    fill('trials', t.trials, (r) => [r.user, r.started, r.expires, r.extended ? 'yes' : 'no', r.active ? 'yes' : 'no']);
  }

  function describe(doc) {
    if (doc === null || doc === undefined) return '';
    if (typeof doc !== 'object') return String(doc);
    return Object.entries(doc).map(([k, v]) => k + ': ' + (typeof v === 'object' ? JSON.stringify(v) : v)).join(', ');
  }

  async function loadAudit() {
    const a = await api('GET', '/api/v1/admin/audit?limit=1000');
    const entries = a.entries.slice().reverse().slice(0, 200);
    fill('audit', entries, (e) => {
      let what;
      if (e.before && e.after && typeof e.before === 'object' && typeof e.after === 'object') {
        // A change: only the fields that changed.
        const keys = Array.from(new Set(Object.keys(e.before).concat(Object.keys(e.after))));
        what = keys
          .filter((k) => JSON.stringify(e.before[k]) !== JSON.stringify(e.after[k]))
          .map((k) => k + ': ' + describe({ v: e.before[k] }).slice(3) + ' → ' + describe({ v: e.after[k] }).slice(3))
          .join(', ');
      } else {
        what = e.after ? describe(e.after) : e.before ? 'was ' + describe(e.before) : '';
      }
      return [e.at.slice(0, 19).replace('T', ' ') + ' UTC', e.actor, e.action, e.target, what];
    });
  }

  const when = (at) => (at ? at.slice(0, 19).replace('T', ' ') + ' UTC' : '');

  async function loadWebhooks() {
    const [w, ev, log] = await Promise.all([
      api('GET', '/api/v1/admin/webhooks'),
      api('GET', '/api/v1/admin/webhooks/events?limit=50'),
      api('GET', '/api/v1/admin/webhooks/deliveries?limit=100'),
    ]);
    const path = (id) => '/api/v1/admin/webhooks/' + encodeURIComponent(id);
    fill('webhooks', w.endpoints, (e) => [
      e.id,
      e.url,
      e.events.length ? e.events.join(', ') : 'all',
      e.enabled ? 'on' : 'off' + (e.disabled_reason ? ' (' + e.disabled_reason + ')' : ''),
      button('Send test', () => webhookAction(() => api('POST', path(e.id) + '/test'))),
      button(e.enabled ? 'Turn off' : 'Turn on', () => webhookAction(() => api('PATCH', path(e.id), { enabled: !e.enabled }))),
      button('Delete', () => webhookAction(() => api('DELETE', path(e.id)))),
    ]);
    fill('webhook-events', ev.events, (e) => [
      when(e.created_at),
      e.type,
      describe(e.data),
      e.deliveries.map((d) => d.endpoint + ': ' + (d.outcome || 'retrying') + ' after ' + d.attempts + ' attempt(s)').join('; ') || (e.pending ? 'pending' : 'no endpoint'),
    ]);
    fill('webhook-deliveries', log.deliveries, (d) => [
      when(d.at), d.event_id, d.type, d.endpoint, d.attempt, d.status === null ? '–' : d.status, d.latency_ms + ' ms', d.outcome, d.error || '',
    ]);
    page.webhooks = { endpoints: w.endpoints, events: ev.events, deliveries: log.deliveries };
  }

  async function webhookAction(fn) {
    showError('webhooks-error', null);
    try {
      await fn();
      await Promise.all([loadWebhooks(), loadAudit()]);
    } catch (e) {
      showError('webhooks-error', e);
    }
  }

  async function loadAdmin() {
    $('admin').hidden = false;
    await Promise.all([loadCapacity(), loadTenantChart(), loadMonths(), loadSeats(), loadSubscriptions(), loadSettings(), loadTrials(), loadWebhooks(), loadAudit()]);
  }

  // ---- authors ----
  async function loadAuthor() {
    $('author').hidden = false;
    try {
      const b = await api('GET', '/api/v1/bots');
      const secrets = await Promise.all(b.bots.map((bot) => api('GET', '/api/v1/bots/' + encodeURIComponent(bot.id) + '/secrets').catch(() => null)));
      fill('bots', b.bots.map((bot, i) => [bot, secrets[i]]), ([bot, s]) => [
        bot.id,
        bot.name,
        bot.published ? 'published' : 'not published',
        bot.owner || (bot.managed_by_config ? 'configuration file' : ''),
        s ? s.secrets.map((x) => 'slot ' + x.slot + ': ' + (x.set ? x.hint || 'set' : 'empty')).join('; ') : '',
        button('Analytics', () => loadBotChart(bot.id)),
      ]);
      page.bots = b.bots.map((bot) => bot.id);
    } catch (e) {
      showError('author-error', e);
    }
  }

  async function loadBotChart(id) {
    const d = await api('GET', '/api/v1/bots/' + encodeURIComponent(id) + '/usage/daily');
    const series = d.bots.find((b) => b.bot === id) || { billed_sessions: d.days.map(() => 0), turns: d.days.map(() => 0) };
    $('bot-analytics').hidden = false;
    $('bot-analytics-id').textContent = id;
    page.botChart = lineChart('bot-chart', d.days, [
      { label: 'billed sessions', values: series.billed_sessions },
      { label: 'turns', values: series.turns },
    ]);
    page.botChart.bot = id;
  }

  // ---- the platform operator ----
  async function loadOperator() {
    $('operator').hidden = false;
    const t = await api('GET', '/api/v1/operator/tenants');
    fill('tenants', t.tenants, (r) => [r.id, r.name, r.tenant_licensed ? 'yes' : 'no', fmt(r.capacity), fmt(r.used), fmt(r.seats.used) + ' / ' + fmt(r.seats.bought), fmt(r.trials)]);
    page.tenants = t.tenants.map((r) => r.id);
  }

  async function operatorAction(fn) {
    showError('operator-error', null);
    try {
      await fn();
      await loadOperator();
    } catch (e) {
      showError('operator-error', e);
    }
  }

  // ---- signing in ----
  async function enter() {
    showError('sign-in-error', null);
    let me = null;
    let operator = false;
    try {
      me = await api('GET', '/api/v1/me');
    } catch (e) {
      if (e.status !== 401) throw e;
    }
    // An operator key is no JWT (no identity); a JWT is the operator's only with its role.
    if (!me || (me.roles || []).includes('PlatformOperator')) {
      try {
        await api('GET', '/api/v1/operator/tenants');
        operator = true;
      } catch (_) {
        operator = false;
      }
    }
    if (!me && !operator) {
      signOut();
      throw new Error('The gateway refused this token.');
    }
    $('sign-in').hidden = true;
    $('whoami').hidden = false;
    $('who').textContent = me ? me.user + ' @ ' + me.tenant + (me.tenant_admin ? ' (tenant admin)' : '') : 'platform operator';
    page.identity = me;
    const work = [];
    if (me && me.tenant_admin) work.push(loadAdmin());
    if (me && me.licensed) work.push(loadAuthor());
    if (operator) work.push(loadOperator());
    await Promise.all(work);
    page.ready = true;
  }

  function signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    for (const id of ['admin', 'author', 'operator', 'whoami']) $(id).hidden = true;
    $('sign-in').hidden = false;
    page.ready = false;
  }

  async function signIn(token) {
    state.token = token.trim();
    sessionStorage.setItem(TOKEN_KEY, state.token);
    try {
      await enter();
    } catch (e) {
      showError('sign-in-error', e);
    }
  }

  async function devSignIn() {
    const groups = $('dev-groups').value.split(',').map((g) => g.trim()).filter(Boolean);
    const res = await fetch('/api/v1/dev/token', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ tenant: $('dev-tenant').value, user: $('dev-user').value, groups, admin: $('dev-admin').checked, operator: $('dev-operator').checked }),
    });
    const body = await res.json();
    if (!res.ok) return showError('sign-in-error', new Error(body.error ? body.error.message : 'HTTP ' + res.status));
    await signIn(body.token);
  }

  function wire() {
    $('sign-in-token').addEventListener('click', () => signIn($('token').value));
    $('dev-sign-in').addEventListener('click', devSignIn);
    $('sign-out').addEventListener('click', signOut);
    $('range').addEventListener('submit', (ev) => { ev.preventDefault(); loadTenantChart(); });
    $('range-csv').addEventListener('click', downloadCsv);
    $('assign-user').addEventListener('submit', (ev) => {
      ev.preventDefault();
      change('PUT', '/api/v1/admin/licenses/users/' + encodeURIComponent($('assign-user-id').value.trim()));
    });
    $('assign-group').addEventListener('submit', (ev) => {
      ev.preventDefault();
      change('PUT', '/api/v1/admin/licenses/groups/' + encodeURIComponent($('assign-group-id').value.trim()));
    });
    $('self-service').addEventListener('change', async (ev) => {
      await api('PATCH', '/api/v1/admin/settings', { allow_ad_hoc_subscriptions: ev.target.checked });
      await loadAudit();
    });
    $('webhooks-refresh').addEventListener('click', () => webhookAction(async () => {}));
    $('new-webhook').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const events = $('new-webhook-events').value.split(',').map((x) => x.trim()).filter((x) => x && x !== 'all');
      webhookAction(async () => {
        const e = await api('POST', '/api/v1/admin/webhooks', { url: $('new-webhook-url').value.trim(), events });
        $('webhook-secret').textContent = 'Signing secret of ' + e.id + ' (shown once): ' + e.secret;
      });
    });
    $('new-tenant').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const body = { id: $('new-tenant-id').value.trim() };
      if ($('new-tenant-name').value.trim()) body.name = $('new-tenant-name').value.trim();
      operatorAction(() => api('POST', '/api/v1/operator/tenants', body));
    });
    $('purchase').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const body = { kind: $('purchase-kind').value, quantity: Number($('purchase-quantity').value) };
      if ($('purchase-start').value) body.start = $('purchase-start').value;
      if ($('purchase-end').value) body.end = $('purchase-end').value;
      const tenant = encodeURIComponent($('purchase-tenant').value.trim());
      operatorAction(() => api('POST', '/api/v1/operator/tenants/' + tenant + '/subscriptions', body));
    });
  }

  async function start() {
    wire();
    const cfg = await fetch('/console/config.json').then((r) => r.json());
    $('dev').hidden = !cfg.dev_sign_in;
    if (state.token) {
      try {
        await enter();
      } catch (e) {
        showError('sign-in-error', e);
      }
    }
  }

  start();
})();
