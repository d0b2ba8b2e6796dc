// A feature page of the atlas: draws each top image's heat map over it (bilinear, 'inferno', transparent where
// the feature is silent) and adds keyboard navigation. Data: #tide-data (JSON); nothing is written as HTML.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("tide-data").textContent);
  var STOPS = [[0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85], [227, 89, 51],
               [249, 140, 10], [249, 201, 50], [252, 255, 164]];

  function inferno(v) {
    var x = Math.max(0, Math.min(1, v)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
    var a = STOPS[i], b = STOPS[i + 1];
    return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
  }

  function decode(heat) {
    var bin = atob(heat.data), out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function draw(fig) {
    var im = data.feature.images[parseInt(fig.getAttribute("data-i"), 10)];
    var img = fig.querySelector("img"), canvas = fig.querySelector("canvas");
    if (!im || !img || !canvas || !img.naturalWidth) return;
    var shape = im.heat.shape, panels = shape.length === 3 ? shape[0] : 1;
    var rows = shape[shape.length - 2], cols = shape[shape.length - 1], q = decode(im.heat);
    var w = img.clientWidth, h = img.clientHeight;
    canvas.width = w;
    canvas.height = h;
    var ctx = canvas.getContext("2d"), small = document.createElement("canvas");
    small.width = cols;
    small.height = rows;
    var sctx = small.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    for (var p = 0; p < panels; p++) {
      var px = sctx.createImageData(cols, rows);
      for (var k = 0; k < rows * cols; k++) {
        var v = q[p * rows * cols + k] / 255, c = inferno(v);
        px.data[4 * k] = c[0]; px.data[4 * k + 1] = c[1]; px.data[4 * k + 2] = c[2];
        px.data[4 * k + 3] = v > 0 ? Math.round(255 * (0.3 + 0.5 * v)) : 0;
      }
      sctx.putImageData(px, 0, 0);
      ctx.drawImage(small, p * w / panels, 0, w / panels, h);
    }
    fig.setAttribute("data-drawn", "1");
  }

  var figs = document.querySelectorAll("figure[data-i]"), pending = figs.length;
  function ready() { window.tideReadyMs = performance.now(); document.body.setAttribute("data-ready", "1"); }
  function done() { if (--pending <= 0) ready(); }
  if (!pending) ready();
  figs.forEach(function (fig) {
    var img = fig.querySelector("img");
    var go = function () { draw(fig); done(); };
    if (img.complete && img.naturalWidth) go();
    else { img.addEventListener("load", go); img.addEventListener("error", done); }
  });

  var toggle = document.getElementById("heat");
  if (toggle) toggle.addEventListener("change", function () {
    document.body.classList.toggle("noheat", !toggle.checked);
  });
  document.addEventListener("keydown", function (e) {
    if (e.target.tagName === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) return;
    var nav = data.nav || {};
    if ((e.key === "ArrowLeft" || e.key === "k") && nav.prev !== null && nav.prev !== undefined) location.href = "f" + nav.prev + ".html";
    else if ((e.key === "ArrowRight" || e.key === "j") && nav.next !== null && nav.next !== undefined) location.href = "f" + nav.next + ".html";
    else if (e.key === "i" || e.key === "Escape") location.href = "../index.html";
    else if (e.key === "h" && toggle) { toggle.checked = !toggle.checked; toggle.dispatchEvent(new Event("change")); }
  });
})();
