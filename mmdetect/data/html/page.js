// mmdetect's report page: hand-written SVG charts and a virtualised, sortable table, no library.
// Every value that comes from the data (model names, token strings, provenance) is put on the page with
// textContent or setAttribute, never parsed as HTML.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("mmdetect-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var app = document.getElementById("app");

  // -- small helpers ------------------------------------------------------------------------------------------------

  function put(e, attrs, kids) {
    if (attrs) {
      for (var k in attrs) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") e.setAttribute("class", v);
        else if (k === "text") e.textContent = v;
        else if (k.slice(0, 2) === "on") e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
      }
    }
    for (var i = 0; i < kids.length; i++) {
      var c = kids[i];
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) put(e, null, c);
      else e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }
  function h(tag, attrs) { return put(document.createElement(tag), attrs, [].slice.call(arguments, 2)); }
  function s(tag, attrs) { return put(document.createElementNS(NS, tag), attrs, [].slice.call(arguments, 2)); }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function int(v) { return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–"; }
  function pct(v, d) { return isNum(v) ? (100 * v).toFixed(d === undefined ? 1 : d) + "%" : "–"; }
  function sg(v, d) {
    if (!isNum(v)) return "–";
    d = d === undefined ? 3 : d;
    return (v > 0 ? "+" : "") + v.toFixed(d);
  }
  function g3(v) { return isNum(v) ? (Math.abs(v) >= 1e4 || (v !== 0 && Math.abs(v) < 1e-3) ? v.toExponential(2) : +v.toPrecision(4) + "") : "–"; }
  function clamp(v, lo, hi) { return Math.max(lo, Math.min(hi, v)); }
  function niceTicks(lo, hi, n) {
    var span = hi - lo;
    if (!(span > 0)) return [lo];
    var step0 = span / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(step0))), e = step0 / mag;
    var step = mag * (e >= 7.5 ? 10 : e >= 3.5 ? 5 : e >= 1.5 ? 2 : 1), out = [];
    for (var v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
    return out;
  }
  function shown(str) { return String(str).replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "␍"); }
  function tok(str) { return h("span", {class: "tok", title: JSON.stringify(String(str))}, shown(str)); }
  function kv(obj) {
    var t = h("table", {class: "kv"});
    Object.keys(obj).forEach(function (k) {
      var v = obj[k];
      if (v === null || v === undefined || v === "") return;
      t.append(h("tr", null, h("th", null, k), h("td", null, typeof v === "string" ? v : JSON.stringify(v))));
    });
    return t;
  }
  function stat(k, v, hot, title) {
    return h("div", {class: "stat" + (hot ? " hot" : ""), title: title || null},
      h("div", {class: "k"}, k), h("div", {class: "v"}, v));
  }
  var redraws = [], resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(function () { redraws.forEach(function (f) { f(); }); }, 150);
  });
  function chart(box, draw) {
    var f = function () { box.replaceChildren(); draw(box, Math.max(280, box.clientWidth || 600)); };
    redraws.push(f);
    return f;
  }

  // -- tooltip ------------------------------------------------------------------------------------------------------

  var tip = h("div", {class: "tip", role: "tooltip", hidden: "hidden"});
  document.body.append(tip);
  function showTip(ev, lines) {
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
  function hideTip() { tip.hidden = true; }
  function svgX(svg, ev) {
    var r = svg.getBoundingClientRect(), w = +svg.getAttribute("width");
    return (ev.clientX - r.left) * (w / (r.width || w));
  }

  // -- cell formatting ----------------------------------------------------------------------------------------------

  function cellText(v, kind, col) {
    if (v === null || v === undefined) return "";
    if (kind === "bool") return v ? "true" : "false";
    if (kind === "int") return String(v);
    if (kind === "float") {
      var a = Math.abs(v);
      if (v === 0) return "0";
      if (col === "p" || a < 1e-3 || a >= 1e5) return v.toExponential(2);
      if (col === "z") return v.toFixed(2);
      if (col === "seconds") return v.toFixed(1);
      return a >= 100 ? v.toFixed(1) : v.toFixed(4);
    }
    return String(v);
  }

  // -- the table ----------------------------------------------------------------------------------------------------
  // Rows are rendered only where the scroller shows them (plus a margin), between two spacer rows, so 50,000 rows
  // cost what 60 do. Sort keys are typed arrays built once per column; missing values sort last both ways.

  var collator = new Intl.Collator("en", {numeric: true, sensitivity: "base"});

  function Table(spec, opt) {
    var self = this;
    this.opt = opt || {};
    this.cols = spec.columns; this.kinds = spec.kinds; this.data = spec.data; this.n = spec.rows;
    this.ci = {};
    this.cols.forEach(function (c, i) { self.ci[c] = i; });
    this.keys = {}; this.text = null; this.sortCol = null; this.sortDir = 0; this.query = ""; this.layer = null;
    this.cur = -1; this.rowH = 24; this.view = new Int32Array(this.n);
    for (var i = 0; i < this.n; i++) this.view[i] = i;
    this.search = h("input", {type: "search", placeholder: opt.placeholder || "search rows, or filter: layer=3  cos<-0.6",
      "aria-label": "search " + (opt.name || "rows"), spellcheck: "false"});
    this.count = h("span", {class: "count", "aria-live": "polite"});
    this.chips = h("span", {class: "chips"});
    this.box = h("div", {class: "tablebox", id: opt.id || null},
      h("div", {class: "toolbar"}, this.search, this.count, this.chips));
    if (!this.n) {
      this.box.append(h("div", {class: "empty"}, opt.empty || "no rows"));
      this.updateCount();
      return;
    }
    this.thead = h("thead");
    this.tbody = h("tbody");
    var tr = h("tr");
    var colgroup = h("colgroup");
    var widths = this.widths(), total = 0;
    this.cols.forEach(function (c, j) {
      var left = self.kinds[j] === "str";
      var th = h("th", {class: left ? "left" : null, scope: "col", tabindex: "0", "aria-sort": "none",
        "data-col": c, title: "sort by " + c + " (click again to reverse)"}, c);
      th.addEventListener("click", function () { self.sortBy(c); });
      th.addEventListener("keydown", function (ev) {
        if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); self.sortBy(c); }
      });
      tr.append(th);
      var col = h("col");
      col.style.width = "calc(" + widths[j] + "ch + 26px)";
      total += widths[j];
      colgroup.append(col);
    });
    this.thead.append(tr);
    this.table = h("table", {class: "data"}, colgroup, this.thead, this.tbody);
    this.table.style.width = "calc(" + total + "ch + " + 26 * this.cols.length + "px)";
    this.scroller = h("div", {class: "tscroll", tabindex: "-1"}, this.table);
    this.box.append(this.scroller);
    var pending = false;
    this.scroller.addEventListener("scroll", function () {
      if (pending) return;
      pending = true;
      requestAnimationFrame(function () { pending = false; self.render(); });
    });
    var timer = null;
    this.search.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { self.query = self.search.value; self.refresh(); }, 90);
    });
    this.tbody.addEventListener("click", function (ev) {
      var row = ev.target.closest("tr.r");
      if (row) self.pick(+row.getAttribute("data-i"));
    });
    this.tbody.addEventListener("keydown", function (ev) {
      var row = ev.target.closest("tr.r");
      if (row && ev.key === "Enter") self.pick(+row.getAttribute("data-i"));
    });
    this.updateCount();
  }
  Table.prototype.value = function (c, i) { var j = this.ci[c]; return j === undefined ? null : this.data[j][i]; };
  Table.prototype.cell = function (j, i) { return cellText(this.data[j][i], this.kinds[j], this.cols[j]); };
  Table.prototype.widths = function () {
    // Column widths from a sample of rows, so that they do not jump while scrolling.
    var self = this, step = Math.max(1, Math.floor(this.n / 4000));
    return this.cols.map(function (c, j) {
      var w = c.length + 1;
      for (var i = 0; i < self.n; i += step) w = Math.max(w, self.cell(j, i).length);
      for (var k = 0; k < Math.min(self.n, 200); k++) w = Math.max(w, self.cell(j, k).length);
      return clamp(w, 4, self.kinds[j] === "str" ? 30 : 16);
    });
  };
  Table.prototype.mounted = function () {
    if (!this.n) return;
    this.render();
    var r = this.tbody.querySelector("tr.r");
    var hgt = r ? r.getBoundingClientRect().height : 0;
    if (hgt > 0 && Math.abs(hgt - this.rowH) > 0.25) { this.rowH = hgt; this.render(); }
  };
  Table.prototype.spacer = function (px) {
    var td = h("td", {colspan: String(this.cols.length)});
    td.style.height = px + "px";
    return h("tr", {class: "spacer", "aria-hidden": "true"}, td);
  };
  Table.prototype.render = function () {
    if (!this.n) return;
    var total = this.view.length, rh = this.rowH, sc = this.scroller;
    var hgt = Math.max(sc.clientHeight, window.innerHeight || 800);  // before the first rows, clientHeight is the header's
    var first = Math.max(0, Math.min(Math.floor((sc.scrollTop - 28) / rh) - 8, total - 1));
    var last = Math.min(total, first + Math.ceil(hgt / rh) + 16);
    var frag = document.createDocumentFragment();
    if (first > 0) frag.append(this.spacer(first * rh));
    for (var k = first; k < last; k++) frag.append(this.row(this.view[k]));
    if (last < total) frag.append(this.spacer((total - last) * rh));
    if (!total) frag.append(h("tr", null, h("td", {colspan: String(this.cols.length), class: "left empty"},
      "no row matches")));
    this.tbody.replaceChildren(frag);
  };
  Table.prototype.row = function (i) {
    var tr = document.createElement("tr"), cls = "r";
    if (this.opt.rowClass) cls += this.opt.rowClass(this, i);
    if (i === this.cur) cls += " cur";
    tr.className = cls;
    tr.setAttribute("data-i", i);
    tr.tabIndex = 0;
    for (var j = 0; j < this.cols.length; j++) {
      var td = document.createElement("td");
      td.textContent = this.cell(j, i);
      if (this.kinds[j] === "str") td.className = "left";
      tr.append(td);
    }
    return tr;
  };
  Table.prototype.key = function (c) {
    if (this.keys[c]) return this.keys[c];
    var j = this.ci[c], col = this.data[j], n = this.n, k = new Float64Array(n), i;
    var numeric = this.kinds[j] !== "str" || col.every(function (v) {
      return v === null || (String(v).trim() !== "" && isFinite(+v));
    });
    if (numeric) {
      for (i = 0; i < n; i++) k[i] = col[i] === null ? NaN : +col[i];
    } else {
      var uniq = Array.from(new Set(col.filter(function (v) { return v !== null; }).map(String))).sort(collator.compare);
      var rank = new Map();
      uniq.forEach(function (u, r) { rank.set(u, r); });
      for (i = 0; i < n; i++) k[i] = col[i] === null ? NaN : rank.get(String(col[i]));
    }
    this.keys[c] = k;
    return k;
  };
  Table.prototype.sortBy = function (c) {
    if (this.sortCol === c) this.sortDir = -this.sortDir;
    else { this.sortCol = c; this.sortDir = 1; }
    var self = this;
    this.thead.querySelectorAll("th").forEach(function (th) {
      th.setAttribute("aria-sort", th.getAttribute("data-col") !== c ? "none" :
        self.sortDir > 0 ? "ascending" : "descending");
    });
    this.refresh();
  };
  Table.prototype.rowText = function (i) {
    if (!this.text) this.text = new Array(this.n);
    var t = this.text[i];
    if (t === undefined) {
      var parts = [];
      for (var j = 0; j < this.cols.length; j++) parts.push(this.cell(j, i));
      if (this.opt.label) parts.push(this.opt.label(this, i));
      t = this.text[i] = parts.join(" \u0001").toLowerCase();
    }
    return t;
  };
  Table.prototype.predicate = function () {
    var self = this, tests = [];
    var terms = this.query.trim().split(/\s+/).filter(function (t) { return t; });
    terms.forEach(function (term) {
      var m = /^([A-Za-z_][\w.]*)(<=|>=|==|=|<|>|:)(.*)$/.exec(term);
      if (m && self.ci[m[1]] !== undefined && m[3] !== "") {
        var c = m[1], op = m[2], raw = m[3], j = self.ci[c], kind = self.kinds[j], col = self.data[j];
        var want = kind === "bool" ? ({"true": 1, "yes": 1, "1": 1, "false": 0, "no": 0, "0": 0})[raw.toLowerCase()] : +raw;
        if (want !== undefined && isFinite(want) && (kind !== "str" || op !== ":")) {
          var key = self.key(c);
          tests.push(function (i) {
            var x = key[i];
            if (x !== x) return false;
            if (kind === "str" && self.kinds[j] === "str" && !isFinite(+col[i])) return false;
            switch (op) {
              case "<": return x < want; case "<=": return x <= want;
              case ">": return x > want; case ">=": return x >= want;
              default: return x === want;
            }
          });
          return;
        }
        var low = raw.toLowerCase();
        tests.push(function (i) {
          var v = col[i];
          if (v === null) return false;
          var t = String(v).toLowerCase();
          return op === ":" ? t.indexOf(low) >= 0 : (op === "=" || op === "==") ? t === low : false;
        });
        return;
      }
      var needle = term.toLowerCase();
      if (self.opt.label && /^l\d+(\/e\S+)?[nh]\d+$/.test(needle)) {  // a label such as L3N7 matches exactly
        tests.push(function (i) { return String(self.opt.label(self, i)).toLowerCase() === needle; });
        return;
      }
      tests.push(function (i) { return self.rowText(i).indexOf(needle) >= 0; });
    });
    if (this.layer !== null && this.ci.layer !== undefined) {
      var lk = this.key("layer"), want = this.layer;
      tests.push(function (i) { return lk[i] === want; });
    }
    if (!tests.length) return null;
    return function (i) {
      for (var t = 0; t < tests.length; t++) if (!tests[t](i)) return false;
      return true;
    };
  };
  Table.prototype.refresh = function () {
    var pred = this.predicate(), n = this.n, idx = [], i;
    for (i = 0; i < n; i++) if (!pred || pred(i)) idx.push(i);
    var v = Int32Array.from(idx);
    if (this.sortCol !== null) {
      var k = this.key(this.sortCol), d = this.sortDir;
      v.sort(function (a, b) {
        var x = k[a], y = k[b], xn = x !== x, yn = y !== y;
        if (xn || yn) return xn && yn ? a - b : xn ? 1 : -1;
        return x === y ? a - b : x < y ? -d : d;
      });
    }
    this.view = v;
    if (this.scroller) this.scroller.scrollTop = 0;
    this.render();
    this.updateCount();
  };
  Table.prototype.updateCount = function () {
    var shownRows = this.view.length;
    this.count.textContent = (shownRows === this.n ? int(this.n) : int(shownRows) + " of " + int(this.n)) +
      (this.n === 1 ? " row" : " rows");
    this.box.setAttribute("data-shown", String(shownRows));
    this.box.setAttribute("data-total", String(this.n));
  };
  Table.prototype.setLayer = function (layer) {
    var self = this;
    this.layer = layer;
    this.chips.replaceChildren();
    if (layer !== null) {
      this.chips.append(h("span", {class: "chip"}, "layer " + layer,
        h("button", {type: "button", title: "show every layer", "aria-label": "clear the layer filter",
          onclick: function () { (self.opt.onClearLayer || function () { self.setLayer(null); })(); }}, "×")));
    }
    this.refresh();
  };
  Table.prototype.pick = function (i) {
    this.cur = i;
    this.render();
    if (this.opt.onRow) this.opt.onRow(this, i);
  };

  // -- neuron labels and panels -------------------------------------------------------------------------------------

  function neuronLabel(layer, expert, neuron) {
    return "L" + layer + (expert !== null && expert !== undefined && expert !== "" ? "/E" + expert : "") + "N" + neuron;
  }
  function panelKey(t, i) {
    var e = t.value("expert", i);
    return String(t.value("layer", i)) + "|" + (e === null || e === undefined ? "" : String(e)) + "|" +
      String(t.value("neuron", i));
  }

  var drawer = h("aside", {class: "drawer", id: "panel", hidden: "hidden", "aria-label": "neuron panel",
    tabindex: "-1"});
  document.body.append(drawer);
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") drawer.hidden = true; });

  function openDrawer(kids) {
    var close = h("button", {class: "close", type: "button", title: "close (Esc)", "aria-label": "close",
      onclick: function () { drawer.hidden = true; }}, "×");
    drawer.replaceChildren.apply(drawer, [close].concat(kids));
    drawer.hidden = false;
    drawer.scrollTop = 0;
    drawer.focus({preventScroll: true});
  }

  function miniTable(head, rows, numeric) {
    var t = h("table", {class: "mini"});
    t.append(h("thead", null, h("tr", null, head.map(function (c) { return h("th", null, c); }))));
    var body = h("tbody");
    rows.forEach(function (r) {
      body.append(h("tr", null, r.map(function (c, j) {
        return h("td", {class: numeric && numeric[j] ? "num" : null}, c);
      })));
    });
    t.append(body);
    return t;
  }

  function writerRows(list) {
    return (list || []).map(function (e, k) {
      var extra = e.kind === "head" ? (isNum(e.subspace) ? "subspace " + e.subspace.toFixed(3) : "") : sg(e.cos);
      return [String(k + 1), e.kind === "token" && e.token !== undefined ? h("span", null, "embed ", tok(e.token)) :
        (e.label || ""), e.kind || "", isNum(e.score) ? e.score.toFixed(3) : "–", extra];
    });
  }

  function histSvg(hist, width) {
    var counts = hist.counts || [], edges = hist.edges || [], W = width, H = 70, top = Math.max.apply(null, counts.concat([1]));
    var svg = s("svg", {class: "chart", width: W, height: H + 16, viewBox: "0 0 " + W + " " + (H + 16),
      role: "img", "aria-label": "activation histogram"});
    var bw = (W - 2) / Math.max(1, counts.length);
    counts.forEach(function (c, k) {
      var bh = c ? Math.max(1, (H - 4) * Math.sqrt(c / top)) : 0;
      var r = s("rect", {class: "hist", x: 1 + k * bw, y: H - bh, width: Math.max(1, bw - 1), height: bh});
      r.addEventListener("mousemove", function (ev) {
        showTip(ev, [(edges[k] !== undefined ? g3(edges[k]) + " … " + g3(edges[k + 1]) : "bin " + k), int(c) + " tokens"]);
      });
      r.addEventListener("mouseleave", hideTip);
      svg.append(r);
    });
    svg.append(s("line", {class: "axis", x1: 0, x2: W, y1: H + 0.5, y2: H + 0.5, stroke: "#9aa4ad"}));
    if (edges.length) {
      svg.append(s("text", {x: 1, y: H + 13}, g3(edges[0])));
      svg.append(s("text", {x: W - 1, y: H + 13, "text-anchor": "end"}, g3(edges[edges.length - 1])));
    }
    return svg;
  }

  function neuronPanel(t, i, doc) {
    var layer = t.value("layer", i), expert = t.value("expert", i), neuron = t.value("neuron", i);
    var kids = [h("h2", null, neuronLabel(layer, expert, neuron))];
    var facts = "layer " + layer + (expert !== null && expert !== undefined ? " · expert " + expert : "") +
      " · neuron " + neuron + " · cos(read, write) " + sg(t.value("cos", i)) +
      (isNum(t.value("z", i)) ? " · z " + sg(t.value("z", i), 1) : "") +
      (t.value("class", i) ? " · " + t.value("class", i) : "");
    kids.push(h("p", null, facts));
    if (isNum(t.value("cos_gate_out", i)))
      kids.push(h("p", {class: "muted small"}, "cos(gate, out) " + sg(t.value("cos_gate_out", i)) +
        " · cos(gate, in) " + sg(t.value("cos_gate_in", i))));
    if (!doc) {
      kids.push(h("p", {class: "warn"}, "No explain results for this neuron in this report: panels are computed " +
        "for the top flagged neurons. For this one run: mmdetect explain MODEL --layer " + layer +
        (expert !== null && expert !== undefined ? " --expert " + expert : "") + " --neuron " + neuron));
      var row = {};
      t.cols.forEach(function (c, j) { row[c] = t.cell(j, i); });
      kids.push(h("h3", null, "This row"), kv(row));
      return kids;
    }
    var nrn = doc.neuron || {};
    if (doc.below_threshold) kids.push(h("p", {class: "warn below"}, "Below the threshold (cos ≤ " +
      doc.below_threshold.threshold + "): explained because " + int(doc.below_threshold.flagged) +
      " neurons are flagged, fewer than the " + int(doc.below_threshold.top_k) + " panels the page explains."));
    if (nrn.null_band) kids.push(h("p", {class: "muted small"}, "random directions in d_model " + (nrn.d_model || "?") +
      ": 95% of cosines within ±" + (isNum(nrn.null_band[1]) ? nrn.null_band[1].toFixed(3) : "?")));
    if (doc.attention_gap) kids.push(h("p", {class: "warn"}, doc.attention_gap));
    var wr = doc.writers || {};
    var writers = h("section", {class: "writers"}, h("h3", null, "Upstream writers of what it reads"));
    writers.append(h("p", {class: "note"}, "score: |cos(write, r̂)| for neurons and embedding tokens (random " +
      "directions: < " + (wr.null_band && isNum(wr.null_band[1]) ? wr.null_band[1].toFixed(3) : "?") +
      "); for heads, the share of their output energy along r̂" + (wr.parallel_block ? " (parallel block)" : "") + "."));
    if (wr.top && wr.top.length) {
      writers.append(miniTable(["#", "writer", "kind", "score", "cos / subspace"], writerRows(wr.top),
        [true, false, false, true, true]));
    } else writers.append(h("p", {class: "muted"}, "no upstream writer (the first layer, or nothing before it)"));
    ["neurons", "heads", "tokens"].forEach(function (kind) {
      if (wr[kind] && wr[kind].length) {
        writers.append(h("details", null, h("summary", null, "top " + kind + " (" + wr[kind].length + ")"),
          miniTable(["#", "writer", "kind", "score", "cos / subspace"], writerRows(wr[kind]),
            [true, false, false, true, true])));
      }
    });
    kids.push(writers);
    var voc = doc.vocab;
    if (voc) {
      var vbox = h("div", {class: "vocab"});
      [["reads (cos)", voc.reads, "cos"], ["reads against (cos)", voc.reads_negative, "cos"],
        ["promotes (logit)", voc.promotes, "logit"], ["suppresses (logit)", voc.suppresses, "logit"]]
        .forEach(function (spec) {
          if (!spec[1] || !spec[1].length) return;
          var list = h("div", null, h("div", {class: "small muted"}, spec[0]));
          spec[1].forEach(function (e) {
            list.append(h("div", {class: "small"}, tok(e.token !== undefined && e.token !== null ? e.token : "#" + e.token_id),
              " ", h("span", {class: "muted"}, spec[2] === "cos" ? sg(e.cos) : g3(e.logit))));
          });
          vbox.append(list);
        });
      kids.push(h("section", {class: "vocabview"}, h("h3", null, "Vocabulary view"),
        h("p", {class: "note"}, "tokens whose unembedding direction (with the final norm's gain) the read vector aligns " +
          "with, and the tokens the write vector promotes and suppresses (logit per unit activation, minus the " +
          "vocabulary mean)" + (doc.tokens ? "; tokens from " + doc.tokens : "")), vbox));
    }
    var act = doc.activations;
    if (act && act.skipped) {
      kids.push(h("section", {class: "evidence"}, h("h3", null, "Activation evidence"),
        h("p", {class: "muted"}, "not computed: " + act.skipped)));
    } else if (act && act.distribution) {
      var dist = act.distribution, dele = act.deletion || {}, q = dist.quantiles || {};
      var ev = h("section", {class: "evidence"}, h("h3", null, "Activation evidence"));
      ev.append(h("p", {class: "small"}, "on " + (act.source || "text") + ": " + int(dist.tokens) + " tokens · mean " +
        g3(dist.mean) + " · median " + g3(q.q50) + " · q99 " + g3(q.q99) + " · max " + g3(dist.max) + " · min " +
        g3(dist.min)));
      if (dist.histogram) ev.append(histSvg(dist.histogram, 320));
      ev.append(h("p", null, h("span", {class: "score"}, "deletion score " + sg(dele.score)),
        h("span", {class: "muted small"}, " over the " + int(dele.tokens) + " tokens where |activation| is largest: " +
          "the fraction of the residual's component along r̂ that the neuron's own write removes (1 erases it, " +
          "0 leaves it, < 0 amplifies it)")));
      if (act.contexts && act.contexts.length) {
        ev.append(miniTable(["act", "removed", "context" + (act.tokens === "bytes" ? " (UTF-8 bytes)" : "")],
          act.contexts.map(function (c) {
            return [g3(c.activation), isNum(c.fraction_removed) ? c.fraction_removed.toFixed(2) : "",
              h("span", {class: "ctx"}, shown(c.before || ""), h("mark", null, shown(c.token || "")), shown(c.after || ""))];
          }), [true, true, false]));
      }
      kids.push(ev);
    }
    return kids;
  }

  // -- scan page: header ----------------------------------------------------------------------------------------------

  function conventionBox(name, note) {
    var cls = name === "folded" ? "" : name === "raw" ? " raw" : " unknown";
    return h("div", {class: "convention" + cls, id: "convention"},
      h("div", {class: "name"}, (name || "unknown") + " convention"), h("div", null, note));
  }

  function scanHeader() {
    var p = D.provenance || {}, t = D.totals;
    var head = h("header", null, h("h1", null, D.name || p.model || "mmdetect scan"));
    var sub = [D.name && p.model && D.name !== p.model ? String(p.model) : null, p.model_type, p.family && p.family !== p.model_type ? "family " + p.family : null, p.format,
      p.heuristic ? "heuristic layout" : null].filter(function (x) { return x; }).join(" · ");
    if (sub) head.append(h("div", {class: "muted"}, sub));
    head.append(conventionBox(D.convention.name, D.convention.note));
    var stats = h("div", {class: "stats"});
    stats.append(stat("threshold", D.threshold !== null ? "cos ≤ " + D.threshold : "unknown"));
    stats.append(stat("neurons", int(t.n_neurons)));
    stats.append(stat("flagged", int(t.n_flagged) + " (" + pct(t.share_flagged, 2) + ")", t.n_flagged > 0));
    stats.append(stat("layers", int(t.n_layers)));
    stats.append(stat("most negative cos", sg(t.min_cos)));
    if (t.n_dead) stats.append(stat("dead (no cos)", int(t.n_dead)));
    if (p.revision) stats.append(stat("revision", String(p.revision).slice(0, 12), false, String(p.revision)));
    else if (p.fingerprint) stats.append(stat("fingerprint", String(p.fingerprint).slice(0, 16) + "…", false,
      String(p.fingerprint)));
    stats.append(stat("mmdetect", p.version ? String(p.version) : "?"));
    head.append(stats);
    head.append(h("details", {class: "prov", id: "provenance"}, h("summary", null, "Provenance (as recorded)"), kv(p)));
    return head;
  }

  // -- scan page: per-layer charts --------------------------------------------------------------------------------------

  var layerSel = {cur: null, marks: {}, listeners: []};  // marks: per chart, the row backgrounds to highlight
  function pickLayer(layer) {
    layerSel.cur = layerSel.cur === layer ? null : layer;
    layerSel.listeners.forEach(function (f) { f(layerSel.cur); });
    markLayers();
  }
  function markLayers() {
    Object.keys(layerSel.marks).forEach(function (k) {
      layerSel.marks[k].forEach(function (m) { m.el.classList.toggle("sel", m.layer === layerSel.cur); });
    });
  }

  function layerGeometry(n) {
    var rowH = clamp(Math.floor(560 / Math.max(1, n)), 9, 24);
    return {rowH: rowH, top: 8, bottom: 40, height: 8 + n * rowH + 40};
  }

  function layerTip(L) {
    var lines = ["layer " + L.layer + (L.d_model ? " · d_model " + L.d_model : ""),
      int(L.n_neurons) + " neurons · " + int(L.n_flagged) + " flagged (" + pct(L.share_flagged, 2) + ")" +
        (L.n_dead ? " · " + int(L.n_dead) + " dead" : ""),
      "min " + sg(L.min) + " · q01 " + sg(L.q01) + " · q05 " + sg(L.q05) + " · median " + sg(L.median)];
    if (isNum(L.null_lo)) lines.push("random-direction 95% band " + sg(L.null_lo) + " … " + sg(L.null_hi));
    if (isNum(L.emp_null_lo)) lines.push("empirical 95% band " + sg(L.emp_null_lo) + " … " + sg(L.emp_null_hi));
    return lines;
  }

  function drawDist(box, W) {
    var layers = D.layers, hist = D.hist, n = layers.length, thr = D.threshold, G = layerGeometry(n);
    var M = {l: 44, r: 12}, H = G.height, bw = (hist.hi - hist.lo) / hist.bins;
    var lo = Infinity, hi = -Infinity;
    hist.layers.forEach(function (r) {
      if (!r.counts.length) return;
      lo = Math.min(lo, hist.lo + r.first * bw);
      hi = Math.max(hi, hist.lo + (r.first + r.counts.length) * bw);
    });
    layers.forEach(function (L) {
      [L.null_lo, L.null_hi, L.emp_null_lo, L.emp_null_hi].forEach(function (v) {
        if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
      });
    });
    if (isNum(thr)) { lo = Math.min(lo, thr); hi = Math.max(hi, thr); }
    if (!isFinite(lo)) { lo = -1; hi = 1; }
    var pad = Math.max(0.01, 0.04 * (hi - lo));
    lo = Math.max(-1, lo - pad); hi = Math.min(1, hi + pad);
    var pw = W - M.l - M.r;
    function x(v) { return M.l + (v - lo) / (hi - lo) * pw; }
    // merge bins so that each drawn bin is at least 2 px wide
    var f = Math.max(1, Math.ceil(2 / (pw * bw / (hi - lo))));
    var svg = s("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "cos distribution per layer"}), marks = layerSel.marks.dist = [];
    niceTicks(lo, hi, Math.max(3, Math.floor(pw / 80))).forEach(function (v) {
      svg.append(s("line", {class: "grid", x1: x(v), x2: x(v), y1: G.top, y2: G.top + n * G.rowH}));
      svg.append(s("text", {x: x(v), y: G.top + n * G.rowH + 14, "text-anchor": "middle"}, sg(v, v === 0 ? 0 : 2)));
    });
    svg.append(s("text", {x: M.l + pw / 2, y: H - 6, "text-anchor": "middle"}, "cos(read, write)"));
    layers.forEach(function (L, k) {
      var y0 = G.top + k * G.rowH, rh = G.rowH, r = hist.layers[k] || {first: 0, counts: []};
      var bg = s("rect", {class: "rowbg" + (k % 2 ? " alt" : ""), x: 0, y: y0, width: W, height: rh});
      svg.append(bg);
      marks.push({el: bg, layer: L.layer});
      if (isNum(L.null_lo)) svg.append(s("rect", {class: "band-null", x: x(L.null_lo), y: y0 + 1,
        width: Math.max(1, x(L.null_hi) - x(L.null_lo)), height: rh - 2}));
      if (isNum(L.emp_null_lo)) svg.append(s("rect", {class: "band-emp", x: x(L.emp_null_lo), y: y0 + rh * 0.3,
        width: Math.max(1, x(L.emp_null_hi) - x(L.emp_null_lo)), height: rh * 0.4}));
      // merged bins on the page's grid (bin b covers [lo + b*bw, ...)); heights on a log scale per layer
      var merged = new Map(), peak = 0;
      r.counts.forEach(function (c, j) {
        if (!c) return;
        var b = Math.floor((r.first + j) / f);
        var v = (merged.get(b) || 0) + c;
        merged.set(b, v);
        if (v > peak) peak = v;
      });
      var norm = Math.log1p(peak || 1), dA = "", dF = "";
      merged.forEach(function (c, b) {
        var a = hist.lo + b * f * bw, e = a + f * bw, bh = Math.max(1, (rh - 3) * Math.log1p(c) / norm);
        var seg = "M" + x(Math.max(a, lo)).toFixed(1) + " " + (y0 + rh - 1) + "V" + (y0 + rh - 1 - bh).toFixed(1) +
          "H" + x(Math.min(e, hi)).toFixed(1) + "V" + (y0 + rh - 1) + "Z";
        if (isNum(thr) && (a + e) / 2 <= thr) dF += seg; else dA += seg;
      });
      if (dA) svg.append(s("path", {class: "hist", d: dA}));
      if (dF) svg.append(s("path", {class: "hist-flag", d: dF}));
      if (isNum(L.emp_null_lo)) [L.emp_null_lo, L.emp_null_hi].forEach(function (v) {  // its edges, over the bars
        svg.append(s("line", {class: "emp-edge", x1: x(v), x2: x(v), y1: y0 + 2, y2: y0 + rh - 1}));
      });
      svg.append(s("text", {x: M.l - 6, y: y0 + rh / 2 + 4, "text-anchor": "end"}, "L" + L.layer));
      var hit = s("rect", {class: "hit", x: 0, y: y0, width: W, height: rh, "data-layer": L.layer});
      hit.addEventListener("mousemove", function (ev) {
        var v = lo + (svgX(svg, ev) - M.l) / pw * (hi - lo), b = Math.floor((v - hist.lo) / (f * bw));
        var lines = layerTip(L);
        if (v >= lo && v <= hi) lines.push("cos " + sg(hist.lo + b * f * bw) + " … " + sg(hist.lo + (b + 1) * f * bw) +
          ": " + int(merged.get(b) || 0) + " neurons");
        lines.push("click: show this layer in the table");
        showTip(ev, lines);
      });
      hit.addEventListener("mouseleave", hideTip);
      hit.addEventListener("click", function () { pickLayer(L.layer); });
      svg.append(hit);
    });
    if (isNum(thr) && thr >= lo && thr <= hi) {
      svg.append(s("line", {class: "thr", x1: x(thr), x2: x(thr), y1: G.top - 4, y2: G.top + n * G.rowH}));
    }
    box.append(svg);
    markLayers();
  }

  function drawShare(box, W) {
    var layers = D.layers, n = layers.length, G = layerGeometry(n), M = {l: 44, r: 40}, H = G.height;
    var peak = Math.max.apply(null, layers.map(function (L) { return isNum(L.share_flagged) ? L.share_flagged : 0; }).concat([0]));
    var top = peak > 0 ? niceTicks(0, peak, 3).slice(-1)[0] : 0.01;
    if (top < peak) top = peak;
    var pw = W - M.l - M.r;
    function x(v) { return M.l + v / top * pw; }
    var svg = s("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "flagged share by layer"}), marks = layerSel.marks.share = [];
    niceTicks(0, top, Math.max(2, Math.floor(pw / 70))).forEach(function (v) {
      svg.append(s("line", {class: "grid", x1: x(v), x2: x(v), y1: G.top, y2: G.top + n * G.rowH}));
      svg.append(s("text", {x: x(v), y: G.top + n * G.rowH + 14, "text-anchor": "middle"}, pct(v, top < 0.05 ? 1 : 0)));
    });
    svg.append(s("text", {x: M.l + pw / 2, y: H - 6, "text-anchor": "middle"},
      "flagged share" + (isNum(D.threshold) ? " (cos ≤ " + D.threshold + ")" : "")));
    layers.forEach(function (L, k) {
      var y0 = G.top + k * G.rowH, rh = G.rowH;
      var bg = s("rect", {class: "rowbg" + (k % 2 ? " alt" : ""), x: 0, y: y0, width: W, height: rh});
      svg.append(bg);
      marks.push({el: bg, layer: L.layer});
      var v = isNum(L.share_flagged) ? L.share_flagged : 0;
      svg.append(s("rect", {class: "bar" + (v > 0 ? " on" : ""), x: M.l, y: y0 + 2, width: Math.max(v > 0 ? 1.5 : 0, x(v) - M.l),
        height: Math.max(1, rh - 4)}));
      svg.append(s("text", {x: M.l - 6, y: y0 + rh / 2 + 4, "text-anchor": "end"}, "L" + L.layer));
      if (L.n_flagged > 0 && rh >= 11) svg.append(s("text", {x: x(v) + 4, y: y0 + rh / 2 + 4}, int(L.n_flagged)));
      var hit = s("rect", {class: "hit", x: 0, y: y0, width: W, height: rh, "data-layer": L.layer});
      hit.addEventListener("mousemove", function (ev) {
        showTip(ev, ["layer " + L.layer, int(L.n_flagged) + " of " + int(L.n_neurons) + " neurons flagged (" +
          pct(L.share_flagged, 2) + ")", "click: show this layer in the table"]);
      });
      hit.addEventListener("mouseleave", hideTip);
      hit.addEventListener("click", function () { pickLayer(L.layer); });
      svg.append(hit);
    });
    if (peak === 0) svg.append(s("text", {x: M.l + 8, y: G.top + 14}, "no neuron is flagged in any layer"));
    box.append(svg);
    markLayers();
  }

  // -- scan page --------------------------------------------------------------------------------------------------------

  function tableSection(title, id, spec, intro, opt) {
    var sec = h("section", {id: id + "-section"}, h("h2", null, title));
    if (intro) sec.append(h("p", {class: "note"}, intro));
    if (spec.note) sec.append(h("p", {class: "warn"}, spec.note));
    if (spec.hidden && spec.hidden.length) sec.append(h("p", {class: "note"}, "columns with no value here, left out: " +
      spec.hidden.join(", ")));
    opt.id = id;
    var t = new Table(spec, opt);
    sec.append(t.box);
    return {section: sec, table: t};
  }

  function scanPage() {
    var t = D.totals, tables = D.tables;
    app.append(scanHeader());
    var per = h("section", {id: "layers-section"}, h("h2", null, "Per layer"));
    per.append(h("p", {class: "note"}, "The distribution of cos in each layer (bin counts on a log scale, each layer " +
      "scaled to its own peak; red bins are at or below the threshold), and beside or below it the share of each " +
      "layer's neurons that are flagged. Hover for the numbers; click a layer to show only its neurons in the table."));
    per.append(h("div", {class: "legend"},
      h("span", null, h("span", {class: "sw hist"}), "neurons (log scale)"),
      h("span", null, h("span", {class: "sw flag"}), "flagged"),
      h("span", null, h("span", {class: "sw null"}), "random-direction 95% band"),
      h("span", null, h("span", {class: "sw emp"}), "empirical 95% band (mismatched neuron pairs)"),
      h("span", null, h("span", {class: "sw thr"}), "threshold" + (isNum(D.threshold) ? " cos = " + D.threshold : ""))));
    var dist = h("div", {class: "chart-box", id: "dist-chart"}), share = h("div", {class: "chart-box", id: "share-chart"});
    per.append(h("div", {class: "charts"}, dist, share));
    if (!D.layers.length) per.append(h("p", {class: "empty"}, "no per-layer data"));
    app.append(per);

    var panels = D.panels || {}, nPanels = Object.keys(panels).length;
    var neurons = tableSection("Neurons", "neurons", tables.neurons,
      "Every flagged neuron (" + int(t.n_flagged) + ") plus the " + int(t.top_rows) + " most negative of the others: " +
      int(t.rows_in_table) + " of " + int(t.rows_given) + " rows (the CSV has every row). Click a column name to sort " +
      "(again to reverse); click a row for its panel" + (nPanels ? " (◆: explain results for " + nPanels + " neurons)" : "") +
      ". Search matches any cell or a label such as L3N7; filters: layer=3, cos<-0.6, flagged=true, class:weak.", {
        name: "neurons", placeholder: "search: L3N7, weakening, layer=3, cos<-0.6",
        rowClass: function (tb, i) {
          return (tb.value("flagged", i) ? " flagged" : "") + (panels[panelKey(tb, i)] ? " has-panel" : "");
        },
        label: function (tb, i) { return neuronLabel(tb.value("layer", i), tb.value("expert", i), tb.value("neuron", i)); },
        onRow: function (tb, i) { openDrawer(neuronPanel(tb, i, panels[panelKey(tb, i)])); },
        onClearLayer: function () { pickLayer(layerSel.cur); }
      });
    var notes = D.notes || {};
    if (notes.panels) neurons.section.insertBefore(h("p", {class: "note", id: "panels-note"}, "Panels: " + notes.panels),
      neurons.table.box);
    app.append(neurons.section);
    layerSel.listeners.push(function (layer) { neurons.table.setLayer(layer); });
    function leftOut(title, id, note) {  // a section that is not on this page, and why
      app.append(h("section", {id: id + "-section"}, h("h2", null, title),
        h("p", {class: "note left-out"}, "Not on this page: " + note)));
    }
    var mounted = [neurons.table];

    if (tables.heads) {
      var heads = tableSection("Attention heads", "heads", tables.heads, "Each head's OV circuit: copying = " +
        "Σ Re λ / Σ |λ| (−1: it writes back the negative of what it reads). Flagged heads are tinted. Click a column " +
        "name to sort.", {name: "heads", rowClass: function (tb, i) { return tb.value("flagged", i) ? " flagged" : ""; },
          label: function (tb, i) { return "L" + tb.value("layer", i) + "H" + tb.value("head", i); }});
      app.append(heads.section);
      mounted.push(heads.table);
    } else if (notes.heads) leftOut("Attention heads", "heads", notes.heads);
    if (tables.chains) {
      var chains = tableSection("Writer → deleter chains", "chains", tables.chains, "Pairs ranked by align × erase: " +
        "the writer's output along what the deleter reads, times how much of it the deleter erases. Click a row whose " +
        "deleter is a neuron to open its panel.", {name: "chains",
          onRow: function (tb, i) {
            if (tb.value("deleter_kind", i) !== "neuron") return;
            var nt = neurons.table, key = String(tb.value("deleter_layer", i)) + "|" +
              (tb.value("deleter_expert", i) === null ? "" : String(tb.value("deleter_expert", i))) + "|" +
              String(tb.value("deleter_index", i));
            for (var r = 0; r < nt.n; r++) if (panelKey(nt, r) === key) { nt.pick(r); return; }
          }});
      if (notes.chains) chains.section.insertBefore(h("p", {class: "note"}, notes.chains), chains.table.box);
      app.append(chains.section);
      mounted.push(chains.table);
    } else if (notes.chains) leftOut("Writer → deleter chains", "chains", notes.chains);
    app.append(h("footer", null, "mmdetect " + ((D.provenance || {}).version || "") + " · this page is self-contained " +
      "(no network access); it carries the per-layer summary, per-layer histograms and " + int(t.rows_in_table) +
      " rows; the scan's CSV has all " + int(t.rows_given) + "."));
    chart(dist, drawDist)();
    chart(share, drawShare)();
    mounted.forEach(function (tb) { tb.mounted(); });
  }

  // -- sweep page -------------------------------------------------------------------------------------------------------

  var HEAT = [[247, 247, 247], [253, 219, 199], [244, 165, 130], [214, 96, 77], [178, 24, 43], [103, 0, 31]];
  function heatColor(t) {
    if (!isNum(t)) return "#e4e7ea";
    t = clamp(t, 0, 1) * (HEAT.length - 1);
    var k = Math.min(HEAT.length - 2, Math.floor(t)), f = t - k, a = HEAT[k], b = HEAT[k + 1];
    return "rgb(" + [0, 1, 2].map(function (c) { return Math.round(a[c] + (b[c] - a[c]) * f); }).join(",") + ")";
  }
  function goTo(m) {
    var sec = document.getElementById(m.anchor);
    if (sec) sec.scrollIntoView({block: "start"});
  }

  function drawHeatmap(box, W) {
    var models = D.models, rowH = 20, maxLen = Math.max.apply(null, models.map(function (m) { return m.name.length; }).concat([4]));
    var M = {l: clamp(7 * maxLen + 14, 70, 230), r: 14, t: 6, b: 74};
    var H = M.t + models.length * rowH + M.b, pw = W - M.l - M.r, chars = Math.floor((M.l - 12) / 7);
    var peak = 0;
    models.forEach(function (m) { m.layers.forEach(function (L) { if (isNum(L.share_flagged)) peak = Math.max(peak, L.share_flagged); }); });
    var scale = peak > 0 ? peak : 1;
    function x(v) { return M.l + v * pw; }
    var svg = s("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "flagged share by model and relative depth"});
    models.forEach(function (m, i) {
      var y0 = M.t + i * rowH, name = m.name.length > chars ? m.name.slice(0, chars - 1) + "…" : m.name;
      var label = s("text", {class: "label", x: M.l - 6, y: y0 + rowH / 2 + 4, "text-anchor": "end"}, name);
      label.addEventListener("click", function () { goTo(m); });
      label.addEventListener("mousemove", function (ev) { showTip(ev, [m.name, m.model || "", "status " + (m.status || "?"), "click: go to its section"]); });
      label.addEventListener("mouseleave", hideTip);
      svg.append(label);
      if (!m.layers.length) {
        svg.append(s("rect", {x: M.l, y: y0 + 1, width: pw, height: rowH - 2, fill: "#f3f4f6"}));
        svg.append(s("text", {x: M.l + 6, y: y0 + rowH / 2 + 4, fill: "#c0392b"},
          (m.status || "no results") + (m.error ? ": " + m.error.slice(0, 120) : "")));
        return;
      }
      var n = Math.max(1, m.n_layers);
      m.layers.forEach(function (L) {
        var c = s("rect", {class: "cell", x: x(L.layer / n), y: y0 + 1, width: Math.max(1, x((L.layer + 1) / n) - x(L.layer / n)),
          height: rowH - 2, fill: heatColor(isNum(L.share_flagged) ? Math.sqrt(L.share_flagged / scale) : NaN)});
        c.addEventListener("mousemove", function (ev) {
          showTip(ev, [m.name + " · layer " + L.layer + " of " + n, "relative depth " +
            (n > 1 ? (L.layer / (n - 1)).toFixed(2) : "0") + " (layer / last layer)",
            "flagged " + (isNum(L.n_flagged) ? int(L.n_flagged) + " of " + int(L.n_neurons) + " (" + pct(L.share_flagged, 2) + ")" :
              pct(L.share_flagged, 2)), "click: go to its section"]);
        });
        c.addEventListener("mouseleave", hideTip);
        c.addEventListener("click", function () { goTo(m); });
        svg.append(c);
      });
    });
    var yb = M.t + models.length * rowH;
    svg.append(s("line", {class: "axis", x1: M.l, x2: M.l + pw, y1: yb + 0.5, y2: yb + 0.5, stroke: "#9aa4ad"}));
    [0, 0.25, 0.5, 0.75, 1].forEach(function (v) {
      svg.append(s("line", {x1: x(v), x2: x(v), y1: yb, y2: yb + 4, stroke: "#9aa4ad"}));
      svg.append(s("text", {x: x(v), y: yb + 16, "text-anchor": "middle"}, String(v)));
    });
    svg.append(s("text", {x: M.l + pw / 2, y: yb + 32, "text-anchor": "middle"},
      "relative depth (each layer spans its share of the model's layers)"));
    var lx = M.l, lw = Math.min(260, pw), steps = 48;
    for (var k = 0; k < steps; k++) svg.append(s("rect", {x: lx + k * lw / steps, y: yb + 44, width: lw / steps + 0.5,
      height: 10, fill: heatColor(k / (steps - 1))}));
    svg.append(s("text", {x: lx, y: yb + 68}, "0%"));
    svg.append(s("text", {x: lx + lw, y: yb + 68, "text-anchor": "end"}, pct(peak, 1)));
    svg.append(s("text", {x: lx + lw + 8, y: yb + 53}, "flagged share (colour ∝ √share)"));
    box.append(svg);
  }

  function drawModelChart(m) {
    return function (box, W) {
      var layers = m.layers.slice().sort(function (a, b) { return a.layer - b.layer; }), n = layers.length;
      var thr = isNum(m.threshold) ? m.threshold : null, hasQ = layers.some(function (L) { return isNum(L.median); });
      var M = {l: 50, r: 12, t: 18}, qH = hasQ ? 170 : 0, gap = hasQ ? 26 : 0, sH = 80, H = M.t + qH + gap + sH + 30;
      var pw = W - M.l - M.r, bw = pw / Math.max(1, n);
      function x(k) { return M.l + k * bw; }
      var svg = s("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
        "aria-label": "per-layer chart of " + m.name});
      if (hasQ) {
        var lo = Infinity, hi = -Infinity;
        layers.forEach(function (L) {
          [L.min, L.q01, L.median, L.null_hi, L.emp_null_hi, L.null_lo].forEach(function (v) {
            if (isNum(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
          });
        });
        if (thr !== null) { lo = Math.min(lo, thr); hi = Math.max(hi, thr); }
        var pad = 0.06 * (hi - lo || 1);
        lo -= pad; hi += pad;
        var y = function (v) { return M.t + (hi - v) / (hi - lo) * qH; };
        niceTicks(lo, hi, 4).forEach(function (v) {
          svg.append(s("line", {class: "grid", x1: M.l, x2: M.l + pw, y1: y(v), y2: y(v)}));
          svg.append(s("text", {x: M.l - 5, y: y(v) + 4, "text-anchor": "end"}, sg(v, 2)));
        });
        layers.forEach(function (L, k) {
          if (isNum(L.null_lo)) svg.append(s("rect", {class: "band-null", x: x(k), y: y(L.null_hi), width: bw + 0.3,
            height: Math.max(1, y(L.null_lo) - y(L.null_hi))}));
          if (isNum(L.emp_null_lo)) svg.append(s("rect", {class: "band-emp", x: x(k) + bw * 0.25, y: y(L.emp_null_hi),
            width: bw * 0.5, height: Math.max(1, y(L.emp_null_lo) - y(L.emp_null_hi))}));
        });
        [["median", "#4a5561"], ["q05", "#2b6cb0"], ["q01", "#7b3fb0"]].forEach(function (q) {
          var d = "";
          layers.forEach(function (L, k) { if (isNum(L[q[0]])) d += (d ? "L" : "M") + (x(k) + bw / 2).toFixed(1) + " " + y(L[q[0]]).toFixed(1); });
          if (d) svg.append(s("path", {class: "q-line", d: d, stroke: q[1]}));
        });
        layers.forEach(function (L, k) {
          if (isNum(L.min)) svg.append(s("circle", {class: "q-min", cx: x(k) + bw / 2, cy: y(L.min), r: 2.4}));
        });
        if (thr !== null) svg.append(s("line", {class: "thr", x1: M.l, x2: M.l + pw, y1: y(thr), y2: y(thr)}));
        svg.append(s("text", {x: 4, y: M.t - 6}, "cos by layer"));
      }
      var sTop = M.t + qH + gap, peak = Math.max.apply(null, layers.map(function (L) { return isNum(L.share_flagged) ? L.share_flagged : 0; }).concat([0]));
      var stop = peak > 0 ? peak : 0.01;
      function ys(v) { return sTop + sH - v / stop * sH; }
      svg.append(s("text", {x: M.l - 5, y: sTop + 8, "text-anchor": "end"}, pct(stop, stop < 0.05 ? 1 : 0)));
      svg.append(s("text", {x: M.l - 5, y: sTop + sH, "text-anchor": "end"}, "0%"));
      svg.append(s("text", {x: 4, y: sTop - 6}, "flagged share"));
      layers.forEach(function (L, k) {
        var v = isNum(L.share_flagged) ? L.share_flagged : 0;
        svg.append(s("rect", {class: "bar" + (v > 0 ? " on" : ""), x: x(k) + bw * 0.12, y: ys(v), width: Math.max(1, bw * 0.76),
          height: Math.max(v > 0 ? 1 : 0, sTop + sH - ys(v))}));
      });
      svg.append(s("line", {class: "axis", x1: M.l, x2: M.l + pw, y1: sTop + sH + 0.5, y2: sTop + sH + 0.5, stroke: "#9aa4ad"}));
      var every = Math.max(1, Math.ceil(n / Math.max(1, pw / 28)));
      layers.forEach(function (L, k) {
        if (k % every === 0) svg.append(s("text", {x: x(k) + bw / 2, y: sTop + sH + 14, "text-anchor": "middle"}, String(L.layer)));
        var hit = s("rect", {class: "hit", x: x(k), y: M.t, width: bw, height: sTop + sH - M.t});
        hit.addEventListener("mousemove", function (ev) { showTip(ev, layerTip(L)); });
        hit.addEventListener("mouseleave", hideTip);
        svg.append(hit);
      });
      svg.append(s("text", {x: M.l + pw / 2, y: H - 2, "text-anchor": "middle"}, "layer"));
      box.append(svg);
    };
  }

  function sweepPage() {
    var models = D.models, counts = D.counts || {};
    var head = h("header", null, h("h1", null, "mmdetect sweep · " + models.length + " model" + (models.length === 1 ? "" : "s")));
    var stats = h("div", {class: "stats"});
    ["ok", "drift", "failed", "skipped"].forEach(function (k) {
      if (counts[k]) stats.append(stat(k, int(counts[k]), k === "drift" || k === "failed"));
    });
    stats.append(stat("threshold", D.thresholds.length ? D.thresholds.map(function (t) { return "cos ≤ " + t; }).join(", ") : "?"));
    if (D.versions.length) stats.append(stat("mmdetect", D.versions.join(", ")));
    head.append(stats);
    if (D.conventions.length === 1) {
      var m0 = models.filter(function (m) { return m.convention; })[0];
      head.append(conventionBox(D.conventions[0], m0.convention_note));
    } else if (D.conventions.length > 1) {
      head.append(h("div", {class: "convention unknown"}, h("div", {class: "name"}, "mixed conventions"),
        h("div", null, "These models were scanned in different conventions (" + D.conventions.join(", ") +
          "): compare their numbers only within one convention.")));
    }
    app.append(head);
    var heat = h("div", {class: "chart-box", id: "heatmap"});
    app.append(h("section", {id: "heatmap-section"}, h("h2", null, "Flagged share by relative depth"),
      h("p", {class: "note"}, "One row per model; each cell is a layer, placed at its relative depth. Hover for the " +
        "numbers; click a row to go to the model's section."), heat));
    var sec = tableSection("Summary", "summary", D.table, "One row per model, as in summary.csv (the per-layer " +
      "share_L* columns are drawn above instead). Drifted and failed models are tinted; click a row to go to its section.", {
        name: "models", placeholder: "search models, or filter: status=drift",
        rowClass: function (tb, i) { var st = tb.value("status", i); return st === "drift" ? " drift" : st === "failed" ? " failed" : ""; },
        onRow: function (tb, i) { if (models[i]) goTo(models[i]); }
      });
    app.append(sec.section);
    var nav = h("nav", {class: "models", "aria-label": "models"}, h("span", {class: "muted"}, "Models:"));
    models.forEach(function (m) { nav.append(h("a", {href: "#" + m.anchor}, m.name)); });
    app.append(nav);
    var draws = [];
    models.forEach(function (m) {
      var msec = h("section", {class: "model", id: m.anchor});
      msec.append(h("h3", null, h("span", null, m.name), h("span", {class: "status " + (m.status || "")}, m.status || "?")));
      var p = m.provenance || {}, facts = [];
      if (m.model) facts.push(m.model);
      if (m.revision || p.revision) facts.push("revision " + String(m.revision || p.revision).slice(0, 12));
      else if (p.fingerprint) facts.push("fingerprint " + String(p.fingerprint).slice(0, 16) + "…");
      if (m.convention) facts.push(m.convention + " convention");
      if (isNum(m.threshold)) facts.push("cos ≤ " + m.threshold);
      if (isNum(m.n_neurons)) facts.push(int(m.n_neurons) + " neurons · " + int(m.n_flagged) + " flagged (" + pct(m.share_flagged, 2) + ")");
      if (isNum(m.min_cos)) facts.push("min cos " + sg(m.min_cos));
      msec.append(h("p", {class: "muted"}, facts.join(" · ")));
      if (m.drift) msec.append(h("p", {class: "warn drift-note"}, "drift: " + m.drift));
      if (m.error) msec.append(h("p", {class: "err"}, m.error));
      if (m.layers.length) {
        var box = h("div", {class: "chart-box model-chart"});
        msec.append(box);
        msec.append(h("div", {class: "legend"}, h("span", null, h("span", {class: "sw null"}), "random-direction band"),
          h("span", null, h("span", {class: "sw emp"}), "empirical band"),
          h("span", null, h("span", {class: "sw thr"}), "threshold"),
          h("span", null, "lines: median (grey), q05 (blue), q01 (purple); dots: min")));
        draws.push([box, drawModelChart(m)]);
      }
      if (Object.keys(p).length) msec.append(h("details", {class: "prov"}, h("summary", null, "Provenance"), kv(p)));
      app.append(msec);
    });
    app.append(h("footer", null, "mmdetect " + D.versions.join(", ") + " · this page is self-contained (no network access)."));
    chart(heat, drawHeatmap)();
    draws.forEach(function (d) { chart(d[0], d[1])(); });
    sec.table.mounted();
    if (location.hash) {
      var target = document.getElementById(location.hash.slice(1));
      if (target) target.scrollIntoView();
    }
  }

  // -- track page -------------------------------------------------------------------------------------------------------

  function drawTrackHeat(box, W) {
    var H0 = D.heat, steps = H0.steps, ids = H0.layers, share = H0.share_flagged || [];
    var rowH = clamp(Math.floor(480 / Math.max(1, ids.length)), 8, 22), M = {l: 48, r: 14, t: 6, b: 84};
    var H = M.t + ids.length * rowH + M.b, pw = W - M.l - M.r, cw = pw / Math.max(1, steps.length);
    var peak = 0;
    share.forEach(function (r) { r.forEach(function (v) { if (isNum(v)) peak = Math.max(peak, v); }); });
    var svg = s("svg", {class: "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
      "aria-label": "flagged share by layer and training step"});
    function cell(k, j, name) { var g = H0[name]; return g && g[k] ? g[k][j] : null; }
    ids.forEach(function (layer, k) {
      var y0 = M.t + k * rowH;
      if (rowH >= 9 || k % Math.ceil(9 / rowH) === 0)
        svg.append(s("text", {x: M.l - 6, y: y0 + rowH / 2 + 4, "text-anchor": "end"}, "L" + layer));
      steps.forEach(function (step, j) {
        var v = cell(k, j, "share_flagged");
        var c = s("rect", {class: "cell", x: M.l + j * cw, y: y0 + 0.5, width: Math.max(1, cw - (cw > 4 ? 1 : 0)),
          height: rowH - 1, fill: heatColor(isNum(v) ? Math.sqrt(v / (peak || 1)) : NaN), "data-layer": layer,
          "data-step": step});
        c.addEventListener("mousemove", function (ev) {
          showTip(ev, ["layer " + layer + " · step " + int(step),
            isNum(cell(k, j, "n_flagged")) ? int(cell(k, j, "n_flagged")) + " of " + int(cell(k, j, "n_neurons")) +
              " neurons flagged (" + pct(v, 2) + ")" : "flagged " + pct(v, 2),
            "min cos " + sg(cell(k, j, "min")) + " · median " + sg(cell(k, j, "median")),
            "click: show this layer in the tables"]);
        });
        c.addEventListener("mouseleave", hideTip);
        c.addEventListener("click", function () { pickLayer(layer); });
        svg.append(c);
      });
    });
    var yb = M.t + ids.length * rowH, every = Math.max(1, Math.ceil(steps.length / Math.max(1, pw / 70)));
    steps.forEach(function (step, j) {
      if (j % every && j !== steps.length - 1) return;
      var x = M.l + (j + 0.5) * cw;
      svg.append(s("line", {x1: x, x2: x, y1: yb, y2: yb + 4, stroke: "#9aa4ad"}));
      svg.append(s("text", {x: x, y: yb + 16, "text-anchor": "middle"}, int(step)));
    });
    svg.append(s("text", {x: M.l + pw / 2, y: yb + 32, "text-anchor": "middle"},
      "training step (checkpoints in order, equally spaced)"));
    var lw = Math.min(260, pw), n = 48;
    for (var q = 0; q < n; q++) svg.append(s("rect", {x: M.l + q * lw / n, y: yb + 44, width: lw / n + 0.5, height: 10,
      fill: heatColor(q / (n - 1))}));
    svg.append(s("text", {x: M.l, y: yb + 68}, "0%"));
    svg.append(s("text", {x: M.l + lw, y: yb + 68, "text-anchor": "end"}, pct(peak, 2)));
    svg.append(s("text", {x: M.l + lw + 8, y: yb + 53}, "flagged share of the layer (colour ∝ √share)"));
    box.append(svg);
  }

  function trackPage() {
    var T = D.track, tables = D.tables, steps = T.steps || [];
    var title = T.models.length === 1 ? T.models[0] : "track of " + steps.length + " checkpoints";
    var head = h("header", null, h("h1", null, title));
    if (T.models.length > 1) head.append(h("div", {class: "muted"}, T.models[0] + " … " + T.models[T.models.length - 1]));
    head.append(conventionBox(D.convention.name, D.convention.note));
    var stats = h("div", {class: "stats"});
    stats.append(stat("checkpoints", int(steps.length)));
    if (steps.length) stats.append(stat("steps", int(steps[0]) + " … " + int(steps[steps.length - 1])));
    stats.append(stat("threshold", isNum(D.threshold) ? "cos ≤ " + D.threshold : "unknown"));
    stats.append(stat("neurons", int(T.n_neurons)));
    stats.append(stat("flagged at the last step", int(T.n_final_flagged), T.n_final_flagged > 0));
    stats.append(stat("mmdetect", T.version ? String(T.version) : "?"));
    head.append(stats);
    head.append(h("details", {class: "prov", id: "provenance"}, h("summary", null, "Track options (as recorded)"),
      kv(Object.assign({}, T.options, {files: (T.files || []).join(", ")}))));
    app.append(head);
    var heat = h("div", {class: "chart-box", id: "track-heat"});
    app.append(h("section", {id: "heat-section"}, h("h2", null, "Flagged share by layer and training step"),
      h("p", {class: "note"}, "One row per layer, one column per checkpoint. Hover for the numbers; click a layer " +
        "to show only its rows in the tables below."), heat));
    var label = function (tb, i) { return neuronLabel(tb.value("layer", i), tb.value("expert", i), tb.value("neuron", i)); };
    var em = tableSection("Emergence", "emergence", tables.emergence, "Each neuron flagged at the last step (all " +
      "ever flagged with track --all): emerged_step starts its final flagged run, first_flagged_step is its first " +
      "flag, flips counts threshold crossings.", {name: "neurons", label: label,
        placeholder: "search: L3N7, layer=3, emerged_step>1000",
        rowClass: function (tb, i) { return isNum(tb.value("emerged_step", i)) ? " flagged" : ""; },
        onClearLayer: function () { pickLayer(layerSel.cur); }});
    var st = tableSection("Stability", "stability", tables.stability, "Per layer and pair of consecutive " +
      "checkpoints: Spearman's rank correlation of cos (1: the ranking held) and the Jaccard overlap of the flagged " +
      "sets.", {name: "rows", placeholder: "filter: layer=3, spearman<0.9",
        onClearLayer: function () { pickLayer(layerSel.cur); }});
    var ck = tableSection("Checkpoints", "checkpoints", tables.checkpoints, null, {name: "checkpoints",
      placeholder: "search checkpoints"});
    [em, st, ck].forEach(function (x) { app.append(x.section); });
    layerSel.listeners.push(function (layer) { em.table.setLayer(layer); st.table.setLayer(layer); });
    app.append(h("footer", null, "mmdetect " + (T.version || "") + " · this page is self-contained (no network " +
      "access); the long table (one row per neuron and step) stays in the track's folder."));
    chart(heat, drawTrackHeat)();
    [em, st, ck].forEach(function (x) { x.table.mounted(); });
  }

  if (D.kind === "sweep") sweepPage(); else if (D.kind === "track") trackPage(); else scanPage();
  document.documentElement.setAttribute("data-ready", "1");
})();
