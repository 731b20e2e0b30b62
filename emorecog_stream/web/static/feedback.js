// The participant's feedback display.
//
// Settings come from the URL (?target=positive&smooth=3&shape=bar&session=S01&color=%23ffaa00
// &background=%23000&track=%23222) over the server's [web] config. The display shows the mean
// of the chosen target over the last `smooth` predictions: a probability 0..1, or the
// intensity -4..+4 mapped to 0..1 (midline = 0). It moves by transitions only.
//
// States (body[data-state]): waiting (nothing yet), live, stale (the newest prediction is older
// than 2 TRs: grey, never shown as live), paused (engine paused: neutral grey, "paused"),
// offline (engine stopped: grey). The TR is measured from the predictions' volume times.
//
// window.__emorecog.updates records every DOM update (sequence, level, wall-clock ms) for the
// tests and the latency benchmark.
"use strict";

(function () {
  const E = window.EmoWeb;
  const url = E.query();
  const body = document.body;
  const display = document.getElementById("display");
  const fill = display.querySelector(".fill");
  const midline = display.querySelector(".midline");
  const TARGETS = ["negative", "neutral", "positive", "intensity"];
  const SHAPES = ["thermometer", "bar", "circle"];
  const FALLBACK_TR = 2.0; // seconds, until two predictions tell the real one
  const LOG_MAX = 5000;

  const record = { updates: [], frames: [], config: null, state: "waiting" };
  window.__emorecog = record;

  let cfg = null;
  let session = url.get("session") || null;
  let values = []; // {sequence, value}
  let recent = []; // the last predictions, for the TR estimate
  let lastSequence = -1;
  let lastReceived = null;
  let status = null;
  let tr = null;
  let level = 0;

  function setting(name, fallback) {
    const v = url.get(name);
    return v === null || v === "" ? fallback : v;
  }

  function colour(value, fallback) {
    return window.CSS && CSS.supports("color", value) ? value : fallback;
  }

  function configure(defaults) {
    const d = defaults || {};
    const target = setting("target", d.target || "positive");
    const shape = setting("shape", d.shape || "thermometer");
    const smooth = parseInt(setting("smooth", d.smooth || 3), 10);
    cfg = {
      target: TARGETS.includes(target) ? target : "positive",
      shape: SHAPES.includes(shape) ? shape : "thermometer",
      smooth: isFinite(smooth) ? E.clamp(smooth, 1, 100) : 3,
      session: setting("session", d.session || ""),
    };
    const root = document.documentElement.style;
    root.setProperty("--fill", colour(setting("color", d.color || "#4fb3d9"), "#4fb3d9"));
    root.setProperty("--background", colour(setting("background", d.background || "#000"), "#000"));
    root.setProperty("--track", colour(setting("track", d.track || "#1c1c1c"), "#1c1c1c"));
    display.className = "shape-" + cfg.shape;
    midline.hidden = !(cfg.target === "intensity" && cfg.shape !== "circle");
    record.config = cfg;
    if (cfg.session && !session) session = cfg.session;
  }

  function targetValue(p) {
    if (cfg.target === "intensity") {
      return E.isNumber(p.intensity) ? E.clamp((p.intensity + 4) / 8, 0, 1) : null;
    }
    const v = p.probabilities ? p.probabilities[cfg.target] : null;
    return E.isNumber(v) ? E.clamp(v, 0, 1) : null;
  }

  function take(p, received) {
    if (p.sequence <= lastSequence) return false; // a duplicate or out of order
    const value = targetValue(p);
    if (value === null) return false;
    lastSequence = p.sequence;
    lastReceived = received;
    values.push({ sequence: p.sequence, value });
    if (values.length > cfg.smooth) values = values.slice(-cfg.smooth);
    recent.push(p);
    if (recent.length > 16) recent = recent.slice(-16);
    const estimate = E.estimateTr(recent);
    if (estimate) tr = estimate;
    return true;
  }

  function draw(sequence) {
    if (!values.length) return;
    level = values.reduce((s, x) => s + x.value, 0) / values.length;
    const move = E.clamp(0.8 * (tr || FALLBACK_TR), 0.3, 1.5);
    fill.style.transitionDuration = move + "s, 1.2s";
    fill.style.transform = cfg.shape === "circle" ? "scale(" + level + ")" : "scaleY(" + level + ")";
    body.dataset.level = level.toFixed(4);
    body.dataset.sequence = String(sequence);
    const t = performance.timeOrigin + performance.now();
    record.updates.push({ sequence, level, t });
    if (record.updates.length > LOG_MAX) record.updates.shift();
    window.requestAnimationFrame(() => {
      record.frames.push({ sequence, t: performance.timeOrigin + performance.now() });
      if (record.frames.length > LOG_MAX) record.frames.shift();
    });
    judge();
  }

  // live / stale / paused / offline / waiting, from the status and the newest prediction's age
  function judge() {
    let state = "waiting";
    const engine = status ? status.state : null;
    if (engine === "paused") state = "paused";
    else if (engine === "offline") state = "offline";
    else if (lastReceived !== null) {
      const age = feed.serverNow() - lastReceived;
      state = age > 2 * (tr || FALLBACK_TR) ? "stale" : "live";
    }
    if (state !== record.state) {
      record.state = state;
      body.dataset.state = state;
    }
  }

  function snapshot(m) {
    configure(m.feedback);
    const sessions = m.sessions || [];
    let chosen = null;
    if (session) chosen = sessions.find((s) => s.session === session) || null;
    else {
      // no session named: the one that predicted most recently
      for (const s of sessions) {
        const last = s.predictions.length ? s.predictions[s.predictions.length - 1].received : -1;
        const best = chosen && chosen.predictions.length
          ? chosen.predictions[chosen.predictions.length - 1].received : -1;
        if (last > best) chosen = s;
      }
      if (chosen) session = chosen.session;
    }
    if (!chosen) {
      judge();
      return;
    }
    status = chosen.status;
    lastSequence = -1;
    values = [];
    recent = [];
    let newest = null;
    for (const p of chosen.predictions) if (take(p, p.received)) newest = p.sequence;
    if (newest !== null) draw(newest);
    judge();
  }

  function prediction(m) {
    if (!cfg) return;
    if (!session) session = m.session;
    if (m.session !== session) return;
    if (take(m.payload, m.received)) draw(m.payload.sequence);
  }

  function onStatus(m) {
    if (!session || m.session !== session) return;
    status = m.payload;
    if (status.state === "offline" || status.state === "starting") lastSequence = -1;
    judge();
  }

  const feed = new E.Feed(url.get("session") || null, {
    snapshot,
    prediction,
    status: onStatus,
    health: judge,
  });
  window.setInterval(judge, 250);
})();
