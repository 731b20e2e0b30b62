// The experimenter's page: one row per session, and for the chosen one its status, health,
// rolling plots (probabilities, intensity, heart and respiration rate, framewise displacement
// when the payloads carry it, latency) with the trial markers as shaded spans, and the marker
// list. Plots are plain canvas; every text from a message goes in with textContent (canvas
// fillText draws text as text too).
"use strict";

(function () {
  const E = window.EmoWeb;
  const url = E.query();
  const WINDOW_S = Math.max(10, parseFloat(url.get("window")) || 120); // x range of the plots
  const MAX_ROWS = 3600;
  const MAX_MARKERS = 500;
  const COLORS = { negative: "#f85149", neutral: "#8b949e", positive: "#3fb950" };
  // a marker's category is -1 negative, 0 neutral, +1 positive (recordings/session.py)
  function categoryOf(info) {
    return info && Number.isInteger(info.category) ? E.CATEGORIES[info.category + 1] || null : null;
  }

  const sessions = new Map();
  let selected = null;
  let mqtt = null;
  let malformed = 0;
  let feed = null;
  let redrawPending = false;

  function sessionOf(id) {
    let s = sessions.get(id);
    if (!s) {
      s = { id, status: null, rows: [], byKey: new Map(), run: 0, markers: [], counters: {},
        tr: null, lastPrediction: null, row: null };
      sessions.set(id, s);
    }
    return s;
  }

  function rowFor(s, sequence, volumeTimestamp) {
    const key = s.run + ":" + sequence;
    let row = s.byKey.get(key);
    if (!row) {
      row = { key, sequence, t: volumeTimestamp };
      s.byKey.set(key, row);
      s.rows.push(row);
      if (s.rows.length > MAX_ROWS) s.byKey.delete(s.rows.shift().key);
    }
    return row;
  }

  function fdOf(p) {
    return E.isNumber(p.framewise_displacement) ? p.framewise_displacement : null;
  }

  function addPrediction(s, p, received) {
    const row = rowFor(s, p.sequence, p.volume_timestamp);
    row.t = p.volume_timestamp;
    row.tr = p.tr_index;
    row.neg = p.probabilities.negative;
    row.neu = p.probabilities.neutral;
    row.pos = p.probabilities.positive;
    row.intensity = p.intensity;
    row.hr = p.heart_rate;
    row.rr = p.respiration_rate;
    row.latency = p.latency_ms;
    if (fdOf(p) !== null) row.fd = fdOf(p);
    s.lastPrediction = Object.assign({ received }, p);
    const recent = s.rows.slice(-16).filter((r) => E.isNumber(r.tr))
      .map((r) => ({ tr_index: r.tr, volume_timestamp: r.t }));
    s.tr = E.estimateTr(recent) || s.tr;
  }

  function addPhysio(s, p) {
    const row = rowFor(s, p.sequence, p.volume_timestamp);
    if (!E.isNumber(row.hr)) row.hr = p.heart_rate;
    if (!E.isNumber(row.rr)) row.rr = p.respiration_rate;
    if (fdOf(p) !== null) row.fd = fdOf(p);
    row.hrq = p.heart_rate_quality;
    row.rrq = p.respiration_rate_quality;
  }

  function addMarker(s, m) {
    s.markers.push(m);
    if (s.markers.length > MAX_MARKERS) s.markers.shift();
  }

  function setStatus(s, status) {
    if (s.status && status && (status.state === "offline" || status.state === "starting")
        && s.status.state !== status.state) {
      s.run += 1; // a restarted engine counts its sequences from 0 again
    }
    s.status = status;
  }

  // ------------------------------------------------------------------ events

  function snapshot(m) {
    sessions.clear();
    for (const snap of m.sessions || []) {
      const s = sessionOf(snap.session);
      s.status = snap.status;
      s.counters = snap.counters || {};
      for (const p of snap.predictions) addPrediction(s, p, p.received);
      for (const p of snap.physio) addPhysio(s, p);
      for (const mk of snap.markers) addMarker(s, mk);
    }
    health(m);
  }

  function health(m) {
    mqtt = m.mqtt;
    malformed = m.malformed || 0;
    for (const [id, counters] of Object.entries(m.sessions || {})) {
      if (Array.isArray(m.sessions)) break;
      sessionOf(id).counters = counters;
    }
    schedule();
  }

  function onPrediction(m) {
    addPrediction(sessionOf(m.session), m.payload, m.received);
    schedule();
  }

  function onPhysio(m) {
    addPhysio(sessionOf(m.session), m.payload);
    schedule();
  }

  function onStatus(m) {
    setStatus(sessionOf(m.session), Object.assign({ received: m.received }, m.payload));
    schedule();
  }

  function onMarker(m) {
    addMarker(sessionOf(m.session), Object.assign({ received: m.received }, m.payload));
    schedule();
  }

  function onConnection(ok) {
    const conn = document.getElementById("conn");
    conn.textContent = ok ? "web server connected" : "web server unreachable: retrying";
    conn.className = "pill " + (ok ? "good" : "bad");
  }

  function schedule() {
    if (redrawPending) return;
    redrawPending = true;
    window.requestAnimationFrame(() => {
      redrawPending = false;
      render();
    });
  }

  // ------------------------------------------------------------------ overview

  function age(received) {
    if (!E.isNumber(received) || !feed) return "–";
    const a = feed.serverNow() - received;
    return a < 1 ? "now" : a < 120 ? a.toFixed(0) + " s ago" : (a / 60).toFixed(0) + " min ago";
  }

  function renderMqtt() {
    const pill = document.getElementById("mqtt");
    if (!mqtt) return;
    const ok = mqtt.connected;
    pill.textContent = "MQTT " + mqtt.url + ": " + (ok ? "connected" : mqtt.state)
      + (!ok && mqtt.last_error ? " (" + mqtt.last_error + ")" : "");
    pill.className = "pill " + (ok ? "good" : "bad");
  }

  function renderOverview() {
    const tbody = document.querySelector("#sessions tbody");
    document.getElementById("empty").hidden = sessions.size > 0;
    for (const s of sessions.values()) {
      if (!s.row) {
        s.row = E.el("tr");
        s.row.dataset.session = s.id;
        for (let i = 0; i < 14; i++) s.row.appendChild(E.el("td", i === 2 ? "reason" : ""));
        s.row.addEventListener("click", () => {
          window.location.hash = encodeURIComponent(s.id);
        });
        tbody.appendChild(s.row);
      }
      const p = s.lastPrediction || {};
      const probs = p.probabilities || {};
      const state = s.status ? s.status.state : "unknown";
      const cells = [
        s.id, state, s.status ? s.status.reason : "",
        E.isNumber(p.tr_index) ? p.tr_index : "–", p.category || "–",
        E.fmt(probs.negative, 2), E.fmt(probs.neutral, 2), E.fmt(probs.positive, 2),
        E.isNumber(p.intensity) ? (p.intensity >= 0 ? "+" : "") + p.intensity.toFixed(2) : "–",
        E.fmt(p.heart_rate, 1, "bpm"), E.fmt(p.respiration_rate, 1, "/min"),
        E.fmt(fdOf(p), 2, "mm"), E.fmt(p.latency_ms, 1, "ms"),
        age(s.counters.last_received),
      ];
      cells.forEach((text, i) => {
        const td = s.row.children[i];
        if (td.textContent !== String(text)) td.textContent = String(text);
      });
      s.row.children[1].className = "state " + state;
      s.row.classList.toggle("selected", s.id === selected);
    }
  }

  // ------------------------------------------------------------------ detail

  const PLOTS = [
    { id: "probabilities", title: "probabilities", wide: true, range: [0, 1], series: [
      { key: "neg", label: "negative", color: COLORS.negative },
      { key: "neu", label: "neutral", color: COLORS.neutral },
      { key: "pos", label: "positive", color: COLORS.positive }] },
    { id: "intensity", title: "intensity (−4..+4)", range: [-4, 4], zero: true, series: [
      { key: "intensity", label: "intensity", color: "#d2a8ff" }] },
    { id: "latency", title: "latency (ms)", range: [0, null], series: [
      { key: "latency", label: "latency", color: "#79c0ff" }] },
    { id: "hr", title: "heart rate (bpm)", range: [null, null], series: [
      { key: "hr", label: "heart rate", color: "#ff7b72" }] },
    { id: "rr", title: "respiration rate (breaths/min)", range: [null, null], series: [
      { key: "rr", label: "respiration rate", color: "#56d4dd" }] },
    { id: "fd", title: "framewise displacement (mm)", range: [0, null], optional: true, series: [
      { key: "fd", label: "FD", color: "#e3b341" }] },
  ];

  function buildPlots() {
    const box = document.getElementById("plots");
    for (const spec of PLOTS) {
      const div = E.el("div", "plot" + (spec.wide ? " wide" : ""));
      div.id = "plot-" + spec.id;
      const h = E.el("h4", "", spec.title + " ");
      if (spec.series.length > 1) {
        const legend = E.el("span", "legend");
        for (const ser of spec.series) {
          const item = E.el("span", "", "● " + ser.label);
          item.style.color = ser.color;
          legend.appendChild(item);
        }
        h.appendChild(legend);
      }
      div.appendChild(h);
      const canvas = document.createElement("canvas");
      div.appendChild(canvas);
      spec.canvas = canvas;
      spec.box = div;
      box.appendChild(div);
    }
  }

  function trialSpans(s, tMax) {
    // trial_start..trial_end pairs (by trial number); other markers become instants
    const spans = [];
    const open = new Map();
    for (const m of s.markers) {
      const info = m.marker;
      if (info && info.event === "trial_start") {
        open.set(info.trial, { start: m.timestamp, end: null, info, text: m.text });
      } else if (info && info.event === "trial_end" && open.has(info.trial)) {
        const span = open.get(info.trial);
        span.end = m.timestamp;
        open.delete(info.trial);
        spans.push(span);
      } else {
        spans.push({ start: m.timestamp, end: m.timestamp, info, text: m.text });
      }
    }
    for (const span of open.values()) spans.push(Object.assign(span, { end: tMax, open: true }));
    return spans;
  }

  function spanLabel(span) {
    const info = span.info;
    if (!info || info.event !== "trial_start") return span.text;
    const parts = ["trial " + info.trial];
    if (categoryOf(info)) parts.push(categoryOf(info));
    if (E.isNumber(info.intensity)) parts.push((info.intensity > 0 ? "+" : "") + info.intensity);
    return parts.join(" ");
  }

  function spanColor(span, alpha) {
    const name = categoryOf(span.info);
    const hex = (name && COLORS[name]) || "#8b949e";
    const n = parseInt(hex.slice(1), 16);
    return "rgba(" + (n >> 16) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + alpha + ")";
  }

  function drawPlot(spec, s, t0, t1, spans, labels) {
    const canvas = spec.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 44;
    const right = 6;
    const top = labels ? 16 : 6;
    const bottom = 16;
    const pw = w - left - right;
    const ph = h - top - bottom;
    const rows = s.rows.filter((r) => r.t >= t0 && r.t <= t1);
    let lo = spec.range[0];
    let hi = spec.range[1];
    if (lo === null || hi === null) {
      const vals = [];
      for (const r of rows) for (const ser of spec.series) if (E.isNumber(r[ser.key])) vals.push(r[ser.key]);
      const vmin = vals.length ? Math.min(...vals) : 0;
      const vmax = vals.length ? Math.max(...vals) : 1;
      const pad = Math.max(1e-6, (vmax - vmin) * 0.1) || 1;
      if (lo === null) lo = vmin - pad;
      if (hi === null) hi = vmax + pad;
      if (hi <= lo) hi = lo + 1;
    }
    const x = (t) => left + ((t - t0) / (t1 - t0)) * pw;
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * ph;
    // trial spans
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, pw, ph);
    ctx.clip();
    for (const span of spans) {
      if (span.end < t0 || span.start > t1) continue;
      if (span.end > span.start) {
        ctx.fillStyle = spanColor(span, 0.16);
        ctx.fillRect(x(span.start), top, Math.max(1, x(span.end) - x(span.start)), ph);
      } else {
        ctx.fillStyle = spanColor(span, 0.7);
        ctx.fillRect(x(span.start), top, 1, ph);
      }
    }
    ctx.restore();
    if (labels) {
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillStyle = "#c9d1d9";
      for (const span of spans) {
        if (span.end < t0 || span.start > t1) continue;
        const room = (span.end > span.start ? x(span.end) : left + pw) - Math.max(left, x(span.start));
        if (room > 24) ctx.fillText(spanLabel(span), Math.max(left, x(span.start)) + 2, 11, room - 4);
      }
    }
    // axes
    ctx.strokeStyle = "#2d3a46";
    ctx.fillStyle = "#8a97a3";
    ctx.font = "10px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (const v of [lo, (lo + hi) / 2, hi]) {
      ctx.beginPath();
      ctx.moveTo(left, y(v));
      ctx.lineTo(left + pw, y(v));
      ctx.stroke();
      ctx.fillText(Math.abs(hi - lo) >= 10 ? v.toFixed(0) : v.toFixed(1), 4, y(v) + 3);
    }
    if (spec.zero) {
      ctx.strokeStyle = "#56636f";
      ctx.beginPath();
      ctx.moveTo(left, y(0));
      ctx.lineTo(left + pw, y(0));
      ctx.stroke();
    }
    ctx.fillText("−" + Math.round(t1 - t0) + " s", left, h - 3);
    ctx.fillText("now", left + pw - 20, h - 3);
    // series (a gap where a value is missing)
    for (const ser of spec.series) {
      ctx.strokeStyle = ser.color;
      ctx.lineWidth = 1.6;
      ctx.beginPath();
      let pen = false;
      for (const r of rows) {
        const v = r[ser.key];
        if (!E.isNumber(v)) {
          pen = false;
          continue;
        }
        const px = x(r.t);
        const py = y(E.clamp(v, lo, hi));
        if (pen) ctx.lineTo(px, py);
        else ctx.moveTo(px, py);
        pen = true;
      }
      ctx.stroke();
    }
  }

  function renderHealth(s) {
    const dl = document.getElementById("health");
    const c = s.counters || {};
    const p = s.lastPrediction || {};
    const details = (s.status && s.status.details) || {};
    const missing = Array.isArray(details.missing) ? details.missing.join(", ") : "";
    const items = [
      ["MQTT", mqtt ? (mqtt.connected ? "connected to " + mqtt.url : mqtt.state + ": "
        + (mqtt.last_error || "")) : "–", mqtt && !mqtt.connected],
      ["MQTT reconnects", mqtt ? String(Math.max(0, mqtt.connects - 1)) : "–", false],
      ["predictions", String(c.predictions || 0), false],
      ["last message", age(c.last_received), false],
      ["lost (sequence gaps)", String(c.gaps || 0), (c.gaps || 0) > 0],
      ["duplicates dropped", String(c.duplicates || 0), false],
      ["TR (measured)", E.fmt(s.tr, 2, "s"), false],
      ["malformed messages", String(malformed), malformed > 0],
      ["missing streams", missing || "none", missing !== ""],
      ["flags", (p.flags || []).join(", ") || "none", (p.flags || []).length > 0],
      ["heart rate", p.heart_rate_valid ? "valid" : "not valid", !p.heart_rate_valid],
      ["respiration rate", p.respiration_rate_valid ? "valid" : "not valid",
        !p.respiration_rate_valid],
    ];
    if (dl.children.length !== items.length * 2) {
      dl.replaceChildren();
      for (let i = 0; i < items.length; i++) {
        dl.appendChild(E.el("dt"));
        dl.appendChild(E.el("dd"));
      }
    }
    items.forEach(([k, v, warn], i) => {
      dl.children[2 * i].textContent = k;
      dl.children[2 * i + 1].textContent = v;
      dl.children[2 * i + 1].className = warn ? "warn" : "";
    });
  }

  function renderMarkers(s) {
    const ol = document.getElementById("markers");
    if (ol.dataset.session === s.id && Number(ol.dataset.count) === s.markers.length) return;
    ol.replaceChildren();
    ol.dataset.session = s.id;
    ol.dataset.count = String(s.markers.length);
    const t0 = s.rows.length ? s.rows[0].t : null;
    for (const m of s.markers.slice(-100).reverse()) {
      const li = E.el("li");
      const rel = t0 !== null ? (m.timestamp - t0).toFixed(1) + " s" : m.timestamp.toFixed(3);
      li.appendChild(E.el("span", "time", rel));
      li.appendChild(E.el("span", "text", m.text));
      const info = m.marker;
      if (info && (info.event === "trial_start" || info.event === "trial_end")) {
        const what = info.event === "trial_start" ? spanLabel({ info, text: m.text }) : "";
        li.appendChild(E.el("span", "muted", " " + info.event.replace("_", " ") + " " + what));
      }
      ol.appendChild(li);
    }
  }

  function renderDetail() {
    const detail = document.getElementById("detail");
    let id = selected;
    if (id === null && sessions.size === 1) id = sessions.keys().next().value;
    const s = id !== null ? sessions.get(id) : null;
    detail.hidden = !s;
    if (!s) return;
    document.getElementById("d-session").textContent = s.id;
    const state = document.getElementById("d-state");
    state.textContent = s.status ? s.status.state : "unknown";
    state.className = "state " + (s.status ? s.status.state : "");
    document.getElementById("d-reason").textContent = s.status ? s.status.reason : "";
    const model = (s.lastPrediction && s.lastPrediction.model_id) || (s.status && s.status.model_id);
    document.getElementById("d-model").textContent = model ? "model " + model : "";
    renderHealth(s);
    const t1 = s.rows.length ? s.rows[s.rows.length - 1].t : 0;
    const t0 = t1 - WINDOW_S;
    const spans = trialSpans(s, t1);
    const hasFd = s.rows.some((r) => E.isNumber(r.fd));
    PLOTS.forEach((spec, i) => {
      spec.box.hidden = spec.optional && !hasFd;
      if (!spec.box.hidden) drawPlot(spec, s, t0, t1, spans, i === 0);
    });
    renderMarkers(s);
  }

  function render() {
    renderMqtt();
    renderOverview();
    renderDetail();
  }

  function onHash() {
    const h = window.location.hash.slice(1);
    selected = h ? decodeURIComponent(h) : null;
    schedule();
  }

  buildPlots();
  window.addEventListener("hashchange", onHash);
  window.addEventListener("resize", schedule);
  onHash();
  feed = new E.Feed(url.get("session") || null, {
    snapshot,
    health,
    prediction: onPrediction,
    physio: onPhysio,
    status: onStatus,
    marker: onMarker,
    connection: onConnection,
  });
  window.setInterval(schedule, 1000);
})();
