// The status page: polls /status and /status/latency, draws with the DOM (text only, never HTML
// from data) and SVG, and steers the rollout through the same endpoints as the CLI.
"use strict";
(() => {
  const STATUS_EVERY = 2000;
  const LATENCY_EVERY = 5000;
  const PAGE_ROWS = 100;
  const HISTORY_ROWS = 50;
  const TOKEN_KEY = "feedrunner-token";
  const body = document.body;
  const canSteer = body.dataset.steer === "1";
  const needsToken = body.dataset.token === "1";
  const $ = (id) => document.getElementById(id);

  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let status = null;
  let sortKey = "venue";
  let sortAsc = true;
  let page = 0;

  class AuthNeeded extends Error {}

  // One chain of timeouts per poll: a call in flight is never doubled, and run() may be called any time.
  function every(ms, fn) {
    let timer = null;
    let busy = false;
    return async function run() {
      if (busy) return;
      busy = true;
      clearTimeout(timer);
      try {
        await fn();
      } finally {
        busy = false;
        timer = setTimeout(run, ms);
      }
    };
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function row(cells, cls) {
    const tr = el("tr", null, cls);
    for (const c of cells) tr.append(c instanceof Node ? c : el("td", c));
    return tr;
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  function num(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
  }

  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.max(0, Math.round(s));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s}s`;
  }

  function clock(ts) {
    return ts ? new Date(ts * 1000).toLocaleString("sv-SE") : "–";
  }

  async function call(path, options) {
    const opts = Object.assign({ cache: "no-store", credentials: "same-origin" }, options || {});
    opts.headers = Object.assign({}, opts.headers || {});
    if (needsToken && token) opts.headers["Authorization"] = "Bearer " + token;
    const response = await fetch(path, opts);
    if (response.status === 401) throw new AuthNeeded();
    return response;
  }

  function problem(text) {
    const p = $("problem");
    p.hidden = !text;
    p.textContent = text || "";
  }

  function askForToken() {
    $("token-form").hidden = false;
    problem(token ? "the bearer token was refused" : "this runner needs its bearer token (server.token)");
  }

  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    token = $("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    $("token-form").hidden = true;
    problem("");
    refresh();
    refreshLatency();
  });

  // -- what a symbol's row says ----------------------------------------------------------------

  function symbolRows(st) {
    const out = [];
    for (const [venue, v] of Object.entries(st.venues)) {
      const breakers = new Set(v.open_symbol_breakers || []);
      const connectedFor = v.since ? Date.now() / 1000 - v.since : 0;
      for (const [symbol, s] of Object.entries(v.symbols)) {
        const quarantine = v.quarantined[symbol];
        const silent = s.silent_seconds === null ? connectedFor > v.stale_after : s.silent_seconds > v.stale_after;
        let state = "ok";
        let level = "";
        if (quarantine) [state, level] = ["quarantined: " + quarantine, "bad"];
        else if (silent) [state, level] = ["silent", "bad"];
        else if (breakers.has(symbol)) [state, level] = ["breaker open", "warn"];
        out.push({
          venue, symbol, level, state,
          transport: s.transport || "–",
          events: s.events,
          latency_ms: s.latency_ms,
          silent_seconds: s.silent_seconds,
          worker: s.worker ?? null,
        });
      }
    }
    return out;
  }

  function compare(a, b) {
    const x = a[sortKey], y = b[sortKey];
    if (x === y) return a.venue === b.venue ? (a.symbol < b.symbol ? -1 : 1) : (a.venue < b.venue ? -1 : 1);
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    const c = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return sortAsc ? c : -c;
  }

  function renderSymbols() {
    if (!status) return;
    const all = symbolRows(status);
    const text = $("filter").value.trim().toUpperCase();
    const venue = $("venue-filter").value;
    const problemsOnly = $("problems-only").checked;
    const shown = all.filter(
      (r) =>
        (!text || r.symbol.toUpperCase().includes(text)) &&
        (!venue || r.venue === venue) &&
        (!problemsOnly || r.level),
    );
    shown.sort(compare);
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_ROWS));
    page = Math.min(page, pages - 1);
    const slice = shown.slice(page * PAGE_ROWS, (page + 1) * PAGE_ROWS);
    fill(
      $("symbols").tBodies[0],
      slice.map((r) =>
        row(
          [
            r.worker === null ? r.venue : `${r.venue} · worker ${r.worker}`,
            r.symbol, r.transport, num(r.events), r.latency_ms ?? "–", r.silent_seconds ?? "–", r.state,
          ],
          r.level,
        ),
      ),
    );
    const bad = all.filter((r) => r.level === "bad").length;
    $("symbol-count").textContent = `(${shown.length} of ${all.length} shown${bad ? `, ${bad} with problems` : ""})`;
    $("page-of").textContent = `page ${page + 1} of ${pages}`;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    for (const th of document.querySelectorAll("#symbols th[data-sort]")) {
      th.classList.toggle("sorted", th.dataset.sort === sortKey);
      th.classList.toggle("asc", th.dataset.sort === sortKey && sortAsc);
    }
  }

  for (const th of document.querySelectorAll("#symbols th[data-sort]")) {
    th.addEventListener("click", () => {
      sortAsc = th.dataset.sort === sortKey ? !sortAsc : true;
      sortKey = th.dataset.sort;
      renderSymbols();
    });
  }
  for (const id of ["filter", "venue-filter", "problems-only"]) {
    $(id).addEventListener("input", () => {
      page = 0;
      renderSymbols();
    });
  }
  $("prev").addEventListener("click", () => {
    page = Math.max(0, page - 1);
    renderSymbols();
  });
  $("next").addEventListener("click", () => {
    page += 1;
    renderSymbols();
  });

  // -- the other sections ----------------------------------------------------------------------

  function renderHeader(st) {
    const ready = $("ready");
    ready.textContent = st.ready ? "ready" : "not ready";
    ready.className = "badge " + (st.ready ? "ok" : "bad");
    const symbols = Object.values(st.venues).reduce((n, v) => n + Object.keys(v.symbols).length, 0);
    $("summary").textContent =
      `${Object.keys(st.venues).length} venues · ${num(symbols)} symbols · queue ${num(st.queue_depth)} · ` +
      `written ${num(st.events_written)} · RSS ${st.rss_mb} MB`;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString("sv-SE");
  }

  function renderAlerts(st) {
    const alerts = st.alerts || [];
    fill($("alerts"), alerts.length ? alerts.map((a) => el("li", a, "bad")) : [el("li", "none", "muted")]);
    fill($("not-ready"), (st.not_ready || []).map((r) => el("li", "not ready: " + r)));
  }

  function renderVenues(st) {
    const rows = [];
    for (const [name, v] of Object.entries(st.venues)) {
      const syms = Object.values(v.symbols);
      const silent = syms.filter((s) => s.silent_seconds !== null && s.silent_seconds > v.stale_after).length;
      const quarantined = Object.keys(v.quarantined).length;
      const level = v.state === "failed" || v.breaker === "open" ? "bad" : v.state !== "connected" ? "warn" : "";
      rows.push(
        row(
          [name, v.adapter, v.state, v.breaker, v.rate_per_s, num(syms.length), num(silent), num(quarantined), v.reason || ""],
          level,
        ),
      );
    }
    fill($("venues").tBodies[0], rows);
    const skipped = Object.entries(st.skipped || {});
    $("skipped").textContent = skipped.length ? "skipped: " + skipped.map(([n, why]) => `${n} (${why})`).join(", ") : "";
    const select = $("venue-filter");
    const names = Object.keys(st.venues);
    if (select.options.length !== names.length + 1) {
      const keep = select.value;
      select.replaceChildren(el("option", "every venue"), ...names.map((n) => el("option", n)));
      select.options[0].value = "";
      select.value = names.includes(keep) ? keep : "";
    }
  }

  function renderSinks(st) {
    const rows = Object.entries(st.sinks || {}).map(([name, s]) => {
      const level = s.state === "ok" ? "" : s.state === "connecting" ? "warn" : "bad";
      const spool = s.spool_bytes === undefined ? "–" : `${num(s.spool_events)} ev, ${(s.spool_bytes / 2 ** 20).toFixed(1)} MB`;
      return row(
        [
          name,
          s.state || "–",
          num(s.events_written),
          num(s.events_spooled),
          num(s.events_replayed),
          num(s.events_dropped ?? s.events_failed_total),
          spool,
          s.last_error || "",
        ],
        level,
      );
    });
    fill($("sinks").tBodies[0], rows);
  }

  function renderRollout(st) {
    const r = st.rollout;
    $("rollout-none").hidden = !!r;
    $("rollout").hidden = !r;
    if (!r) return;
    fill(
      $("phases"),
      r.phases.map((name, i) => {
        const cls = i < r.phase_index || r.state === "completed" ? "done" : i === r.phase_index ? "current" : "";
        const li = el("li", name, cls);
        if (i === r.phase_index) li.setAttribute("aria-current", "step");
        return li;
      }),
    );
    const parts = [`${r.state}`];
    if (r.phase) parts.push(`phase ${r.phase}`);
    if (r.dwell_seconds) {
      parts.push(`${duration(r.in_phase_seconds)} of ${duration(r.dwell_seconds)} dwell`);
      if (r.state === "progressing") parts.push(`${duration(r.dwell_seconds - r.in_phase_seconds)} left`);
    }
    parts.push(`${num(r.symbols_on_target)} symbols on ${r.target}`);
    if (r.reason) parts.push(r.reason);
    if (st.next_evaluation) parts.push(`next evaluation ${clock(st.next_evaluation)}`);
    $("rollout-state").textContent = parts.join(" · ");
    $("rollout-state").className = r.state === "rolled_back" || r.state === "aborted" ? "bad" : "";
    const gates = r.gates || [];
    if (!gates.length) {
      fill($("gates").tBodies[0], [row([el("td", "no gate evaluated in this phase yet", "muted")])]);
      $("gates").tBodies[0].firstChild.firstChild.colSpan = 5;
    } else {
      fill(
        $("gates").tBodies[0],
        gates.map((g) =>
          row(
            [g.name, g.outcome, g.value ?? "–", g.samples ?? "–", g.detail || ""],
            g.outcome === "fail" ? "bad" : g.outcome === "pass" ? "" : "warn",
          ),
        ),
      );
    }
    const history = (r.history || []).slice(0, HISTORY_ROWS);
    fill(
      $("history").tBodies[0],
      history.map((h) => row([clock(h.at), h.phase ?? "–", `${h.from_state} → ${h.to_state}`, h.reason || ""])),
    );
  }

  // -- latency charts --------------------------------------------------------------------------

  const SVG = "http://www.w3.org/2000/svg";
  const W = 360, H = 140, PAD = 40;

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    return e;
  }

  function chart(venue, series, data) {
    const box = el("div", null, "chart");
    box.dataset.venue = venue;
    box.append(el("div", venue));
    const g = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
    g.append(svg("title", {}));
    g.firstChild.textContent = `${venue} latency p50/p99 by transport`;
    // A log scale: websocket's milliseconds and polling's hundreds of them stay readable on one chart.
    const points = Object.values(series).flat();
    const lo = 0.5;
    const hi = 10 ** Math.ceil(Math.log10(Math.max(10, ...points.map((p) => p[2] * 1000))));
    const t0 = data.now - data.window;
    const x = (t) => PAD + ((t - t0) / data.window) * (W - PAD - 4);
    const y = (ms) => H - 16 - (Math.log10(Math.max(lo, ms) / lo) / Math.log10(hi / lo)) * (H - 24);
    g.append(svg("line", { x1: PAD, y1: H - 16, x2: W - 4, y2: H - 16, class: "axis" }));
    g.append(svg("line", { x1: PAD, y1: 4, x2: PAD, y2: H - 16, class: "axis" }));
    const label = (text, attrs) => {
      const t = svg("text", attrs);
      t.textContent = text;
      g.append(t);
    };
    for (let ms = 1; ms <= hi; ms *= 10) {
      g.append(svg("line", { x1: PAD, y1: y(ms), x2: W - 4, y2: y(ms), class: "axis grid" }));
      label(ms >= 1000 ? `${ms / 1000} s` : `${ms} ms`, { x: 2, y: y(ms) + 3 });
    }
    label(`-${duration(data.window)}`, { x: PAD, y: H - 3 });
    label("now", { x: W - 24, y: H - 3 });
    const legend = [];
    for (const [transport, pts] of Object.entries(series)) {
      if (!pts.length) continue;
      for (const [i, cls] of [[1, "p50"], [2, "p99"]]) {
        const d = pts.map((p) => `${x(p[0] + data.step / 2).toFixed(1)},${y(p[i] * 1000).toFixed(1)}`).join(" ");
        g.append(svg("polyline", { points: d, fill: "none", "stroke-width": 1.5, class: `${transport} ${cls}` }));
      }
      const last = pts[pts.length - 1];
      legend.push(`${transport} p50 ${(last[1] * 1000).toFixed(1)} / p99 ${(last[2] * 1000).toFixed(1)} ms`);
    }
    box.append(g);
    box.append(el("div", legend.length ? legend.join(" · ") : "no latency in this window", "muted"));
    return box;
  }

  const refreshLatency = every(LATENCY_EVERY, async () => {
    try {
      const response = await call("/status/latency?window=300&step=5");
      if (!response.ok) throw new Error(`/status/latency answered ${response.status}`);
      const data = await response.json();
      fill($("charts"), Object.entries(data.venues).map(([venue, series]) => chart(venue, series, data)));
    } catch (err) {
      if (err instanceof AuthNeeded) askForToken();
    }
  });

  // -- steering --------------------------------------------------------------------------------

  const result = $("action-result");
  $("read-only").hidden = canSteer;
  for (const button of document.querySelectorAll("#actions button")) {
    button.disabled = !canSteer;
    button.addEventListener("click", async () => {
      const action = button.dataset.action;
      if (action === "abort" && !window.confirm("Abort the rollout and return every symbol to the baseline?")) return;
      result.textContent = `${action}…`;
      result.className = "";
      try {
        const response = await call(`/rollout/${action}`, { method: "POST", headers: { "X-Feedrunner": "1" } });
        const answer = await response.json().catch(() => ({}));
        if (response.ok) {
          result.textContent = `${action}: done`;
          if (status) {
            status.rollout = answer;
            renderRollout(status);
          }
        } else {
          result.textContent = `${action} refused: ${answer.error || response.statusText || response.status}`;
          result.className = "bad";
        }
      } catch (err) {
        if (err instanceof AuthNeeded) askForToken();
        result.textContent = `${action} failed: ${err.message || "refused"}`;
        result.className = "bad";
      }
    });
  }

  // -- the poll --------------------------------------------------------------------------------

  const refresh = every(STATUS_EVERY, async () => {
    try {
      const response = await call("/status");
      if (!response.ok) throw new Error(`/status answered ${response.status}`);
      status = await response.json();
      problem("");
      renderHeader(status);
      renderAlerts(status);
      renderRollout(status);
      renderVenues(status);
      renderSinks(status);
      renderSymbols();
    } catch (err) {
      if (err instanceof AuthNeeded) askForToken();
      else {
        problem(`cannot read /status: ${err.message}`);
        $("ready").textContent = "unreachable";
        $("ready").className = "badge bad";
      }
    }
  });

  refresh();
  refreshLatency();
})();
