// neuronmap viewer: charts against depth, the "/" shortcut, the similar-vectors panel and the steering panel.
// Data from the server is only ever placed with textContent or SVG attributes, never parsed as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fd6", "#d6572f", "#2fa86b", "#8a4fd6", "#c99a1a", "#1aa3b8", "#b8326b"];

function el(tag, attrs = {}, text = null, ns = null) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

function repr(t) {
  // As Python's repr: the viewer shows every token the way the CLI does (double quotes when only ' occurs).
  const q = t.includes("'") && !t.includes('"') ? '"' : "'";
  let s = "";
  for (const ch of t) {
    const c = ch.codePointAt(0);
    if (ch === "\\") s += "\\\\";
    else if (ch === q) s += "\\" + q;
    else if (ch === "\n") s += "\\n";
    else if (ch === "\r") s += "\\r";
    else if (ch === "\t") s += "\\t";
    else if (c < 0x20 || (c >= 0x7f && c < 0xa0)) s += "\\x" + c.toString(16).padStart(2, "0");
    else s += ch;
  }
  return q + s + q;
}

function tok(t) { return el("code", { class: "tok" }, repr(t)); }

// ------------------------------------------------------------------ charts

function lineChart(box, spec) {
  box.replaceChildren();
  const W = box.clientWidth || 800, H = box.clientHeight || 300, m = { l: 48, r: 110, t: 10, b: 30 };
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.label }, null, SVG);
  const pts = spec.series.flatMap(s => s.points.filter(p => p[1] !== null));
  if (!pts.length) { box.append(el("p", {}, "no data")); return; }
  const xs = pts.map(p => p[0]), ys = pts.map(p => p[1]);
  // Shares start at 0 unless the chart asks for a close-up (agreement near 1 would be a flat line at the top).
  const lo = Math.min(...ys), hi = Math.max(...ys);
  const y0 = spec.zero === false ? Math.max(0, lo - 0.1 * ((hi - lo) || 0.1)) : Math.min(0, lo), y1 = hi > y0 ? hi : y0 + 1;
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const X = x => m.l + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = y => H - m.b - (y - y0) / (y1 - y0 || 1) * (H - m.t - m.b);
  const axis = el("g", { class: "axis" }, null, SVG);
  axis.append(el("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }, null, SVG));
  axis.append(el("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b }, null, SVG));
  for (let i = 0; i <= 4; i++) {
    const v = y0 + (y1 - y0) * i / 4;
    axis.append(el("text", { x: m.l - 6, y: Y(v) + 4, "text-anchor": "end" }, fmt(v), SVG));
  }
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let x = x0; x <= x1; x += step) axis.append(el("text", { x: X(x), y: H - m.b + 16, "text-anchor": "middle" }, String(x), SVG));
  axis.append(el("text", { x: (W - m.r + m.l) / 2, y: H - 2, "text-anchor": "middle" }, "layer", SVG));
  svg.append(axis);
  const tip = el("div", { class: "tip", hidden: "" });
  spec.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const g = el("g", { "data-series": s.name }, null, SVG);
    const d = s.points.filter(p => p[1] !== null).map((p, j) => (j ? "L" : "M") + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join("");
    g.append(el("path", { class: "line", d, stroke: color }, null, SVG));
    for (const p of s.points.filter(p => p[1] !== null)) {
      const c = el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: color }, null, SVG);
      c.addEventListener("mouseenter", () => {
        tip.textContent = `${s.name}, layer ${p[0]}\n${spec.label}: ${fmt(p[1])}`;
        tip.hidden = false; tip.style.left = (X(p[0]) + 8) + "px"; tip.style.top = (Y(p[1]) - 10) + "px";
      });
      c.addEventListener("mouseleave", () => { tip.hidden = true; });
      g.append(c);
    }
    svg.append(g);
    const lg = el("g", { class: "legend", transform: `translate(${W - m.r + 12},${m.t + 16 * i + 8})` }, null, SVG);
    lg.append(el("rect", { width: 10, height: 10, y: -9, fill: color }, null, SVG));
    lg.append(el("text", { x: 14 }, s.name, SVG));
    lg.addEventListener("click", () => { g.classList.toggle("off"); lg.classList.toggle("off"); });
    svg.append(lg);
  });
  box.append(svg, tip);
}

function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3); }

function initCharts() {
  for (const box of document.querySelectorAll(".chart[data-source]")) {
    const data = JSON.parse(document.getElementById(box.dataset.source).textContent);
    const select = document.getElementById(box.dataset.select);
    const draw = () => lineChart(box, data[select.value]);
    select.addEventListener("change", draw);
    draw();
  }
}

// ------------------------------------------------------------------ similar vectors

async function initSimilar() {
  const box = document.getElementById("similar");
  if (!box) return;
  const res = await fetch(box.dataset.src);
  const data = await res.json();
  box.replaceChildren();
  if (!res.ok) { box.append(el("p", { class: "error" }, "error: " + data.error)); return; }
  const atlas = box.dataset.atlas;
  const byMatrix = {};
  for (const r of data.rows) (byMatrix[r.matrix] = byMatrix[r.matrix] || []).push(r);
  const wrap = el("div", { class: "cards" });
  for (const [matrix, rows] of Object.entries(byMatrix)) {
    const card = el("section", { class: "card" });
    card.append(el("h3", {}, matrix));
    const table = el("table");
    const head = el("tr");
    for (const h of ["neuron", "cosine", "pole", "top token", "p"]) head.append(el("th", {}, h));
    table.append(head);
    for (const r of rows) {
      const tr = el("tr");
      const a = el("a", { href: "/neuron/" + r.id + (atlas ? "?atlas=" + encodeURIComponent(atlas) : "") }, r.id);
      const cells = [a, document.createTextNode(r.cosine.toFixed(3)), document.createTextNode(r.pole), tok(r.top_token),
                     document.createTextNode(r.top_prob === null ? "–" : r.top_prob.toFixed(3))];
      for (const c of cells) { const td = el("td"); td.append(c); tr.append(td); }
      table.append(tr);
    }
    card.append(table);
    wrap.append(card);
  }
  box.append(wrap, el("p", { class: "sub" }, `${data.n_compared.toLocaleString()} vectors per matrix, ${data.seconds.toFixed(2)} s`));
}

// ------------------------------------------------------------------ steering

function initSteer() {
  const form = document.getElementById("steer");
  if (!form) return;
  const status = document.getElementById("steer-status"), out = document.getElementById("steer-result");
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    const f = new FormData(form);
    const body = { atlas: form.dataset.atlas, neuron: form.dataset.neuron, value: f.get("value"), positions: f.get("positions"),
                   concept: f.get("concept"), text: f.get("text"), chat: f.get("chat") === "on", n: f.get("n") };
    status.className = "status"; status.textContent = "submitting…"; out.replaceChildren();
    const res = await fetch("/api/steer", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const job = await res.json();
    if (!res.ok) { status.className = "status error"; status.textContent = "error: " + job.error; return; }
    poll(job.id, status, out);
  });
}

async function poll(id, status, out) {
  const res = await fetch("/api/jobs/" + id);
  const job = await res.json();
  if (!res.ok) { status.className = "status error"; status.textContent = "error: " + job.error; return; }
  status.dataset.state = job.state;
  if (job.state === "queued") status.textContent = `queued: ${job.position} job(s) ahead (job ${job.id})`;
  else if (job.state === "running") status.textContent = `running step ${job.step + 1} of ${job.steps.length}: ${job.steps[job.step]} (${job.seconds.toFixed(1)} s)`;
  else if (job.state === "done") status.textContent = `done in ${job.seconds.toFixed(1)} s (job ${job.id})`;
  else { status.className = "status error"; status.textContent = "error: " + job.error; }
  renderSteer(job, out);
  if (job.state === "queued" || job.state === "running") setTimeout(() => poll(id, status, out), 500);
}

function renderSteer(job, out) {
  out.replaceChildren();
  const c = job.results.clamp, g = job.results.generate;
  if (c) {
    const s = c.settings[0];
    const box = el("section", { class: "clamp-result" });
    box.append(el("h3", {}, `P(${c.concept.concept}) on ${c.prompts.length} neutral prompts`));
    const t = el("table");
    const rows = [["", "mean p", "ratio", "prompts raised", "KL on reference (nats/token)"],
                  ["baseline", c.baseline.mean_prob.toFixed(4), "1.00x", "–", "0"],
                  [s.label, s.mean_prob.toFixed(4), s.ratio === null ? "inf" : s.ratio.toFixed(2) + "x",
                   `${s.raised}/${c.prompts.length}`, s.kl === null ? "–" : s.kl.toFixed(3)]];
    rows.forEach((r, i) => {
      const tr = el("tr");
      for (const cell of r) tr.append(el(i ? "td" : "th", {}, cell));
      if (i === 2) tr.className = "clamped";
      t.append(tr);
    });
    box.append(t);
    out.append(box);
  }
  if (g) {
    const box = el("section", { class: "generate-result" });
    box.append(el("h3", {}, `${g.chat ? "Chat" : "Prompt"}: ${g.text}`));
    if (g.notice) box.append(el("p", { class: "notice" }, g.notice));
    const cols = el("div", { class: "steer-cols" });
    for (const [label, xs] of [["baseline", g.baseline], ["clamped " + g.clamp, g.clamped]]) {
      const col = el("div", { class: label === "baseline" ? "baseline" : "clamped" });
      col.append(el("h4", {}, label));
      const ol = el("ol");
      for (const x of xs) ol.append(el("li", {}, x));
      col.append(ol);
      cols.append(col);
    }
    box.append(cols);
    for (const s of g.shares) box.append(el("p", {}, `samples mentioning '${s.concept}': baseline ${(100 * s.baseline).toFixed(0)}%, clamped ${(100 * s.clamped).toFixed(0)}%`));
    out.append(box);
  }
}

// ------------------------------------------------------------------ keyboard

document.addEventListener("keydown", ev => {
  const t = ev.target;
  if (ev.key === "/" && !(t instanceof HTMLInputElement || t instanceof HTMLTextAreaElement || t instanceof HTMLSelectElement)) {
    ev.preventDefault();
    const q = document.getElementById("q");
    q.focus(); q.select();
  }
});

initCharts();
initSimilar();
initSteer();
