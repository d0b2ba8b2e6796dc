// The atlas index: every feature of the SAE in a paginated, sortable table with search and filters.
// Data: #tide-data (JSON). Every value reaches the page through textContent or setAttribute, never as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("tide-data").textContent);
  var cols = data.columns, rows = data.rows, names = data.meta.condition_names || [];
  var C = {};
  cols.forEach(function (c, i) { C[c] = i; });
  var $ = function (id) { return document.getElementById(id); };
  var q = $("q"), cls = $("cls"), tmin = $("tmin"), tmax = $("tmax"), fmin = $("fmin"), fmax = $("fmax");
  var body = $("rows"), count = $("count"), pageInfo = $("page"), size = $("size");
  var state = {page: 0, key: "frequency", dir: -1, active: 0, list: rows};

  names.forEach(function (n, i) {
    var o = document.createElement("option");
    o.value = String(i);
    o.textContent = n;
    cls.appendChild(o);
  });

  function num(el) { var v = parseFloat(el.value); return isNaN(v) ? null : v; }

  function filter() {
    var text = q.value.trim().toLowerCase(), id = /^#?\d+$/.test(text) ? parseInt(text.replace("#", ""), 10) : null;
    var c = cls.value === "" ? null : parseInt(cls.value, 10);
    var t0 = num(tmin), t1 = num(tmax), f0 = num(fmin), f1 = num(fmax);
    var out = [];
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      if (id !== null) { if (r[C.id] !== id) continue; }
      else if (text) {
        var hay = (String(r[C.label]) + " " + (r[C.top_class_id] === null ? "" : names[r[C.top_class_id]])).toLowerCase();
        if (hay.indexOf(text) < 0) continue;
      }
      if (c !== null && r[C.top_class_id] !== c) continue;
      var t = r[C.peak_timestep];
      if (t0 !== null && (t === null || t < t0)) continue;
      if (t1 !== null && (t === null || t > t1)) continue;
      var f = r[C.frequency];
      if (f0 !== null && f < f0) continue;
      if (f1 !== null && f > f1) continue;
      out.push(r);
    }
    var k = C[state.key], dir = state.dir;
    out.sort(function (a, b) {
      var x = a[k], y = b[k];
      if (x === y) return a[C.id] - b[C.id];
      if (x === null) return 1;
      if (y === null) return -1;
      return (typeof x === "string" ? x.localeCompare(y) : x - y) * dir;
    });
    state.list = out;
  }

  function fmt(v, d) { return v === null || v === undefined ? "–" : String(Number(Number(v).toPrecision(d))); }

  function cell(tr, text, numeric) {
    var td = document.createElement("td");
    if (numeric) td.className = "n";
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function perPage() { return parseInt(size.value, 10) || 100; }

  function render() {
    var n = perPage(), pages = Math.max(1, Math.ceil(state.list.length / n));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var start = state.page * n, slice = state.list.slice(start, start + n);
    state.active = Math.min(state.active, Math.max(0, slice.length - 1));
    var frag = document.createDocumentFragment();
    slice.forEach(function (r, i) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-id", String(r[C.id]));
      if (i === state.active) { tr.className = "active"; tr.setAttribute("aria-selected", "true"); }
      var a = document.createElement("a");
      a.href = "features/f" + r[C.id] + ".html";
      a.textContent = String(r[C.id]);
      var td = document.createElement("td");
      td.className = "n";
      td.appendChild(a);
      tr.appendChild(td);
      cell(tr, r[C.label]);
      cell(tr, fmt(r[C.frequency], 3), true);
      cell(tr, fmt(r[C.max_act], 3), true);
      cell(tr, r[C.top_class_id] === null ? "–" : names[r[C.top_class_id]] + " (" + fmt(r[C.top_auroc], 2) + ")");
      cell(tr, r[C.peak_timestep] === null ? "–" : fmt(r[C.peak_timestep], 4) + " (step " + r[C.peak_step] + ")", true);
      cell(tr, String(r[C.images]), true);
      cell(tr, r[C.effects] ? "yes" : "–");
      tr.addEventListener("click", function (e) { if (e.target.tagName !== "A") { state.active = i; render(); } });
      frag.appendChild(tr);
    });
    body.replaceChildren(frag);
    count.textContent = state.list.length + " of " + rows.length + " features";
    pageInfo.textContent = "page " + (state.page + 1) + " of " + pages;
    document.querySelectorAll("th[data-key]").forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.getAttribute("data-key") === state.key) th.classList.add(state.dir > 0 ? "sorted-asc" : "sorted-desc");
    });
    var h = [];
    if (q.value) h.push("q=" + encodeURIComponent(q.value));
    if (cls.value !== "") h.push("class=" + cls.value);
    if (state.page) h.push("page=" + (state.page + 1));
    history.replaceState(null, "", h.length ? "#" + h.join("&") : location.pathname + location.search);
  }

  function update() { state.page = 0; state.active = 0; filter(); render(); }

  [q, cls, tmin, tmax, fmin, fmax, size].forEach(function (el) { el.addEventListener("input", update); });
  document.querySelectorAll("th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.getAttribute("data-key");
      state.dir = state.key === k ? -state.dir : (k === "label" || k === "id" ? 1 : -1);
      state.key = k;
      filter();
      render();
    });
  });
  $("prev").addEventListener("click", function () { state.page--; state.active = 0; render(); });
  $("next").addEventListener("click", function () { state.page++; state.active = 0; render(); });

  document.addEventListener("keydown", function (e) {
    var typing = e.target.tagName === "INPUT" || e.target.tagName === "SELECT";
    if (e.key === "/" && !typing) { e.preventDefault(); q.focus(); return; }
    if (e.key === "Escape") { e.target.blur(); return; }
    if (typing && e.key !== "ArrowDown" && e.key !== "ArrowUp" && e.key !== "Enter") return;
    var n = body.rows.length;
    if (e.key === "ArrowDown" || (!typing && e.key === "j")) { e.preventDefault(); state.active = Math.min(n - 1, state.active + 1); render(); }
    else if (e.key === "ArrowUp" || (!typing && e.key === "k")) { e.preventDefault(); state.active = Math.max(0, state.active - 1); render(); }
    else if (e.key === "PageDown" || (!typing && e.key === "n")) { e.preventDefault(); state.page++; state.active = 0; render(); }
    else if (e.key === "PageUp" || (!typing && e.key === "p")) { e.preventDefault(); state.page--; state.active = 0; render(); }
    else if (e.key === "Enter" && n) {
      var a = body.rows[state.active].querySelector("a");
      if (a) { e.preventDefault(); location.href = a.href; }
    }
  });

  (location.hash || "").replace(/^#/, "").split("&").forEach(function (kv) {
    var p = kv.split("="), v = decodeURIComponent(p[1] || "");
    if (p[0] === "q") q.value = v;
    if (p[0] === "class" && /^\d+$/.test(v)) cls.value = v;
    if (p[0] === "page" && /^\d+$/.test(v)) state.page = parseInt(v, 10) - 1;
  });
  var page = state.page;
  filter();
  state.page = page;
  render();
  window.tideReadyMs = performance.now();
  document.body.setAttribute("data-ready", "1");
})();
