"""The HTML of ``mmcli report``'s page: markup, style and script, with ``{{FIELD}}`` slots that
:func:`mmcli.report.render_page` fills (escaped)."""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src 'self' data: file:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{{TITLE}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{background:#1d2733;color:#fff;padding:10px 16px}
header h1{font-size:18px;margin:0 0 4px}
dl{display:flex;flex-wrap:wrap;gap:2px 14px;margin:0;font-size:12px;color:#cfd8e3}
dt{font-weight:600}dd{margin:0 8px 0 0}
#bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:8px 16px;display:flex;
flex-wrap:wrap;gap:8px 14px;align-items:center;z-index:1}
#bar label{font-size:12px;color:#555}#bar input[type=number]{width:5em}
main{padding:12px 16px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.case{background:#fff;border:1px solid #ddd;border-radius:4px;padding:4px;font-size:12px}
.case img,.case .none{display:block;width:100%;height:200px;object-fit:contain;background:#000}
.case .none{color:#bbb;display:flex;align-items:center;justify-content:center;text-align:center}
.id{font-weight:600;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:3px;padding:0 4px;margin:1px 2px 0 0;font-size:11px;background:#ddd}
.pneumonia{background:#c62828;color:#fff}.normal{background:#2e7d32;color:#fff}.uncertain{background:#6d6d6d;color:#fff}
.flag{background:#ffb300}
#pager{margin:12px 0;display:flex;gap:10px;align-items:center}
table{border-collapse:collapse;background:#fff;font-size:12px}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
</style></head>
<body>
<header><h1>{{TITLE}}</h1><dl>{{ABOUT}}</dl></header>
<div id="bar">
<label>label <select id="label"><option value="">any</option>{{LABEL_OPTIONS}}</select></label>
<label>QA flag <select id="flag"><option value="">any or none</option><option value="none">no flag</option>
<option value="any">any flag</option>{{FLAG_OPTIONS}}</select></label>
<label>p(pneumonia) from <input id="pmin" type="number" min="0" max="1" step="0.05"></label>
<label>to <input id="pmax" type="number" min="0" max="1" step="0.05"></label>
<label>case id contains <input id="q" type="search"></label>
<label>sort <select id="sort"><option value="id">case id</option><option value="p-desc">p high first</option>
<option value="p-asc">p low first</option><option value="flags">most flags first</option></select></label>
<span id="count"></span>
</div>
<main>
<noscript><p>The list of cases needs JavaScript; the failed cases are below.</p></noscript>
<div id="grid"></div>
<div id="pager"><button id="prev" type="button">previous</button><span id="pageinfo"></span>
<button id="next" type="button">next</button></div>
<h2 id="failed">Failed cases ({{FAILED_COUNT}})</h2>
<table><thead><tr><th>case</th><th>status</th><th>reason</th></tr></thead><tbody>{{FAILED_ROWS}}</tbody></table>
</main>
<script type="application/json" id="cases">{{CASES}}</script>
<script>
"use strict";
const CASES = JSON.parse(document.getElementById("cases").textContent).filter(c => c.status === "ok");
const PAGE = {{PAGE_SIZE}};
const $ = id => document.getElementById(id);
const KEYS = ["label", "flag", "pmin", "pmax", "q", "sort"];
function state() {
  const h = new URLSearchParams(location.hash.slice(1));
  const s = {page: Math.max(1, parseInt(h.get("page") || "1", 10) || 1)};
  for (const k of KEYS) s[k] = h.get(k) || "";
  return s;
}
function setHash(s) {
  const h = new URLSearchParams();
  for (const k of [...KEYS, "page"]) if (s[k] && !(k === "page" && s[k] === 1)) h.set(k, s[k]);
  location.hash = h.toString();
}
function select(s) {
  const lo = s.pmin === "" ? -1 : Number(s.pmin), hi = s.pmax === "" ? 2 : Number(s.pmax);
  const q = s.q.toLowerCase();
  const out = CASES.filter(c =>
    (!s.label || c.label === s.label) &&
    (!s.flag || (s.flag === "none" ? c.flags.length === 0 : s.flag === "any" ? c.flags.length > 0
                 : c.flags.includes(s.flag))) &&
    ((s.pmin === "" && s.pmax === "") || (c.p !== null && c.p >= lo && c.p <= hi)) &&
    (!q || c.id.toLowerCase().includes(q)));
  const p = c => (c.p === null ? -1 : c.p);
  const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
  const order = {"p-desc": (a, b) => p(b) - p(a) || byId(a, b), "p-asc": (a, b) => p(a) - p(b) || byId(a, b),
                 "flags": (a, b) => b.flags.length - a.flags.length || byId(a, b)}[s.sort] || byId;
  return out.sort(order);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function card(c) {
  const d = el("div", "case");
  d.dataset.id = c.id;
  let pic;
  if (c.thumb) {
    pic = el("img");
    pic.loading = "lazy"; pic.decoding = "async"; pic.alt = c.id; pic.src = c.thumb;
  } else pic = el("div", "none", c.error || "no picture");
  if (c.full) {
    const a = el("a"); a.href = c.full; a.target = "_blank"; a.title = "full size"; a.append(pic); pic = a;
  }
  d.append(pic, el("div", "id", c.id));
  const line = el("div");
  line.append(el("span", "badge p", c.p === null ? "p n/a" : "p " + c.p.toFixed(3)));
  if (c.label) line.append(el("span", "badge label " + (["pneumonia", "normal", "uncertain"].includes(c.label)
                                                             ? c.label : ""), c.label));
  for (const f of c.flags) line.append(el("span", "badge flag", f));
  for (const [name, href] of c.links) { const a = el("a", "badge", name); a.href = href; a.target = "_blank";
                                       line.append(a); }
  d.append(line);
  return d;
}
function render() {
  const s = state();
  for (const k of KEYS) if ($(k).value !== s[k]) $(k).value = s[k];
  if (!s.sort) $("sort").value = "id";
  const list = select(s), pages = Math.max(1, Math.ceil(list.length / PAGE)), page = Math.min(s.page, pages);
  $("grid").replaceChildren(...list.slice((page - 1) * PAGE, page * PAGE).map(card));
  $("count").textContent = list.length + " of " + CASES.length + " cases";
  $("pageinfo").textContent = "page " + page + " of " + pages;
  $("prev").disabled = page <= 1; $("next").disabled = page >= pages;
  document.body.dataset.page = page;
}
for (const k of KEYS) $(k).addEventListener("change", () => { const s = state(); s[k] = $(k).value; s.page = 1;
                                                             setHash(s); });
$("prev").addEventListener("click", () => { const s = state(); s.page -= 1; setHash(s); });
$("next").addEventListener("click", () => { const s = state(); s.page += 1; setHash(s); });
window.addEventListener("hashchange", render);
render();
</script>
</body></html>
"""
