
// Transcoder features on the report page (a `mmdetect scan --transcoder` output, data.unit "feature"): inlined only on
// such a page, after page.js (which report/featurepage.py gives the feature's words and keys). It adds what only a
// transcoder has, through the DOM page.js built: a "Transcoders" section after the per-layer charts (where each layer's
// transcoder reads and writes, its skip path's copying score, the model's own neurons beside its features), the
// Neuronpedia link of each row of the table as a link, and the transcoder's facts and link in each feature's panel.
// As in page.js, every value from the data reaches the page through textContent or setAttribute.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("mmdetect-data").textContent);
  if (D.unit !== "feature") return;
  var NEURONPEDIA = "https://neuronpedia.org/";

  var put = mmdetectAddons.put, h = mmdetectAddons.h, isNum = mmdetectAddons.isNum, int = mmdetectAddons.int,
      sg = mmdetectAddons.sg;
  function link(url) {  // only a Neuronpedia page: the address comes from a transcoder's cfg.json
    if (typeof url !== "string" || url.indexOf(NEURONPEDIA) !== 0) return null;
    var a = h("a", {class: "np-link", href: url, target: "_blank", rel: "noopener noreferrer"}, url);
    a.addEventListener("click", function (ev) { ev.stopPropagation(); });  // the link, not the row's panel
    return a;
  }
  var byLayer = {};
  (D.layers || []).forEach(function (L) { byLayer[L.layer] = L; });
  function pageOf(L, feature) {
    return L && typeof L.neuronpedia === "string" ? L.neuronpedia.replace("{feature}", String(feature)) : null;
  }

  // -- per layer: the transcoders --------------------------------------------------------------------------------------

  var has = function (key) { return (D.layers || []).some(function (L) { return L[key] !== null && L[key] !== undefined; }); };
  var COLUMNS = [
    ["layer", "layer", function (L) { return String(L.layer); }],
    ["transcoder", "transcoder", function (L) { return L.transcoder; }],
    ["architecture", "architecture", function (L) { return L.architecture; }],
    ["d_sae", "features", function (L) { return int(L.d_sae); }],
    ["hook_name", "reads at", function (L) { return L.hook_name + (L.reads ? " (" + L.reads + ")" : ""); }],
    ["hook_name_out", "writes at", function (L) { return L.hook_name_out + (L.writes ? " (" + L.writes + ")" : ""); }],
    ["n_flagged", "features flagged", function (L) { return int(L.n_flagged) + " of " + int(L.n_features); }],
    ["min", "min cos", function (L) { return sg(L.min); }],
    ["skip_copying", "skip copying", function (L) { return sg(L.skip_copying); }],
    ["n_neurons", "neurons flagged", function (L) { return int(L.neurons_flagged) + " of " + int(L.n_neurons); }],
    ["neurons_min", "neurons min cos", function (L) { return sg(L.neurons_min); }],
    ["neuronpedia", "Neuronpedia", function (L) { return L.neuronpedia ? L.neuronpedia.replace("{feature}", "…") : ""; }]
  ].filter(function (c) { return has(c[0]); });

  var prov = D.provenance || {}, opts = prov.options || {};
  var sec = h("section", {id: "transcoders-section"}, h("h2", null, "Transcoders"),
    h("p", {class: "note"}, "One transcoder per layer" + (opts.transcoder ? " (" + opts.transcoder + ")" : "") +
      ", each feature scanned as a neuron: cos of its encoder column (what it reads) and its decoder row (what it " +
      "writes), folded as the MLP it stands in for." + (has("skip_copying") ? " skip copying: the copying score of " +
      "a skip transcoder's W_skip, as heads score an OV circuit (−1: it writes back the negative of what it reads)." :
        "") + (has("n_neurons") ? " neurons: the model's own MLP neurons at that layer, from the same scan (scan " +
        "--neurons)." : "") + (has("transcoder") ? "" : " The scan came without its per-layer summary (a sibling " +
        ".json or .parquet), so only the counts are known here.")));
  if (!D.layers || !D.layers.length) sec.append(h("p", {class: "empty"}, "no per-layer data"));
  else {
    var table = h("table", {class: "mini transcoders", id: "transcoders"});
    table.append(h("thead", null, h("tr", null, COLUMNS.map(function (c) { return h("th", {"data-col": c[0]}, c[1]); }))));
    var body = h("tbody");
    D.layers.forEach(function (L) {
      body.append(h("tr", {"data-layer": String(L.layer)}, COLUMNS.map(function (c) {
        var v = c[2](L);
        return h("td", {"data-col": c[0], class: c[0] === "hook_name" || c[0] === "hook_name_out" ||
          c[0] === "transcoder" || c[0] === "architecture" || c[0] === "neuronpedia" ? null : "num"},
          v === null || v === undefined ? "" : v);
      })));
    });
    table.append(body);
    sec.append(h("div", {class: "wide"}, table));
  }
  var layersSec = document.getElementById("layers-section");
  if (layersSec) layersSec.after(sec); else document.getElementById("app").append(sec);

  // -- the table: each row's Neuronpedia page as a link (page.js draws rows as they scroll into view) ----------------

  var grid = document.querySelector("#features table.data");
  if (grid) {
    var j = [].map.call(grid.querySelectorAll("thead th"), function (th) { return th.getAttribute("data-col"); })
      .indexOf("neuronpedia");
    var tbody = grid.querySelector("tbody");
    var linkify = function () {
      if (j < 0) return;
      tbody.querySelectorAll("tr.r").forEach(function (tr) {
        var td = tr.children[j];
        if (td && !td.firstElementChild) {
          var a = link(td.textContent);
          if (a) td.replaceChildren(a);
        }
      });
    };
    new MutationObserver(linkify).observe(tbody, {childList: true});
    linkify();
  }

  // -- a feature's panel: its transcoder and its Neuronpedia page ------------------------------------------------------

  var drawer = document.getElementById("panel");
  if (drawer) {
    new MutationObserver(function () {
      var head = drawer.querySelector("h2"), m = head ? /^L(\d+)F(\d+)$/.exec(head.textContent) : null;
      if (!m || drawer.querySelector("section.transcoder")) return;
      var doc = (D.panels || {})[m[1] + "||" + m[2]], facts = (doc && doc.feature) || {}, L = byLayer[+m[1]] || {};
      var pick = function (k) { return facts[k] !== undefined && facts[k] !== null ? facts[k] : L[k]; };
      var box = h("section", {class: "transcoder"}, h("h3", null, "Transcoder"));
      var url = facts.neuronpedia || pageOf(L, m[2]), a = link(url);
      if (a) box.append(h("p", {class: "small"}, "Neuronpedia: ", a));
      var t = h("table", {class: "kv"});
      [["transcoder", pick("transcoder")], ["architecture", pick("architecture")], ["features", pick("d_sae")],
        ["reads at", pick("hook_name") ? pick("hook_name") + (pick("reads") ? " (" + pick("reads") + ")" : "") : null],
        ["writes at", pick("hook_name_out") ? pick("hook_name_out") + (pick("writes") ? " (" + pick("writes") + ")" : "") : null],
        ["skip copying", isNum(L.skip_copying) ? sg(L.skip_copying) : null]].forEach(function (r) {
        if (r[1] !== null && r[1] !== undefined && r[1] !== "") t.append(h("tr", null, h("th", null, r[0]), h("td", null, String(r[1]))));
      });
      if (t.children.length) box.append(t);
      if (box.children.length > 1) {
        var after = head.nextElementSibling;
        if (after) after.after(box); else drawer.append(box);
      }
    }).observe(drawer, {childList: true});
  }
  document.documentElement.setAttribute("data-features-ready", "1");
})();
