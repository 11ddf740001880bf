"""The gallery's stylesheet and vanilla-JS renderer, inlined into report.html so it opens from disk.

The renderer reads `window.RF_ROWS` (from the sidecar report-data.js), filters, searches and pages it,
and builds cards with DOM calls only (textContent, never innerHTML), so prompts cannot inject markup.
"""

from __future__ import annotations

PAGE_SIZE = 48

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h1{margin:0 0 .3rem}.muted{color:#666}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;overflow:hidden;overflow-wrap:anywhere}
.card img,.card video{width:100%;height:auto;background:#eee;display:block}.card audio{width:100%}
.card.failed{background:#fee;border-color:#e99}.card.filtered{background:#ffe;border-color:#dd9}
.card .prompt{color:#444;margin:.3rem 0;font-style:italic}.card .reason{color:#a00;font-weight:600}
.card .meta{color:#666}
table{border-collapse:collapse;font-size:12px;margin:.5rem 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
#rf-controls{display:flex;flex-wrap:wrap;gap:8px;align-items:center;position:sticky;top:0;background:#fff;padding:6px 0;z-index:1}
#rf-controls input{min-width:16rem}#rf-pager button{margin:0 2px}
"""

JS = r"""
(function () {
  "use strict";
  const rows = window.RF_ROWS || [];
  const PAGE = %(page_size)d;
  const state = {q: "", status: "", task: "", model: "", reason: "", page: 0};
  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };
  function fillSelect(id, key, label) {
    const counts = new Map();
    for (const r of rows) { const v = r[key] || ""; if (v) counts.set(v, (counts.get(v) || 0) + 1); }
    const sel = $(id);
    sel.appendChild(el("option", {value: ""}, "all " + label));
    for (const [v, n] of [...counts.entries()].sort()) sel.appendChild(el("option", {value: v}, v + " (" + n + ")"));
    sel.addEventListener("change", () => { state[key] = sel.value; state.page = 0; render(); });
  }
  function matches(r) {
    if (state.status && r.status !== state.status) return false;
    if (state.task && r.task !== state.task) return false;
    if (state.model && r.model !== state.model) return false;
    if (state.reason && r.reason !== state.reason) return false;
    if (state.q) {
      const q = state.q;
      if (!(r.id.toLowerCase().includes(q) || (r.prompt || "").toLowerCase().includes(q))) return false;
    }
    return true;
  }
  function media(r) {
    if (r.thumb) {
      const img = el("img", {src: r.thumb, alt: r.id, loading: "lazy"});
      if (!r.href) return img;
      const a = el("a", {href: r.href}); a.appendChild(img); return a;
    }
    if (r.kind === "video" && r.href) return el("video", {src: r.href, controls: "", muted: "", loop: "", preload: "metadata"});
    if (r.kind === "audio" && r.href) return el("audio", {src: r.href, controls: "", preload: "metadata"});
    return null;
  }
  function card(r) {
    const c = el("div", {"class": "card " + r.status, "data-id": r.id});
    const m = media(r);
    if (m) c.appendChild(m);
    const head = el("div"); head.appendChild(el("b", {}, r.id)); c.appendChild(head);
    if (r.prompt) c.appendChild(el("div", {"class": "prompt"}, r.prompt));
    if (r.status !== "ok") c.appendChild(el("div", {"class": "reason"}, r.status + (r.reason ? ": " + r.reason : "")));
    if (r.error) c.appendChild(el("div", {"class": "error"}, r.error));
    const meta = [r.task, r.model, r.size, r.seed !== null && r.seed !== undefined ? "seed " + r.seed : ""].filter(Boolean);
    c.appendChild(el("div", {"class": "meta"}, meta.join(" · ")));
    if (r.href) { const a = el("a", {href: r.href, "class": "full"}, "full size"); c.appendChild(a); }
    return c;
  }
  function render() {
    const hits = rows.filter(matches);
    const pages = Math.max(1, Math.ceil(hits.length / PAGE));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const grid = $("rf-grid");
    grid.replaceChildren(...hits.slice(state.page * PAGE, (state.page + 1) * PAGE).map(card));
    $("rf-count").textContent = String(hits.length);
    $("rf-page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("rf-prev").disabled = $("rf-first").disabled = state.page === 0;
    $("rf-next").disabled = $("rf-last").disabled = state.page >= pages - 1;
  }
  fillSelect("rf-status", "status", "statuses");
  fillSelect("rf-task", "task", "tasks");
  fillSelect("rf-model", "model", "models");
  fillSelect("rf-reason", "reason", "failure reasons");
  $("rf-search").addEventListener("input", (e) => { state.q = e.target.value.trim().toLowerCase(); state.page = 0; render(); });
  $("rf-first").addEventListener("click", () => { state.page = 0; render(); });
  $("rf-prev").addEventListener("click", () => { state.page -= 1; render(); });
  $("rf-next").addEventListener("click", () => { state.page += 1; render(); });
  $("rf-last").addEventListener("click", () => { state.page = 1e9; render(); });
  $("rf-total").textContent = String(rows.length);
  render();
  document.body.setAttribute("data-rf-ready", "1");
})();
"""


def script(page_size: int = PAGE_SIZE) -> str:
    """The renderer with its page size filled in."""
    return JS % {"page_size": page_size}


CONTROLS = """
<div id="rf-controls">
<input id="rf-search" type="search" placeholder="search id or prompt">
<select id="rf-status"></select><select id="rf-task"></select><select id="rf-model"></select><select id="rf-reason"></select>
<span><b id="rf-count">0</b> of <span id="rf-total">0</span> rows</span>
<span id="rf-pager"><button id="rf-first">« first</button><button id="rf-prev">‹ prev</button>
<span id="rf-page"></span><button id="rf-next">next ›</button><button id="rf-last">last »</button></span>
</div>
<div id="rf-grid" class="grid"></div>
"""
