
// The corpus statistics on the report page (mmdetect report --activations): inlined after page.js only on a page
// that carries them (data.stats), so every other page stays exactly as it was. It draws on what page.js built,
// through the DOM only: the model-level figure after the per-layer section, and a "Corpus statistics" section at the
// end of a neuron's panel each time page.js opens one (page.js replaces the drawer's children; an observer sees it).
// As in page.js, every value from the data reaches the page through textContent or setAttribute.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("mmdetect-data").textContent), S = D.stats;
  if (!S) return;
  var NS = "http://www.w3.org/2000/svg";

  var put = mmdetectAddons.put, h = mmdetectAddons.h, isNum = mmdetectAddons.isNum, int = mmdetectAddons.int,
      sg = mmdetectAddons.sg;
  function s(tag, attrs) { return put(document.createElementNS(NS, tag), attrs, [].slice.call(arguments, 2)); }
  function pct(v, d) { return isNum(v) ? (100 * v).toFixed(d === undefined ? 1 : d) + "%" : "–"; }
  function g3(v) {
    return isNum(v) ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : +v.toPrecision(4) + "") : "–";
  }
  function niceTicks(lo, hi, n) {
    var span = hi - lo;
    if (!(span > 0)) return [lo];
    var step0 = span / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(step0))), e = step0 / mag;
    var step = mag * (e >= 7.5 ? 10 : e >= 3.5 ? 5 : e >= 1.5 ? 2 : 1), out = [];
    for (var v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }
  function shown(str) { return String(str).replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "␍"); }
  function label(layer, expert, neuron) {  // as page.js's neuronLabel: the drawer's heading
    return "L" + layer + (expert !== null && expert !== undefined && expert !== "" ? "/E" + expert : "") + "N" + neuron;
  }
  var tip = document.querySelector(".tip");
  function showTip(ev, lines) {
    if (!tip) return;
    tip.replaceChildren.apply(tip, lines.filter(function (l) { return l; }).map(function (l, i) {
      return h("div", i === 0 ? {class: "tip-title"} : null, l);
    }));
    tip.hidden = false;
    var r = tip.getBoundingClientRect(), pad = 14, x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + r.width > window.innerWidth - 4) x = ev.clientX - r.width - pad;
    if (y + r.height > window.innerHeight - 4) y = ev.clientY - r.height - pad;
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }
  function hideTip() { if (tip) tip.hidden = true; }
  function local(svg, ev) {  // the pointer in the svg's own coordinates
    var r = svg.getBoundingClientRect(), w = +svg.getAttribute("width"), hh = +svg.getAttribute("height");
    return [(ev.clientX - r.left) * (w / (r.width || w)), (ev.clientY - r.top) * (hh / (r.height || hh))];
  }
  var XNAME = S.figure && S.figure.x === "freq_pos" ? "freq_pos" : "freq_gn";
  var XTEXT = XNAME === "freq_gn" ? "negative-gate share (freq_gn = freq_gn_ip + freq_gn_in)" :
    "freq_pos (share of tokens with a positive pre-activation)";

  // -- the neuron panel: sign cases, pre-activation histogram beside the layer's median neuron, top contexts ---------

  var CASE_NOTE = {gp_ip: "gate > 0, up > 0", gp_in: "gate > 0, up < 0", gn_ip: "gate < 0, up > 0",
    gn_in: "gate < 0, up < 0"};

  function casesSvg(cases, W) {
    var H = 150, M = {l: 8, r: 8, t: 18, b: 40}, ph = H - M.t - M.b, bw = (W - M.l - M.r) / cases.length;
    var top = Math.max.apply(null, cases.map(function (c) { return isNum(c.freq) ? c.freq : 0; }).concat([1e-9]));
    var svg = s("svg", {class: "chart cases", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "sign cases: share of tokens and mean post-activation"});
    svg.append(s("line", {class: "axis-line", x1: M.l, x2: W - M.r, y1: M.t + ph + 0.5, y2: M.t + ph + 0.5}));
    cases.forEach(function (c, k) {
      var f = isNum(c.freq) ? c.freq : 0, bh = f / top * ph, x0 = M.l + k * bw, cx = x0 + bw / 2;
      var bar = s("rect", {class: "case-bar " + c.case.slice(0, 2), x: x0 + bw * 0.2, y: M.t + ph - bh,
        width: bw * 0.6, height: bh, "data-case": c.case, "data-freq": String(c.freq), "data-mean": String(c.mean)});
      bar.addEventListener("mousemove", function (ev) {
        showTip(ev, [c.label + " (" + CASE_NOTE[c.case] + ")", pct(c.freq, 2) + " of the tokens",
          "mean post-activation in this case " + g3(c.mean)]);
      });
      bar.addEventListener("mouseleave", hideTip);
      svg.append(bar);
      svg.append(s("text", {class: "case-freq", x: cx, y: M.t + ph - bh - 4, "text-anchor": "middle"}, pct(c.freq)));
      svg.append(s("text", {class: "case-label", x: cx, y: M.t + ph + 14, "text-anchor": "middle"}, c.label));
      svg.append(s("text", {class: "case-mean", x: cx, y: M.t + ph + 29, "text-anchor": "middle",
        "data-case": c.case}, "mean " + g3(c.mean)));
    });
    return svg;
  }

  function histTotal(hh) {
    return (hh.under || 0) + (hh.over || 0) + (hh.counts || []).reduce(function (a, b) { return a + b; }, 0);
  }

  // Both histograms on one scale: the same bins (S.hist: 256 of width 25/256 over [-10, 15]), x over the bins either
  // one uses, y as the share of each neuron's tokens (the two may have seen different token counts: experts).
  function preHistSvg(mine, med, W) {
    var lo = S.hist.lo, bw = (S.hist.hi - S.hist.lo) / S.hist.bins, H = 170, M = {l: 40, r: 10, t: 10, b: 30};
    var both = [mine, med].filter(function (x) { return x && x.counts && x.counts.length; });
    if (!both.length) return h("p", {class: "muted"}, "no token fell inside [" + S.hist.lo + ", " + S.hist.hi + "]");
    var b0 = Math.min.apply(null, both.map(function (x) { return x.first; }));
    var b1 = Math.max.apply(null, both.map(function (x) { return x.first + x.counts.length; }));
    b0 = Math.max(0, b0 - 2); b1 = Math.min(S.hist.bins, b1 + 2);
    var tot = both.map(histTotal), peak = 0;
    both.forEach(function (x, k) { x.counts.forEach(function (c) { peak = Math.max(peak, c / (tot[k] || 1)); }); });
    var pw = W - M.l - M.r, ph = H - M.t - M.b;
    function X(b) { return M.l + (b - b0) / (b1 - b0) * pw; }
    function Y(share) { return M.t + ph - share / (peak || 1) * ph; }
    var svg = s("svg", {class: "chart prehist", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "pre-activation histogram with the layer's median neuron"});
    niceTicks(0, peak, 3).forEach(function (v) {
      svg.append(s("line", {class: "grid", x1: M.l, x2: M.l + pw, y1: Y(v), y2: Y(v)}));
      svg.append(s("text", {x: M.l - 4, y: Y(v) + 4, "text-anchor": "end"}, pct(v, peak < 0.02 ? 2 : 1)));
    });
    niceTicks(lo + b0 * bw, lo + b1 * bw, Math.max(2, Math.floor(pw / 60))).forEach(function (v) {
      var x = X((v - lo) / bw);
      svg.append(s("line", {class: "axis-line", x1: x, x2: x, y1: M.t + ph, y2: M.t + ph + 4}));
      svg.append(s("text", {x: x, y: M.t + ph + 16, "text-anchor": "middle"}, g3(v)));
    });
    if (lo + b0 * bw < 0 && lo + b1 * bw > 0) {
      svg.append(s("line", {class: "zero", x1: X(-lo / bw), x2: X(-lo / bw), y1: M.t, y2: M.t + ph}));
    }
    var t0 = mine && mine.counts ? histTotal(mine) : 0;
    if (mine && mine.counts) {
      mine.counts.forEach(function (c, j) {
        if (!c) return;
        var b = mine.first + j, share = c / (t0 || 1);
        svg.append(s("rect", {class: "pre-bar", x: X(b), y: Y(share), width: Math.max(0.6, X(b + 1) - X(b) - 0.3),
          height: M.t + ph - Y(share), "data-bin": b, "data-count": c}));
      });
    }
    if (med && med.counts && med.counts.length) {
      var tm = histTotal(med), d = "M" + X(med.first).toFixed(1) + " " + Y(0).toFixed(1);
      med.counts.forEach(function (c, j) {
        var b = med.first + j;
        d += "V" + Y(c / (tm || 1)).toFixed(1) + "H" + X(b + 1).toFixed(1);
      });
      d += "V" + Y(0).toFixed(1);
      svg.append(s("path", {class: "pre-median", d: d, "data-bins": med.counts.length}));
    }
    svg.append(s("line", {class: "axis-line", x1: M.l, x2: M.l + pw, y1: M.t + ph + 0.5, y2: M.t + ph + 0.5}));
    svg.append(s("text", {x: M.l + pw / 2, y: H - 1, "text-anchor": "middle"}, "pre-activation"));
    svg.addEventListener("mousemove", function (ev) {
      var b = Math.floor(b0 + (local(svg, ev)[0] - M.l) / pw * (b1 - b0));
      if (b < b0 || b >= b1) { hideTip(); return; }
      function at(x) { return x && x.counts && b >= x.first && b < x.first + x.counts.length ? x.counts[b - x.first] : 0; }
      var c = at(mine), m = at(med);
      showTip(ev, ["pre-activation " + g3(lo + b * bw) + " … " + g3(lo + (b + 1) * bw),
        "this neuron: " + int(c) + " tokens (" + pct(c / (t0 || 1), 2) + ")",
        med ? "median neuron: " + int(m) + " tokens (" + pct(m / (histTotal(med) || 1), 2) + ")" : null]);
    });
    svg.addEventListener("mouseleave", hideTip);
    return svg;
  }

  function corpusSection(e, W) {
    var sec = h("section", {class: "corpus", "data-key": label(e.layer, e.expert, e.neuron)},
      h("h3", null, "Corpus statistics"));
    sec.append(h("p", {class: "small stats-line"}, (S.corpus ? "on " + (typeof S.corpus === "string" ? S.corpus :
      JSON.stringify(S.corpus)) + ": " : "") + int(e.tokens) + " tokens · positive pre-activation on " +
      pct(e.freq_pos) + " · pre-activation mean " + g3(e.pre_mean) + ", std " + g3(e.pre_std) + " · post-activation " +
      "mean " + g3(e.post_mean) + ", min " + g3(e.post_min) + ", max " + g3(e.post_max) + " · deletion score " +
      sg(e.deletion)));
    if (e.cases) {
      sec.append(h("h4", null, "Sign cases"), h("p", {class: "note"}, "Share of the tokens in each sign case of " +
        "(gate pre-activation, linear input), and the mean post-activation in that case (the value multiplied into " +
        "the write vector, in the scan's orientation). Negative-gate share: " +
        pct((e.cases[2].freq || 0) + (e.cases[3].freq || 0)) + "."), casesSvg(e.cases, Math.min(W, 420)));
    } else {
      sec.append(h("p", {class: "note"}, "Not a gated MLP: there are no sign cases of (gate, linear input)."));
    }
    var med = S.medians[String(e.layer)];
    sec.append(h("h4", null, "Pre-activation histogram"));
    var same = med && med.neuron === e.neuron && (med.expert || null) === (e.expert || null);
    sec.append(h("p", {class: "note"}, "Bars: this neuron; line: layer " + e.layer + "'s median neuron by freq_pos" +
      (med ? " (" + label(e.layer, med.expert, med.neuron) + ", freq_pos " + pct(med.freq_pos) + ")" +
        (same ? ", which is this neuron" : "") : ": none") + ". Both as shares of their tokens, on the same axes; " +
      "bins of " + g3((S.hist.hi - S.hist.lo) / S.hist.bins) + " over [" + S.hist.lo + ", " + S.hist.hi + "]."));
    sec.append(preHistSvg(e.hist, med ? med.hist : null, W));
    var out = [];
    function tokens(n) { return int(n) + (n === 1 ? " token" : " tokens"); }
    if (e.hist.under) out.push(tokens(e.hist.under) + " below " + S.hist.lo);
    if (e.hist.over) out.push(tokens(e.hist.over) + " above " + S.hist.hi);
    if (out.length) sec.append(h("p", {class: "note outside"}, "Outside the bins: " + out.join(", ") + "."));
    sec.append(h("h4", null, "Top contexts"));
    if (e.top && e.top.length) {
      var t = h("table", {class: "mini tops"}, h("thead", null, h("tr", null, h("th", null, "post"),
        h("th", null, "context (the token marked)"))));
      var body = h("tbody");
      e.top.forEach(function (c) {
        body.append(h("tr", null, h("td", {class: "num"}, g3(c.value)),
          h("td", null, h("span", {class: "ctx"}, shown(c.before || ""),
            h("mark", null, shown(c.token !== null && c.token !== undefined ? c.token : "#" + c.token_id)),
            shown(c.after || "")))));
      });
      t.append(body);
      sec.append(t);
    } else sec.append(h("p", {class: "muted"}, "no token"));
    return sec;
  }

  var byLabel = {};
  Object.keys(S.neurons || {}).forEach(function (k) {
    var e = S.neurons[k];
    byLabel[label(e.layer, e.expert, e.neuron)] = e;
  });
  var drawer = document.getElementById("panel");
  if (drawer) {
    new MutationObserver(function () {
      var head = drawer.querySelector("h2");
      if (!head || drawer.querySelector("section.corpus")) return;
      var e = byLabel[head.textContent];
      if (e) drawer.append(corpusSection(e, Math.max(280, (drawer.clientWidth || 620) - 40)));
    }).observe(drawer, {childList: true});
  }

  // -- the model-level figure -----------------------------------------------------------------------------------------

  function layersText(ls) { return ls.length === 1 ? "layer " + ls[0] : "layers " + ls[0] + "–" + ls[ls.length - 1]; }
  function rhoText(r) {
    return "L" + r.layer + " ρ " + (isNum(r.rho) ? sg(r.rho) : "–") + " · p " + (isNum(r.p) ? g3(r.p) : "–") +
      " · n " + int(r.n);
  }
  function findInTable(text) {  // filter the neuron table to one neuron and bring it into view
    var box = document.querySelector("#neurons input[type=search]");
    if (!box) return;
    box.value = text;
    box.dispatchEvent(new Event("input"));
    document.getElementById("neurons").scrollIntoView({block: "start"});
  }

  function drawPanel(P, F, W) {
    var H = 230, M = {l: 46, r: 10, t: 10, b: 34}, pw = W - M.l - M.r, ph = H - M.t - M.b;
    var ylo = F.y_lo, yhi = F.y_hi;
    function X(v) { return M.l + v * pw; }
    function Y(v) { return M.t + (yhi - v) / (yhi - ylo) * ph; }
    var svg = s("svg", {class: "chart scatter", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "cos against " + XNAME + ", " + layersText(P.layers)});
    niceTicks(ylo, yhi, 4).forEach(function (v) {
      svg.append(s("line", {class: "grid", x1: M.l, x2: M.l + pw, y1: Y(v), y2: Y(v)}));
      svg.append(s("text", {x: M.l - 4, y: Y(v) + 4, "text-anchor": "end"}, sg(v, 2)));
    });
    [0, 0.25, 0.5, 0.75, 1].forEach(function (v) {
      svg.append(s("line", {class: "grid", x1: X(v), x2: X(v), y1: M.t, y2: M.t + ph}));
      svg.append(s("text", {x: X(v), y: M.t + ph + 14, "text-anchor": "middle"}, String(v)));
    });
    svg.append(s("text", {x: M.l + pw / 2, y: H - 3, "text-anchor": "middle"}, XNAME));
    svg.append(s("text", {x: 11, y: M.t + ph / 2, "text-anchor": "middle",
      transform: "rotate(-90 11 " + (M.t + ph / 2) + ")"}, "cos"));
    var pts = [];  // [x px, y px, lines of its tooltip]: what the pointer can find
    if (P.mode === "density") {
      var peak = Math.max.apply(null, P.counts.concat([1])), cw = pw / P.nx, chh = ph / P.ny;
      P.counts.forEach(function (c, k) {
        if (!c) return;
        var bx = k % P.nx, by = Math.floor(k / P.nx), t = Math.log1p(c) / Math.log1p(peak);
        var shade = Math.round(235 - 190 * t);
        var cell = s("rect", {class: "dens", x: M.l + bx * cw, y: M.t + (P.ny - 1 - by) * chh, width: cw + 0.2,
          height: chh + 0.2, fill: "rgb(" + shade + "," + (shade + 6) + "," + Math.min(255, shade + 14) + ")",
          "data-n": c});
        cell.addEventListener("mousemove", function (ev) {
          var c0 = ylo + by * (yhi - ylo) / P.ny;
          showTip(ev, [int(c) + " neurons", XNAME + " " + (bx / P.nx).toFixed(3) + " … " + ((bx + 1) / P.nx).toFixed(3),
            "cos " + sg(c0) + " … " + sg(c0 + (yhi - ylo) / P.ny)]);
        });
        cell.addEventListener("mouseleave", hideTip);
        svg.append(cell);
      });
    }
    if (isNum(F.threshold) && F.threshold >= ylo && F.threshold <= yhi) {
      svg.append(s("line", {class: "thr", x1: M.l, x2: M.l + pw, y1: Y(F.threshold), y2: Y(F.threshold)}));
    }
    function mark(x, y, flag, lid, nid, exp) {  // up to DENSITY_ABOVE a panel: kept to the bare DOM calls
      var cx = X(x), cy = Y(y), c = document.createElementNS(NS, "circle");
      c.setAttribute("class", flag ? "pt flag" : "pt");
      c.setAttribute("cx", cx.toFixed(1));
      c.setAttribute("cy", cy.toFixed(1));
      c.setAttribute("r", flag ? "2.6" : "1.8");
      svg.appendChild(c);
      pts.push([cx, cy, lid, exp, nid, x, y, flag]);
    }
    if (P.mode === "points") {
      [0, 1].forEach(function (pass) {  // flagged neurons last, on top
        for (var i = 0; i < P.x.length; i++) {
          if ((P.flagged[i] ? 1 : 0) !== pass) continue;
          mark(P.x[i], P.y[i], pass, P.layer[i], P.neuron[i], P.expert ? P.expert[i] : null);
        }
      });
    } else {
      for (var i = 0; i < P.fx.length; i++) mark(P.fx[i], P.fy[i], 1, P.flayer[i], P.fneuron[i], P.fexpert ? P.fexpert[i] : null);
    }
    function nearest(ev) {
      var p = local(svg, ev), best = null, bd = 64;
      for (var k = 0; k < pts.length; k++) {
        var dx = pts[k][0] - p[0], dy = pts[k][1] - p[1], d2 = dx * dx + dy * dy;
        if (d2 <= bd) { bd = d2; best = pts[k]; }
      }
      return best;
    }
    svg.addEventListener("mousemove", function (ev) {
      var q = nearest(ev);
      if (!q) { if (!ev.target.classList.contains("dens")) hideTip(); return; }
      showTip(ev, [label(q[2], q[3], q[4]) + (q[7] ? " · flagged" : ""), "cos " + sg(q[6]) + " · " + XNAME + " " +
        q[5].toFixed(3), "click: find it in the neuron table"]);
    });
    svg.addEventListener("mouseleave", hideTip);
    svg.addEventListener("click", function (ev) {
      var q = nearest(ev);
      if (q) findInTable(label(q[2], q[3], q[4]));
    });
    return svg;
  }

  function figureSection() {
    var F = S.figure, sec = h("section", {id: "figure-section"},
      h("h2", null, "cos against " + (XNAME === "freq_gn" ? "the negative-gate share" : "freq_pos")));
    var joined = "statistics joined for " + int(S.joined) + " of " + int(S.rows) + " scan rows, from a corpus pass of " +
      int(S.tokens) + " tokens";
    if (!F) {
      sec.append(h("p", {class: "note"}, "No scan row has both a cos and corpus statistics (" + joined + ")."));
      return {section: sec, draw: function () {}};
    }
    sec.append(h("p", {class: "note"}, "Each neuron's cos(read, write) against its " + XTEXT + ", one panel per " +
      (F.panels.some(function (p) { return p.layers.length > 1; }) ? "group of consecutive layers" : "layer") +
      ", on shared axes; flagged neurons in red, the threshold dashed. Under each panel, Spearman's ρ of cos against " +
      XNAME + " in each layer, with its p-value. A panel of at most " + int(F.density_above) + " neurons draws one " +
      "point per neuron; a larger one draws their counts on a grid (darker: more neurons, log scale) and its flagged " +
      "neurons as points. " + joined.charAt(0).toUpperCase() + joined.slice(1) + ". Hover a point for the neuron; " +
      "click it to find it in the table."));
    sec.append(h("div", {class: "legend"}, h("span", null, h("span", {class: "sw pt"}), "neuron"),
      h("span", null, h("span", {class: "sw flag"}), "flagged"),
      F.panels.some(function (p) { return p.mode === "density"; }) ? h("span", null, h("span", {class: "sw dens"}),
        "density cell (panels over " + int(F.density_above) + " neurons)") : null,
      h("span", null, h("span", {class: "sw thr"}), "threshold")));
    var grid = h("div", {class: "figure-grid", id: "stats-figure"});
    sec.append(grid);
    var rho = {};
    F.spearman.forEach(function (r) { rho[r.layer] = r; });
    var boxes = F.panels.map(function (P) {
      var box = h("div", {class: "fig-panel", "data-layers": P.layers.join(","), "data-mode": P.mode,
        "data-n": P.n}, h("div", {class: "fig-title"}, layersText(P.layers) + " · " + int(P.n) + " neurons · " +
          int(P.n_flagged) + " flagged"));
      var plot = h("div", {class: "fig-plot"});
      var list = h("div", {class: "rho"});
      P.layers.forEach(function (lid) {
        if (rho[lid]) list.append(h("span", {class: "rho-layer", "data-layer": lid, "data-rho": String(rho[lid].rho),
          "data-p": String(rho[lid].p)}, rhoText(rho[lid])));
      });
      box.append(plot, list);
      grid.append(box);
      return [plot, P];
    });
    function draw() {  // every width read before any panel is drawn: one layout, not one per panel
      var widths = boxes.map(function (b) { return Math.max(240, b[0].clientWidth || 320); });
      boxes.forEach(function (b, k) { b[0].replaceChildren(drawPanel(b[1], F, widths[k])); });
    }
    return {section: sec, draw: draw};
  }

  var fig = figureSection(), layersSec = document.getElementById("layers-section");
  if (layersSec) layersSec.after(fig.section); else document.getElementById("app").append(fig.section);
  fig.draw();
  var timer = null;
  window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(fig.draw, 150); });
  var table = document.querySelector("#neurons-section #neurons");
  if (table) {
    table.before(h("p", {class: "note", id: "stats-columns-note"}, "From the corpus pass: freq_pos is the share of " +
      "its tokens on which a neuron's pre-activation is positive" + (S.gated ? ", freq_gn the share on which its " +
      "gate is negative (freq_gn_ip + freq_gn_in)" : "") + "; both sort and filter like the other columns (" +
      (S.gated ? "freq_gn>0.6" : "freq_pos<0.1") + ")."));
  }
  var stats = document.querySelector("header .stats");
  if (stats) {
    stats.append(h("div", {class: "stat", title: "the corpus pass joined onto this scan (--activations)"},
      h("div", {class: "k"}, "corpus tokens"), h("div", {class: "v"}, int(S.tokens))));
  }
  document.documentElement.setAttribute("data-stats-ready", "1");
})();
