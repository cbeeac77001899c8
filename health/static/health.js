// Keeps the health page fresh: polls api/v1/state every refresh period and re-renders the same
// markup as templates/index.html (which is what a browser without JavaScript keeps showing).
// Every peer-supplied string goes in as text, never as HTML.
"use strict";

(function () {
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "style") el.style.cssText = value;
      else el.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  // the display helpers of health/view.py
  const shortId = (id) => (id.length > 8 ? "…" + id.slice(-7) : id);
  function fmtThroughput(v) {
    if (v >= 10) return Math.round(v).toLocaleString("en-US") + " tok/s";
    return v > 0 ? v.toFixed(1) + " tok/s" : "—";
  }
  function fmtTokens(v) {
    if (v >= 1e6) return (v / 1e6).toFixed(1) + "M";
    return v >= 1e4 ? (v / 1e3).toFixed(1) + "k" : String(v);
  }
  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const ms = seconds * 1000;
    return ms < 100 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms";
  }
  function fmtTime(unix) {
    if (unix === null || unix === undefined) return "not yet";
    return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function fmtPings(pings) {
    return Object.entries(pings).sort((a, b) => a[1] - b[1]).map(([p, rtt]) => shortId(p) + " " + fmtMs(rtt)).join(", ");
  }
  function spans(blocks) { // swarm.routing.format_blocks: [0, 1, 2, 5] -> "0:3, 5:6"
    const out = [];
    for (const b of blocks) {
      const last = out[out.length - 1];
      if (last && last[1] === b) last[1] = b + 1; else out.push([b, b + 1]);
    }
    return out.map(([a, b]) => a + ":" + b).join(", ");
  }
  const plural = (n, word) => n + " " + word + (n !== 1 ? "s" : "");

  function renderSummary(doc) {
    const el = document.getElementById("summary");
    el.replaceChildren();
    if (doc.updated_at === null) { el.append("Crawling the swarm…"); return; }
    const models = doc.models, healthy = models.filter((m) => m.state === "healthy").length;
    const servers = models.reduce((n, m) => n + m.servers.length, 0);
    el.append(plural(models.length, "model") + " · ", h("span", { class: "ok" }, healthy + " healthy"));
    if (models.length > healthy) el.append(" · ", h("span", { class: "bad" }, models.length - healthy + " broken"));
    el.append(" · " + servers + " servers");
    document.title = "Swarm health — " + healthy + "/" + models.length + " models healthy";
  }

  function renderMeta(doc) {
    const el = document.getElementById("meta");
    el.replaceChildren("Updated ", h("time", { id: "updated", "data-ts": doc.updated_at ?? "" }, fmtTime(doc.updated_at)));
    if (doc.crawl_duration !== null) el.append(" · crawl took " + fmtMs(doc.crawl_duration));
    el.append(" · ", h("a", { href: "api/v1/state" }, "JSON"), " · ", h("a", { href: "metrics" }, "metrics"));
  }

  function serverRows(model, s, showIps) {
    const n = model.num_blocks;
    const pingTitle = Object.keys(s.next_pings).length
      ? "next servers: " + fmtPings(s.next_pings) : "no pings to next servers announced";
    const rows = [h("tr", { class: "server " + s.state, "data-peer-id": s.peer_id, "data-state": s.state,
                            "data-span": s.start + ":" + s.end },
      h("td", { class: "mono", title: s.peer_id }, shortId(s.peer_id)),
      h("td", { class: "name" }, s.public_name || "—", Object.keys(s.reported_by).length
        ? [" ", h("span", { class: "bad reported", title: Object.values(s.reported_by).join("; ") },
                 "reported by " + Object.keys(s.reported_by).length)] : null),
      h("td", {}, h("span", { class: "state " + s.state, title: s.probe_error }, s.state)),
      h("td", { class: "span-col" }, h("div", { class: "span-cell" },
        h("div", { class: "span-bar", style: "--n: " + n, title: "blocks " + s.start + ":" + s.end },
          h("div", { class: "seg " + s.state,
                     style: "left: " + (100 * s.start / n) + "%; width: " + (100 * (s.end - s.start) / n) + "%" })),
        h("span", { class: "span-text mono" }, s.start + ":" + s.end))),
      h("td", { class: "num" }, fmtThroughput(s.throughput)),
      h("td", { class: "mono" }, s.dtype + (s.quant !== "none" ? "/" + s.quant : "")),
      h("td", { title: s.device_name }, s.device),
      h("td", { class: "num", title: s.cache_tokens_left + " tokens" }, fmtTokens(s.cache_tokens_left)),
      h("td", { class: "mono" }, s.version || "—"),
      h("td", {}, s.using_relay ? "relay" : "direct"),
      h("td", { class: "num", title: pingTitle }, fmtMs(s.ping),
        Object.keys(s.next_pings).length ? [" ", h("span", { class: "dim" }, "+" + Object.keys(s.next_pings).length)] : null))];
    if (showIps && s.addrs && s.addrs.length) {
      rows.push(h("tr", { class: "addrs" }, h("td"), h("td", { colspan: 10, class: "mono dim" }, s.addrs.join("  "))));
    }
    return rows;
  }

  function renderModel(model, showIps) {
    const online = model.servers_by_state.online;
    const head = h("div", { class: "model-head" },
      h("h2", {}, model.prefix),
      h("span", { class: "badge " + model.state }, model.state),
      h("span", { class: "model-meta" }, [model.family, plural(model.num_blocks, "block"),
        "min " + plural(model.min_replicas, "replica"), plural(online, "online server")]
        .concat(model.throughput > 0 ? [fmtThroughput(model.throughput)] : []).join(" · ")),
      model.name !== model.prefix ? h("span", { class: "model-name", title: "the name servers were started with" }, model.name) : null);
    const missing = model.missing_blocks;
    const problem = missing.length ? h("p", { class: "problem" },
      "Blocks " + spans(missing) + " have no online server, so clients cannot run this model. Fix: ",
      h("code", {}, model.fix_command)) : null;
    const cells = model.replicas.map((count, i) => h("span", {
      class: "cell r" + Math.min(count, 3) + " " + model.block_states[i],
      title: "block " + i + ": " + plural(count, "online server") + (count === 0 ? " (" + model.block_states[i] + ")" : ""),
    }, count));
    const replicas = h("div", { class: "replicas", style: "--n: " + model.num_blocks },
      h("span", { class: "label" }, "Replicas per block"), h("div", { class: "cells" + (model.num_blocks > 40 ? " dense" : "") }, cells),
      h("div", { class: "axis" + (model.num_blocks > 32 ? " dense" : "") },
        Array.from({ length: model.num_blocks }, (_, i) => h("span", {}, i))));
    const headers = ["Peer", "Name", "State", "Blocks", "Throughput", "Dtype", "Device", "Cache left", "Version", "Link", "Ping"];
    const numeric = new Set(["Throughput", "Cache left", "Ping"]);
    const thead = h("thead", {}, h("tr", {}, headers.map((t) =>
      h("th", { class: t === "Blocks" ? "span-col" : numeric.has(t) ? "num" : null }, t))));
    const body = model.servers.length ? model.servers.map((s) => serverRows(model, s, showIps))
      : [h("tr", { class: "none" }, h("td", { colspan: 11 }, "No server has announced blocks of this model."))];
    return h("section", { class: "model " + model.state, "data-prefix": model.prefix }, head, problem, replicas,
      h("div", { class: "table-wrap" }, h("table", { class: "servers" }, thead, h("tbody", {}, body))));
  }

  function render(doc) {
    renderSummary(doc);
    renderMeta(doc);
    const main = document.getElementById("models");
    const parts = [];
    if (doc.crawl_error) {
      parts.push(h("p", { class: "alert" }, "The last crawl failed: " + doc.crawl_error +
        ". Showing the previous state; the next crawl is in " + doc.refresh_period + " s."));
    }
    if (doc.updated_at === null) {
      parts.push(h("p", { class: "empty" }, "The first crawl of the swarm is running; this page fills in when it ends."));
    } else if (!doc.models.length) {
      parts.push(h("p", { class: "empty" }, "No models in the swarm's model index yet. Servers list their model when they start: ",
        h("code", {}, "swarm serve --model … --initial-peers …")));
    }
    for (const model of doc.models) parts.push(renderModel(model, doc.show_ips));
    main.replaceChildren(...parts);
    document.body.dataset.renderedBy = "js";
  }

  function tick() { // "Updated … (12 s ago)" between polls
    const el = document.getElementById("updated");
    const ts = el && parseFloat(el.dataset.ts);
    if (!ts) return;
    const ago = Math.max(0, Math.round(Date.now() / 1000 - ts));
    const text = ago < 120 ? ago + " s" : ago < 7200 ? Math.round(ago / 60) + " min"
      : ago < 172800 ? Math.round(ago / 3600) + " h" : Math.round(ago / 86400) + " days";
    el.textContent = fmtTime(ts) + " (" + text + " ago)";
  }

  async function poll() {
    try {
      const response = await fetch("api/v1/state", { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      render(await response.json());
      document.body.classList.remove("stale");
    } catch (err) {
      document.body.classList.add("stale"); // the service is down or restarting: keep the last view
    }
    tick();
  }

  const period = Math.max(1, parseFloat(document.body.dataset.refresh) || 15);
  poll();
  setInterval(poll, period * 1000);
  setInterval(tick, 1000);
})();
