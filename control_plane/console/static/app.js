// The fleet console: one EventSource per page, every value rendered as text with DOM APIs.
// Never an HTML string: labels and errors come from devices and must stay text (textContent only).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let source = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = String(value);
    else if (key === "class") node.className = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "never";
}

function pct(x) { return `${(100 * (x || 0)).toFixed(1)}%`; }

function table(headers, rows, testid) {
  const head = el("tr", {}, ...headers.map((h) => el("th", {text: h})));
  const t = el("table", testid ? {"data-testid": testid} : {}, el("thead", {}, head));
  const body = el("tbody");
  for (const row of rows) body.append(row);
  t.append(body);
  return t;
}

function sparkline(points, width, height) {
  const box = svg("svg", {class: "spark", width, height, viewBox: `0 0 ${width} ${height}`, role: "img"});
  if (!points || points.length < 2) {
    box.append(svg("line", {x1: 0, y1: height - 1, x2: width, y2: height - 1, stroke: "#ccd"}));
    return box;
  }
  const max = Math.max(...points, 1e-9);
  const step = width / (points.length - 1);
  const coords = points.map((p, i) => `${(i * step).toFixed(1)},${(height - 1 - (p / max) * (height - 2)).toFixed(1)}`);
  box.append(svg("polyline", {points: coords.join(" ")}));
  const title = svg("title");
  title.textContent = `p99 ${points[points.length - 1].toFixed(2)} ms (max ${max.toFixed(2)})`;
  box.append(title);
  return box;
}

function chips(labels) {
  return el("span", {}, ...Object.entries(labels || {}).map(([k, v]) => el("span", {class: "chip", text: `${k}=${v}`})));
}

function waveBar(rollout, wave) {
  const bar = el("div", {class: "bar", title: `wave ${wave.index + 1}: ${wave.state}`});
  const done = (wave.counts.healthy || 0);
  for (const state of ["healthy", "desired", "failed", "skipped", "rolled_back"]) {
    const n = wave.counts[state] || 0;
    if (!n) continue;
    const part = el("div", {class: state});
    part.style.width = `${(100 * n) / Math.max(wave.size, 1)}%`;
    bar.append(part);
  }
  return el("div", {class: "wave", "data-testid": `wave-${rollout.id}-${wave.index}`, "data-healthy": done,
                    "data-size": wave.size, "data-state": wave.state},
            el("span", {text: `wave ${wave.index + 1}`}), bar,
            el("span", {text: `${done}/${wave.size} healthy, ${wave.state}`}));
}

function rolloutBox(r, withEvents) {
  const box = el("div", {class: "rollout", "data-testid": `rollout-${r.id}`},
    el("div", {}, el("strong", {text: r.id}), ` ${r.artifact} `, el("span", {class: "chip", text: r.state}),
       ` started by ${r.created_by || "?"} at ${when(r.created_at)} on ${r.selector}`),
    el("div", {class: "muted", text: `gates: waves ${r.gates.waves.join(", ")}; max failures ${r.gates.max_failures}; ` +
       `health timeout ${r.gates.health_timeout_s}s; soak ${r.gates.soak_s}s; max error rate ${r.gates.max_error_rate}; ` +
       `max p99 ${r.gates.max_p99_ms} ms; failures so far ${r.failures}`}));
  for (const w of r.waves) box.append(waveBar(r, w));
  if (r.reason) box.append(el("div", {class: "muted", text: r.reason}));
  if (withEvents && r.events) {
    box.append(table(["at", "event", "wave", "device", "message"], r.events.map((e) => el("tr", {},
      el("td", {text: when(e.at)}), el("td", {text: e.kind}), el("td", {text: e.wave >= 0 ? e.wave + 1 : ""}), el("td", {text: e.device}),
      el("td", {text: e.message})))));
  }
  return box;
}

function deviceLink(id) {
  return el("a", {href: `#/device/${encodeURIComponent(id)}`, text: id});
}

function renderOverview(v) {
  const states = v.states || {};
  const cards = el("div", {class: "cards"},
    ...[["devices", v.total], ["online", states.online || 0], ["offline", states.offline || 0],
        ["healthy", states["health:ok"] || 0], ["degraded", states["health:degraded"] || 0],
        ["failing", states["health:failing"] || 0]].map(([k, n]) =>
      el("div", {class: "card", "data-testid": `count-${k}`}, el("div", {class: "n", text: n}), el("div", {text: k}))));
  const parts = [el("h2", {text: "Fleet"}), cards];
  if (v.rollouts.length) parts.push(el("h2", {text: "Rollouts in progress"}), ...v.rollouts.map((r) => rolloutBox(r, false)));
  const max = Math.max(1, ...v.matrix.rows.flatMap((r) => r.counts));
  parts.push(el("h2", {text: "Versions by label"}), table(["label", ...v.matrix.columns], v.matrix.rows.map((row) =>
    el("tr", {}, el("td", {text: row.label}), ...row.counts.map((n) => {
      const cell = el("td", {class: "heat", text: n || ""});
      if (n) cell.style.backgroundColor = `rgba(43, 95, 173, ${(0.15 + 0.6 * n / max).toFixed(2)})`;
      return cell;
    }))), "matrix"));
  if (v.matrix.rows_left_out) parts.push(el("p", {class: "muted", text: `and ${v.matrix.rows_left_out} rarer labels`}));
  parts.push(el("h2", {text: "Devices"}), table(
    ["device", "state", "health", "versions", "labels", "p99 ms", "latency", "burst", "errors", "last seen"],
    v.devices.map((d) => el("tr", {"data-testid": `device-${d.id}`},
      el("td", {}, deviceLink(d.id)), el("td", {class: d.online ? "ok" : "bad", text: d.online ? "online" : "offline"}),
      el("td", {text: d.health}), el("td", {"data-testid": `versions-${d.id}`, text: d.versions.join(" ")}),
      el("td", {}, chips(d.labels)), el("td", {"data-testid": `p99-${d.id}`, text: d.p99_ms.toFixed(2)}), el("td", {}, sparkline(d.spark, 120, 22)),
      el("td", {text: pct(d.burst_share)}), el("td", {text: pct(d.error_rate)}), el("td", {text: when(d.last_seen)}))),
    "devices"));
  if (v.truncated) parts.push(el("p", {class: "muted", text: `and ${v.truncated} more devices`}));
  return parts;
}

function renderDevice(d) {
  return [
    el("h2", {text: `Device ${d.id}`}),
    el("div", {class: "cards"},
      ...[["state", d.online ? "online" : "offline"], ["health", d.health], ["p99 ms", d.p99_ms.toFixed(2)],
          ["requests", d.requests], ["burst share", pct(d.burst_share)], ["error rate", pct(d.error_rate)],
          ["agent", d.agent_version || "?"], ["generation", `${d.generation.observed}/${d.generation.desired}`]]
        .map(([k, n]) => el("div", {class: "card"}, el("div", {class: "n", text: n}), el("div", {text: k})))),
    el("p", {}, "labels: ", chips(d.labels)),
    el("p", {}, "last error: ", el("span", {class: d.last_error ? "bad" : "muted", "data-testid": "last-error",
                                              text: d.last_error || "none"})),
    el("h2", {text: "Latency (p99 per report)"}), sparkline(d.spark, 480, 80),
    el("h2", {text: "Models"}), table(["name", "version", "digest", "smoke test", "input drift (PSI)", "refused"], d.models.map((m) =>
      el("tr", {}, el("td", {text: m.name}), el("td", {text: `v${m.version}`}), el("td", {text: m.digest.slice(0, 19)}),
         el("td", {text: m.smoke_test_passed ? "passed" : "not passed"}),
         el("td", {text: m.drift === null || m.drift === undefined ? "-" : m.drift.toFixed(3)}),
         el("td", {text: m.failed_digest ? `${m.failed_digest.slice(0, 19)}: ${m.failure_reason}` : ""}))), "models"),
    el("h2", {text: "Recent rollout events"}), table(["at", "rollout", "event", "message"], d.events.map((e) =>
      el("tr", {}, el("td", {text: when(e.at)}), el("td", {text: e.rollout}), el("td", {text: e.kind}),
         el("td", {text: e.message})))),
  ];
}

function renderRollouts(v) {
  const parts = [el("h2", {text: "Rollouts"})];
  if (!v.rollouts.length) parts.push(el("p", {class: "muted", text: "no rollouts yet"}));
  parts.push(...v.rollouts.map((r) => rolloutBox(r, true)));
  if (v.audit) {
    parts.push(el("h2", {text: "Audit trail (admin)"}), table(["at", "who", "action", "target", "outcome"],
      v.audit.map((a) => el("tr", {}, el("td", {text: when(a.at)}), el("td", {text: a.identity}),
        el("td", {text: a.action}), el("td", {text: a.target}), el("td", {text: a.outcome})))));
  }
  return parts;
}

function renderArtifacts(v) {
  return [el("h2", {text: "Artifacts"}), table(
    ["artifact", "digest", "size", "parent", "source model", "profile", "metrics", "signed by", "uploaded"],
    v.artifacts.map((a) => el("tr", {},
      el("td", {text: `${a.name}:v${a.version}${a.pinned ? " (pinned)" : ""}`}), el("td", {text: a.digest.slice(0, 19)}),
      el("td", {text: `${(a.size / 1024).toFixed(1)} KiB`}), el("td", {text: a.parent_version ? `v${a.parent_version}` : "-"}),
      el("td", {text: (a.source_model_sha256 || "").slice(0, 12)}), el("td", {text: a.target_profile || ""}),
      el("td", {}, chips(Object.fromEntries(Object.entries(a.metrics || {}).map(([k, m]) => [k, JSON.stringify(m)])))),
      el("td", {text: a.signed_by.join(", ")}), el("td", {text: `${a.uploaded_by} ${when(a.uploaded_at)}`}))),
    "artifacts")];
}

function page() {
  const hash = window.location.hash.replace(/^#\/?/, "");
  if (hash.startsWith("device/")) return `device/${decodeURIComponent(hash.slice(7))}`;
  return hash === "rollouts" || hash === "artifacts" ? hash : "overview";
}

function render(name, view) {
  const app = document.getElementById("app");
  if (view.error) { app.replaceChildren(el("p", {class: "bad", text: view.error})); return; }
  const renderers = {overview: renderOverview, rollouts: renderRollouts, artifacts: renderArtifacts};
  app.replaceChildren(...(name.startsWith("device/") ? renderDevice(view) : renderers[name](view)));
}

async function needLogin() {
  const who = await fetch("/api/whoami", {credentials: "same-origin"});
  if (who.status === 401) window.location.assign("/login");
  return who.ok ? who.json() : null;
}

function watch() {
  if (source) source.close();
  const name = page();
  const live = document.getElementById("live");
  document.getElementById("app").replaceChildren(el("p", {class: "muted", text: "loading"}));  // never a stale page
  source = new EventSource(`/api/stream?page=${encodeURIComponent(name)}`);
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  source.onmessage = (event) => render(name, JSON.parse(event.data));
  source.addEventListener("auth", () => { source.close(); window.location.assign("/login"); });
  source.onerror = () => { live.textContent = "reconnecting"; live.className = "live"; needLogin(); };
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/api/logout", {method: "POST", credentials: "same-origin"});
  window.location.assign("/login");
});
window.addEventListener("hashchange", watch);
needLogin().then((who) => {
  if (who) document.getElementById("who").textContent = `${who.subject} (${who.role})`;
  watch();
});
