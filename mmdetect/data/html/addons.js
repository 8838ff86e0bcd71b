// Helpers shared by the report page's add-on scripts (stats.js, features.js): inlined once, after page.js and before
// them, only on a page that carries one of them, so every other page stays exactly as it was. As in page.js, every
// value reaches the page through textContent or setAttribute.
var mmdetectAddons = (function () {
  "use strict";
  function put(e, attrs, kids) {
    for (var k in attrs || {}) {
      var v = attrs[k];
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v; else e.setAttribute(k, v);
    }
    kids.forEach(function (c) {
      if (c === null || c === undefined || c === false) return;
      if (Array.isArray(c)) put(e, null, c); else e.append(c instanceof Node ? c : String(c));
    });
    return e;
  }
  function h(tag, attrs) { return put(document.createElement(tag), attrs, [].slice.call(arguments, 2)); }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function int(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–"; }
  function sg(v, d) { return isNum(v) ? (v > 0 ? "+" : "") + v.toFixed(d === undefined ? 3 : d) : "–"; }
  return {put: put, h: h, isNum: isNum, int: int, sg: sg};
})();
