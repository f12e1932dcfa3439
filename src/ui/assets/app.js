// Spool web view: a hash-routed page over the /v1 API. No framework and no build step.
// Every value from the API reaches the page as text (textContent), never as HTML.
//
// Routes: #/runs?status=&workflow=&queue=&concurrency_key=&id_prefix=&cursor=
//         #/run/{id}   #/conversation/{key}?queue=   #/executors

const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead'];
const TERMINAL = new Set(['succeeded', 'failed', 'cancelled', 'dead']);
const REFRESH_MS = 2000;

const main = document.getElementById('main');
const signOut = document.getElementById('sign-out');
let stops = []; // what the current view must stop when another one replaces it
let session = { auth_required: false, signed_in: true };

class SignedOut extends Error {}

// ---- small helpers -------------------------------------------------------------------------

/** Creates an element: h('a', {href: '#/x', class: 'y', onclick: f}, 'text', child, …). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

async function api(path, options = {}) {
  const headers = { Accept: 'application/json' };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { credentials: 'same-origin', ...options, headers });
  if (res.status === 401 && session.auth_required && !path.startsWith('/ui/session')) {
    session.signed_in = false;
    showLogin();
    throw new SignedOut();
  }
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(body?.error?.message || `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try { await fn(); } catch (e) { if (e instanceof SignedOut) return; }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  timer = setTimeout(tick, ms);
  stops.push(() => { stopped = true; clearTimeout(timer); });
}

const badge = (status) => h('span', { class: `badge ${status}` }, status);
const runLink = (id) => h('a', { href: `#/run/${encodeURIComponent(id)}` }, h('code', {}, id));
const json = (v) => JSON.stringify(v, null, 2);

function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)} min ${Math.round((ms % 60_000) / 1000)} s`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}

const between = (a, b) => (a ? (b ? new Date(b) : new Date()) - new Date(a) : null);

function tableOf(caption, columns, rows, empty) {
  const table = h('table', {},
    h('caption', { class: 'visually-hidden' }, caption),
    h('thead', {}, h('tr', {}, columns.map(([name, cls]) => h('th', { scope: 'col', class: cls }, name)))),
    h('tbody', {}, rows.length
      ? rows
      : h('tr', {}, h('td', { colspan: columns.length, class: 'muted' }, empty))));
  return h('div', { class: 'table-wrap', role: 'region', 'aria-label': caption, tabindex: 0 }, table);
}

function errorBox(e) {
  return h('div', { class: 'error', role: 'alert' }, e.message || String(e));
}

function hashParts() {
  const [path, query] = location.hash.replace(/^#/, '').split('?');
  return {
    parts: path.split('/').filter(Boolean).map(decodeURIComponent),
    params: new URLSearchParams(query || ''),
  };
}

function show(title, ...nodes) {
  document.title = `${title} · Spool`;
  main.replaceChildren(...nodes);
}

// ---- routing -------------------------------------------------------------------------------

function route() {
  for (const stop of stops) stop();
  stops = [];
  if (session.auth_required && !session.signed_in) return showLogin();
  const { parts, params } = hashParts();
  const page = parts[0] || 'runs';
  for (const a of document.querySelectorAll('[data-nav]')) {
    if (a.dataset.nav === (page === 'run' ? 'runs' : page)) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  signOut.hidden = !session.auth_required;
  if (page === 'run' && parts[1]) runView(parts[1]);
  else if (page === 'conversation') conversationView(parts[1] || '', params.get('queue') || 'default');
  else if (page === 'executors') executorsView();
  else runsView(params);
  main.focus({ preventScroll: true });
}

// ---- sign-in -------------------------------------------------------------------------------

function showLogin() {
  for (const stop of stops) stop();
  stops = [];
  signOut.hidden = true;
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true });
  const problem = h('div', { role: 'alert' });
  const form = h('form', {
    onsubmit: async (ev) => {
      ev.preventDefault();
      problem.replaceChildren();
      try {
        await api('/ui/session', { method: 'POST', body: JSON.stringify({ token: input.value }) });
        input.value = '';
        session.signed_in = true;
        route();
      } catch (e) {
        problem.replaceChildren(errorBox(e));
        input.focus();
      }
    },
  },
  h('div', {}, h('label', { for: 'token' }, 'API token'), input),
  h('p', { class: 'muted' }, 'The token (SPOOL_API_TOKEN) is sent once; this browser then keeps an HTTP-only session cookie for twelve hours.'),
  h('div', {}, h('button', { type: 'submit' }, 'Sign in')),
  problem);
  show('Sign in', h('section', { class: 'login' }, h('h1', {}, 'Sign in to Spool'), form));
  input.focus();
}

signOut.addEventListener('click', async () => {
  await api('/ui/session', { method: 'DELETE' }).catch(() => {});
  session.signed_in = false;
  for (const key of Object.keys(sessionStorage)) if (key.startsWith('spool.')) sessionStorage.removeItem(key);
  showLogin();
});

// ---- runs ----------------------------------------------------------------------------------

const FILTERS = [
  ['workflow', 'Workflow'],
  ['queue', 'Queue'],
  ['concurrency_key', 'Concurrency key'],
  ['id_prefix', 'Id starts with'],
];

function runsHash(params) {
  const q = new URLSearchParams();
  for (const [k, v] of params) if (v) q.set(k, v);
  const s = q.toString();
  return `#/runs${s ? `?${s}` : ''}`;
}

function runsView(params) {
  const status = params.get('status') || '';
  const countsList = h('ul', { class: 'counts', 'aria-label': 'Runs per status' });
  const body = h('div', {});
  const pager = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  const live = h('input', { type: 'checkbox', id: 'live', checked: true });
  const updated = h('span', { class: 'muted', role: 'status' });

  const statusSelect = h('select', { id: 'f-status', name: 'status' },
    h('option', { value: '' }, 'any'),
    STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)));
  const inputs = FILTERS.map(([name, label]) => [name, label,
    h('input', { id: `f-${name}`, name, value: params.get(name) || '', autocomplete: 'off', spellcheck: 'false' })]);
  const form = h('form', {
    class: 'filters', role: 'search', 'aria-label': 'Filter runs',
    onsubmit: (ev) => {
      ev.preventDefault();
      const next = new URLSearchParams();
      if (statusSelect.value) next.set('status', statusSelect.value);
      for (const [name, , input] of inputs) if (input.value.trim()) next.set(name, input.value.trim());
      location.hash = runsHash(next);
    },
  },
  h('div', {}, h('label', { for: 'f-status' }, 'Status'), statusSelect),
  inputs.map(([name, label, input]) => h('div', {}, h('label', { for: `f-${name}` }, label), input)),
  h('div', { class: 'actions' },
    h('button', { type: 'submit' }, 'Apply'),
    h('a', { href: '#/runs', class: 'quiet' }, 'Clear')));

  show('Runs',
    h('div', { class: 'head' }, h('h1', {}, 'Runs'),
      h('label', { class: 'check', for: 'live' }, live, 'Refresh live'), updated),
    countsList, form, body, pager);

  const listQuery = () => {
    const q = new URLSearchParams();
    for (const k of ['status', 'workflow', 'queue', 'concurrency_key', 'id_prefix', 'cursor']) {
      if (params.get(k)) q.set(k, params.get(k));
    }
    q.set('limit', '50');
    return q;
  };

  const load = async () => {
    const countQ = new URLSearchParams();
    for (const k of ['workflow', 'queue', 'concurrency_key']) if (params.get(k)) countQ.set(k, params.get(k));
    let list;
    let counts;
    try {
      [list, counts] = await Promise.all([
        api(`/v1/runs?${listQuery()}`),
        api(`/v1/counts?${countQ}`),
      ]);
    } catch (e) {
      if (e instanceof SignedOut) throw e;
      body.replaceChildren(errorBox(e));
      return;
    }
    countsList.replaceChildren(...STATUSES.map((s) => {
      const next = new URLSearchParams(params);
      next.delete('cursor');
      if (status === s) next.delete('status'); else next.set('status', s);
      return h('li', {}, h('a', { href: runsHash(next), 'aria-current': status === s ? 'true' : 'false', 'data-status': s },
        `${s} `, h('strong', {}, String(counts.counts[s] ?? 0))));
    }));
    const rows = list.runs.map((r) => h('tr', { 'data-run': r.id },
      h('td', { class: 'id' }, runLink(r.id)),
      h('td', {}, r.workflow),
      h('td', {}, badge(r.status), r.cancel_requested && !TERMINAL.has(r.status) ? ' cancelling' : ''),
      h('td', { class: 'wide' }, r.queue),
      h('td', { class: 'wide' }, r.concurrency_key ?? ''),
      h('td', { class: 'num wide' }, `${r.attempt}/${r.max_attempts}`),
      h('td', { class: 'wide' }, r.executor_id ?? ''),
      h('td', {}, fmtTime(r.created_at)),
      h('td', { class: 'num' }, fmtDuration(between(r.started_at, r.finished_at)))));
    body.replaceChildren(tableOf('Runs, newest first', [
      ['Id', 'id'], ['Workflow'], ['Status'], ['Queue', 'wide'], ['Key', 'wide'], ['Attempt', 'num wide'], ['Executor', 'wide'], ['Created'], ['Ran for', 'num'],
    ], rows, 'No runs match.'));
    const links = [];
    if (params.get('cursor')) {
      const first = new URLSearchParams(params);
      first.delete('cursor');
      links.push(h('a', { href: runsHash(first) }, '« Newest'));
    }
    if (list.next_cursor) {
      const older = new URLSearchParams(params);
      older.set('cursor', list.next_cursor);
      links.push(h('a', { href: runsHash(older) }, 'Older »'));
    }
    pager.replaceChildren(...links);
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  };
  load().catch(() => {});
  every(REFRESH_MS, async () => { if (live.checked) await load(); });
}

// ---- one run -------------------------------------------------------------------------------

function runView(id) {
  const head = h('div', { class: 'head' });
  const fields = h('div', {});
  const steps = h('div', {});
  const values = h('div', {});
  const output = h('pre', { class: 'output', id: 'output', role: 'log', 'aria-live': 'polite', 'aria-label': 'Live output', tabindex: 0, 'data-resets': '0' });
  const attachStatus = h('p', { class: 'status-line', id: 'attach-status', role: 'status' }, 'Attaching…');
  const notices = h('div', { id: 'attach-notices' });
  const end = h('div', { id: 'attach-end' });
  const cancel = h('button', { type: 'button', class: 'danger', id: 'cancel', hidden: true }, 'Cancel run');
  const problem = h('div', { role: 'alert' });

  show(`Run ${id}`,
    head, problem,
    h('section', { 'aria-labelledby': 'h-live' }, h('h2', { id: 'h-live' }, 'Live output'), attachStatus, notices, output, end),
    h('section', { 'aria-labelledby': 'h-fields' }, h('h2', { id: 'h-fields' }, 'Run'), fields),
    h('section', { 'aria-labelledby': 'h-steps' }, h('h2', { id: 'h-steps' }, 'Steps'), steps),
    values);

  let lastStatus = null;
  cancel.addEventListener('click', async () => {
    cancel.disabled = true;
    try {
      const r = await api(`/v1/runs/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
      problem.replaceChildren(h('p', { class: 'notice' },
        r.status === 'cancelled' ? 'Cancelled.' : 'Cancel requested: the run stops at its next step boundary.'));
      await load();
    } catch (e) {
      if (!(e instanceof SignedOut)) problem.replaceChildren(errorBox(e));
      cancel.disabled = false;
    }
  });

  const load = async () => {
    let run;
    let st;
    try {
      [run, st] = await Promise.all([
        api(`/v1/runs/${encodeURIComponent(id)}`),
        api(`/v1/runs/${encodeURIComponent(id)}/steps`),
      ]);
    } catch (e) {
      if (e instanceof SignedOut) throw e;
      problem.replaceChildren(errorBox(e));
      return;
    }
    lastStatus = run.status;
    cancel.hidden = TERMINAL.has(run.status);
    cancel.disabled = run.cancel_requested;
    if (run.cancel_requested) cancel.textContent = 'Cancel requested';
    head.replaceChildren(h('h1', {}, 'Run ', h('code', {}, run.id)), badge(run.status), cancel);
    const f = [
      ['Workflow', run.workflow], ['Status', run.status + (run.cancel_requested && !TERMINAL.has(run.status) ? ' (cancel requested)' : '')],
      ['Queue', run.queue], ['Concurrency key', run.concurrency_key ?? '—'], ['Priority', run.priority],
      ['Attempt', `${run.attempt} of ${run.max_attempts}`], ['Owner (executor)', run.executor_id ?? '—'],
      ['Claim epoch', run.claim_epoch], ['Created', fmtTime(run.created_at)],
      ['Run at', fmtTime(run.run_at)], ['Started', fmtTime(run.started_at)], ['Finished', fmtTime(run.finished_at)],
      ['Ran for', fmtDuration(between(run.started_at, run.finished_at))],
    ];
    fields.replaceChildren(h('dl', { class: 'fields' }, f.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))])));
    // steps: each recorded at the claim epoch of the attempt that ran it
    steps.replaceChildren(tableOf('Memoized steps', [['#', 'num'], ['Name'], ['Claim epoch', 'num'], ['Duration', 'num'], ['Output or error']],
      st.steps.map((s) => h('tr', {},
        h('td', { class: 'num' }, s.step),
        h('td', {}, h('code', {}, s.name)),
        h('td', { class: 'num' }, s.claim_epoch),
        h('td', { class: 'num' }, fmtDuration(between(s.started_at, s.finished_at))),
        h('td', {}, s.error
          ? h('span', {}, h('span', { class: 'badge failed' }, 'error'), ' ', h('code', {}, JSON.stringify(s.error)))
          : h('code', {}, truncate(JSON.stringify(s.output), 400))))),
      'No step has finished yet.'));
    values.replaceChildren(...[
      h('section', { 'aria-labelledby': 'h-input' }, h('h2', { id: 'h-input' }, 'Input'), h('pre', { tabindex: 0 }, json(run.input))),
      run.output !== null && run.output !== undefined
        ? h('section', { 'aria-labelledby': 'h-output' }, h('h2', { id: 'h-output' }, 'Output'), h('pre', { tabindex: 0 }, json(run.output)))
        : null,
      run.error
        ? h('section', { 'aria-labelledby': 'h-error' }, h('h2', { id: 'h-error' }, 'Error'), h('pre', { tabindex: 0 }, json(run.error)))
        : null].filter(Boolean));
  };

  load().catch(() => {});
  every(REFRESH_MS, async () => { if (!TERMINAL.has(lastStatus)) await load(); });
  attachRun(id, { output, attachStatus, notices, end, onEnd: () => load().catch(() => {}) });
}

function truncate(s, n) {
  return s.length > n ? `${s.slice(0, n)}…` : s;
}

/**
 * Attaches to a run's live output. What was shown and the id of the last event are kept in
 * sessionStorage, so a reload resumes after that event (`last_event_id`, the query form of
 * Last-Event-ID) and shows nothing twice. EventSource reconnects by itself, sending the header.
 */
function attachRun(id, ui) {
  const key = `spool.attach.${id}`;
  let saved = null;
  try { saved = JSON.parse(sessionStorage.getItem(key) || 'null'); } catch { saved = null; }
  const st = saved && typeof saved.text === 'string' ? saved : { lastId: null, text: '', resets: 0 };
  ui.output.textContent = st.text;
  ui.output.dataset.resets = String(st.resets);
  const save = (eventId) => {
    if (eventId) st.lastId = eventId;
    try {
      if (st.text.length <= 1_000_000) sessionStorage.setItem(key, JSON.stringify(st));
      else sessionStorage.removeItem(key); // too big to keep: a reload replays from the start
    } catch { /* storage full or off: a reload replays from the start */ }
  };
  let url = `/v1/runs/${encodeURIComponent(id)}/stream`;
  if (st.lastId !== null) {
    url += `?last_event_id=${encodeURIComponent(st.lastId)}`;
    ui.attachStatus.textContent = `Resumed after event ${st.lastId}.`;
    ui.output.dataset.resumedAfter = st.lastId;
  }
  const es = new EventSource(url);
  stops.push(() => es.close());
  es.onopen = () => {
    if (st.lastId === null) ui.attachStatus.textContent = 'Attached: output appears as the run emits it.';
  };
  es.addEventListener('chunk', (e) => {
    const chunk = JSON.parse(e.data);
    st.text += chunk;
    ui.output.append(chunk);
    ui.output.scrollTop = ui.output.scrollHeight;
    save(e.lastEventId);
  });
  es.addEventListener('reset', (e) => {
    st.text = '';
    st.resets += 1;
    ui.output.textContent = '';
    ui.output.dataset.resets = String(st.resets);
    ui.notices.replaceChildren(h('p', { class: 'notice' },
      `The output restarted at ${new Date().toLocaleTimeString()} (reset): an executor took the run over and replays it; what follows is the whole output.`));
    save(e.lastEventId);
  });
  const ended = (kind) => (e) => {
    const data = JSON.parse(e.data);
    es.close();
    save(e.lastEventId);
    ui.output.dataset.ended = kind;
    ui.attachStatus.textContent = `Ended: ${kind}.`;
    ui.end.replaceChildren(h('h3', {}, `End event: ${kind}`), h('pre', { tabindex: 0 }, json(data)));
    ui.onEnd();
  };
  for (const kind of ['done', 'failed', 'cancelled', 'dead']) es.addEventListener(kind, ended(kind));
  es.addEventListener('unavailable', (e) => {
    ui.notices.replaceChildren(h('p', { class: 'notice' }, `Live output unavailable: ${JSON.parse(e.data)}`));
  });
  es.addEventListener('reconnect', () => {
    ui.attachStatus.textContent = 'The server is restarting; reconnecting where the output left off…';
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      if (!ui.output.dataset.ended) ui.attachStatus.textContent = 'Live output is not available (is NATS configured?).';
    } else if (!ui.output.dataset.ended) {
      ui.attachStatus.textContent = 'Connection lost; reconnecting…';
    }
  };
}

// ---- conversation --------------------------------------------------------------------------

function conversationView(key, queue) {
  const keyInput = h('input', { id: 'c-key', name: 'key', value: key, required: true, autocomplete: 'off', spellcheck: 'false' });
  const queueInput = h('input', { id: 'c-queue', name: 'queue', value: queue, autocomplete: 'off' });
  const form = h('form', {
    class: 'filters', 'aria-label': 'Choose a conversation',
    onsubmit: (ev) => {
      ev.preventDefault();
      const q = queueInput.value.trim() || 'default';
      location.hash = `#/conversation/${encodeURIComponent(keyInput.value.trim())}${q === 'default' ? '' : `?queue=${encodeURIComponent(q)}`}`;
    },
  },
  h('div', {}, h('label', { for: 'c-key' }, 'Concurrency key'), keyInput),
  h('div', {}, h('label', { for: 'c-queue' }, 'Queue'), queueInput),
  h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Attach')));
  const transcript = h('ol', { class: 'transcript', id: 'transcript' });
  const status = h('p', { class: 'status-line', role: 'status' });
  show(key ? `Conversation ${key}` : 'Conversation',
    h('h1', {}, 'Conversation', key ? [' ', h('code', {}, key)] : ''),
    form, status, key ? h('div', { role: 'log', 'aria-live': 'polite', 'aria-label': 'Transcript' }, transcript) : h('p', { class: 'muted' },
      'A conversation is the runs of one concurrency key, one after another: each run\'s input is a turn and its live output the reply.'));
  if (!key) return;

  const turns = new Map(); // run id -> { reply element, final }
  const userText = (input) => {
    const messages = Array.isArray(input?.messages) ? input.messages : null;
    const last = messages ? [...messages].reverse().find((m) => m.role === 'user') : null;
    if (last && typeof last.content === 'string') return last.content;
    return JSON.stringify(input);
  };
  const replyText = (output) => (typeof output?.content === 'string' ? output.content : JSON.stringify(output));
  const addTurn = (run) => {
    let t = turns.get(run.id);
    if (t) return t;
    const reply = h('div', { class: 'text' });
    const note = h('div', { class: 'muted' });
    const li = h('li', { 'data-run': run.id },
      h('div', { class: 'turn user' }, h('div', { class: 'who' }, 'Input · ', runLink(run.id)), h('div', { class: 'text' }, '…')),
      h('div', { class: 'turn assistant' }, h('div', { class: 'who' }, run.workflow), reply, note));
    t = { li, reply, note, seq: run.enqueue_seq, final: false };
    turns.set(run.id, t);
    const after = [...transcript.children].find((c) => turns.get(c.dataset.run)?.seq > run.enqueue_seq);
    transcript.insertBefore(li, after || null);
    api(`/v1/runs/${encodeURIComponent(run.id)}`).then((r) => {
      li.querySelector('.turn.user .text').textContent = userText(r.input);
      if (TERMINAL.has(r.status) && !t.streamed) finish(t, r);
    }).catch(() => {});
    return t;
  };
  const finish = (t, r) => {
    t.final = true;
    t.li.dataset.ended = r.status === 'succeeded' ? 'done' : r.status;
    if (r.status === 'succeeded') t.reply.textContent = replyText(r.output);
    else t.note.textContent = `${r.status}${r.error?.message ? `: ${r.error.message}` : ''}`;
  };

  // earlier turns from the list; the stream follows the running run and those after it
  api(`/v1/runs?concurrency_key=${encodeURIComponent(key)}&queue=${encodeURIComponent(queue)}&limit=50&include=input,output`)
    .then((list) => { for (const r of list.runs.reverse()) if (TERMINAL.has(r.status)) addTurn(r); })
    .catch((e) => { if (!(e instanceof SignedOut)) status.replaceChildren(errorBox(e)); });

  const es = new EventSource(`/v1/keys/${encodeURIComponent(key)}/stream?queue=${encodeURIComponent(queue)}`);
  stops.push(() => es.close());
  let current = null;
  es.onopen = () => { status.textContent = 'Attached: replies appear as they are written.'; };
  es.addEventListener('run', (e) => {
    const frame = JSON.parse(e.data);
    current = addTurn({ id: frame.run_id, workflow: frame.workflow, enqueue_seq: frame.enqueue_seq });
    current.streamed = true;
    current.reply.textContent = '';
  });
  es.addEventListener('chunk', (e) => { if (current) current.reply.append(JSON.parse(e.data)); });
  es.addEventListener('reset', () => { if (current) current.reply.textContent = ''; });
  for (const kind of ['done', 'failed', 'cancelled', 'dead']) {
    es.addEventListener(kind, (e) => {
      if (!current) return;
      const data = JSON.parse(e.data);
      if (kind === 'done') current.reply.textContent = replyText(data);
      else current.note.textContent = `${kind}${data?.message ? `: ${data.message}` : ''}`;
      current.final = true;
      current.li.dataset.ended = kind;
      current = null;
    });
  }
  es.onerror = () => {
    status.textContent = es.readyState === EventSource.CLOSED
      ? 'Live output is not available (is NATS configured?).'
      : 'Connection lost; reconnecting…';
  };
}

// ---- executors and queues ------------------------------------------------------------------

function executorsView() {
  const ex = h('div', {});
  const qs = h('div', {});
  const keys = h('div', {});
  const stuck = h('div', {});
  const updated = h('span', { class: 'muted', role: 'status' });
  show('Executors and queues',
    h('div', { class: 'head' }, h('h1', {}, 'Executors and queues'), updated),
    h('section', { 'aria-labelledby': 'h-ex' }, h('h2', { id: 'h-ex' }, 'Executors'), ex),
    h('section', { 'aria-labelledby': 'h-q' }, h('h2', { id: 'h-q' }, 'Queues'), qs),
    h('section', { 'aria-labelledby': 'h-k' }, h('h2', { id: 'h-k' }, 'Busiest concurrency keys'), keys),
    h('section', { 'aria-labelledby': 'h-u' }, h('h2', { id: 'h-u' }, 'Runs nobody can execute'), stuck));
  const load = async () => {
    let e;
    let q;
    try {
      [e, q] = await Promise.all([api('/v1/executors'), api('/v1/queues')]);
    } catch (err) {
      if (err instanceof SignedOut) throw err;
      ex.replaceChildren(errorBox(err));
      return;
    }
    ex.replaceChildren(tableOf('Executors', [
      ['Id'], ['State'], ['Runs owned', 'num'], ['Lease age', 'num'], ['Lease', 'num'], ['Workflows'], ['Queues'], ['Started'], ['Takeover at'],
    ], e.executors.map((x) => h('tr', { 'data-executor': x.id },
      h('td', {}, h('code', {}, x.id)),
      h('td', {}, x.alive ? badge('alive') : h('span', { class: 'badge down' }, x.stopped_at ? 'stopped' : 'down')),
      h('td', { class: 'num' }, x.running),
      h('td', { class: 'num' }, fmtDuration(x.heartbeat_age_ms)),
      h('td', { class: 'num' }, fmtDuration(x.lease_ms)),
      h('td', {}, (x.workflows || []).join(', ')),
      h('td', {}, x.queues ? x.queues.join(', ') : 'all'),
      h('td', {}, fmtTime(x.started_at)),
      h('td', {}, x.alive ? '—' : (x.takeover_at ? fmtTime(x.takeover_at) : 'never (waits for the same id)')))),
    'No executor has registered.'));
    qs.replaceChildren(tableOf('Queues', [['Queue'], ['Ready', 'num'], ['Scheduled', 'num'], ['Running', 'num'], ['Oldest queued', 'num']],
      q.queues.map((x) => h('tr', { 'data-queue': x.queue },
        h('td', {}, h('a', { href: runsHash(new URLSearchParams({ queue: x.queue })) }, x.queue)),
        h('td', { class: 'num' }, x.ready), h('td', { class: 'num' }, x.scheduled), h('td', { class: 'num' }, x.running),
        h('td', { class: 'num' }, x.oldest_queued_age_ms === null ? '—' : fmtDuration(x.oldest_queued_age_ms)))),
      'No unfinished runs.'));
    keys.replaceChildren(tableOf('Concurrency keys', [['Queue'], ['Key'], ['Ready', 'num'], ['Scheduled', 'num'], ['Running', 'num'], ['Oldest queued', 'num']],
      q.keys.map((x) => h('tr', {},
        h('td', {}, x.queue),
        h('td', {}, h('a', { href: `#/conversation/${encodeURIComponent(x.concurrency_key)}${x.queue === 'default' ? '' : `?queue=${encodeURIComponent(x.queue)}`}` }, x.concurrency_key)),
        h('td', { class: 'num' }, x.ready), h('td', { class: 'num' }, x.scheduled), h('td', { class: 'num' }, x.running),
        h('td', { class: 'num' }, x.oldest_queued_age_ms === null ? '—' : fmtDuration(x.oldest_queued_age_ms)))),
      'No key has unfinished runs.'));
    stuck.replaceChildren(tableOf('Runs nobody can execute', [['Run'], ['Workflow'], ['Queue'], ['Status'], ['Why']],
      q.unrunnable.map((x) => h('tr', { 'data-run': x.id },
        h('td', {}, runLink(x.id)), h('td', {}, x.workflow), h('td', {}, x.queue), h('td', {}, badge(x.status)), h('td', {}, x.reason))),
      'None: every unfinished run has a live executor that can take it.'));
    updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  };
  load().catch(() => {});
  every(REFRESH_MS, load);
}

// ---- start ---------------------------------------------------------------------------------

window.addEventListener('hashchange', route);
(async () => {
  try {
    session = await api('/ui/session');
  } catch (e) {
    main.replaceChildren(errorBox(e));
    return;
  }
  route();
})();
