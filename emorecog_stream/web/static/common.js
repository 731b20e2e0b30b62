// Shared by both pages: the event stream from the server, the server's clock, small helpers.
// Everything that came from a message is put into the page with textContent (never as markup):
// marker texts, session ids and model ids are written by others and may hold anything.
"use strict";

(function () {
  const CATEGORIES = ["negative", "neutral", "positive"];

  function query() {
    return new URLSearchParams(window.location.search);
  }

  function eventsUrl(session) {
    const q = new URLSearchParams();
    if (session) q.set("session", session);
    const token = query().get("token");
    if (token) q.set("token", token);
    const s = q.toString();
    return "events" + (s ? "?" + s : "");
  }

  // One EventSource; it reconnects by itself (the server asks for 1 s), and once more from
  // here if the browser gave up on it. Every message that carries server_time updates the
  // offset between this browser's clock and the server's, so ages are measured on one clock.
  class Feed {
    constructor(session, handlers) {
      this.session = session;
      this.handlers = handlers;
      this.offsetMs = 0;
      this.connected = false;
      this.source = null;
      this.open();
    }

    open() {
      const source = new EventSource(eventsUrl(this.session));
      this.source = source;
      source.onopen = () => {
        this.connected = true;
        if (this.handlers.connection) this.handlers.connection(true);
      };
      source.onerror = () => {
        this.connected = false;
        if (this.handlers.connection) this.handlers.connection(false);
        if (source.readyState === EventSource.CLOSED) {
          window.setTimeout(() => this.open(), 2000);
        }
      };
      source.onmessage = (event) => {
        let message;
        try {
          message = JSON.parse(event.data);
        } catch (err) {
          return;
        }
        if (typeof message.server_time === "number") {
          this.offsetMs = message.server_time * 1000 - Date.now();
        }
        const handler = this.handlers[message.type];
        if (handler) handler(message);
      };
    }

    serverNow() {
      return (Date.now() + this.offsetMs) / 1000;
    }
  }

  // TR from the predictions themselves: the median volume-time step per TR index step.
  function estimateTr(predictions) {
    const steps = [];
    for (let i = predictions.length - 1; i > 0 && steps.length < 15; i--) {
      const a = predictions[i - 1];
      const b = predictions[i];
      const dn = b.tr_index - a.tr_index;
      const dt = b.volume_timestamp - a.volume_timestamp;
      if (dn > 0 && dt > 0) steps.push(dt / dn);
    }
    if (!steps.length) return null;
    steps.sort((x, y) => x - y);
    return steps[Math.floor(steps.length / 2)];
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function isNumber(x) {
    return typeof x === "number" && isFinite(x);
  }

  function fmt(x, digits, unit) {
    if (!isNumber(x)) return "–";
    return x.toFixed(digits) + (unit ? " " + unit : "");
  }

  function clamp(x, lo, hi) {
    return Math.min(hi, Math.max(lo, x));
  }

  window.EmoWeb = { CATEGORIES, Feed, estimateTr, el, fmt, isNumber, clamp, query };
})();
