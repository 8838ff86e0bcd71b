"""One self-contained HTML page per scan (or per sweep): charts, a sortable neuron table and neuron panels.

The page is a single file with no network access when opened: the style sheet and the script
(``mmdetect/data/html/page.css`` and ``page.js``, hand-written SVG and vanilla JavaScript, no library) are inlined,
and a Content-Security-Policy allows only those two (by hash) and no fetch of any kind. Everything that comes from a
checkpoint or a user (model names, token strings, provenance values) travels as data: one
``<script type="application/json">`` block in which ``<``, ``>`` and ``&`` are escaped as ``\\u003c``…, read with
``JSON.parse`` and put on the page with ``textContent`` only.

The page stays small whatever the model size: per layer it carries the summary and a histogram of cos (bin counts
computed here, not points), and the table carries every flagged neuron plus the ``top_rows`` most negative of the
rest. The CSV keeps every row.

Input is plain data, so any source works (a fresh scan, a CSV/Parquet/JSON output, a sweep folder):

* ``scan_page(columns, layers, provenance, explain=..., heads=..., chains=...)`` -> the page for one scan;
* ``sweep_page(summary, per_model)`` -> the page for a sweep; ``load_sweep(folder)`` reads a sweep's output folder
  into those two arguments.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mmdetect.report.featurepage import feature_script, is_feature_scan, link_column
from mmdetect.results.rows import is_flagged

ASSETS = Path(__file__).resolve().parents[1] / "data" / "html"
HIST_BINS = 800                 # cos in [-1, 1] in bins of 0.0025; the page merges them to fit its width
HIST_RANGE = (-1.0, 1.0)
MAX_ROWS = 50_000               # rows per table, whatever the model: keeps the page under 10 MB
FLOAT_DIGITS = 5                # significant digits of the floats in the page's tables (the CSV keeps them all)
INT_NAMES = {"rank", "layer", "neuron", "head", "kv_head", "writer_layer", "writer_index", "deleter_layer",
             "deleter_index", "n_neurons", "n_flagged", "n_dead", "d_model"}
CONVENTIONS = {
    "folded": "Folded: each read vector includes the gain of the norm feeding the MLP (and LayerNorm centring), each "
              "write vector the gain of any norm on the MLP's output, and gated MLPs are sign-canonicalised so that "
              "cos(gate, up) ≥ 0; these are the directions the network really reads and writes.",
    "raw": "Raw: plain cos(w_in, w_out) of the stored weights, with no norm gains folded in, no centring and no sign "
           "flip; norm gains can create or hide negative cosines, so compare raw numbers only with raw numbers.",
    "transformerlens": "TransformerLens: the weights as TransformerLens processes them by default (fold_ln, "
                       "center_writing_weights, center_unembed) with Gerstner & Schütze's gate sign flip, the route "
                       "of their published numbers. As folded, except that the gate is not centred and no norm after "
                       "the MLP (Gemma 2/3, OLMo 2) is folded into the write vector.",
}
UNKNOWN_CONVENTION = "The convention was not recorded with these results: say which one a number is in before " \
                     "comparing it."


# -- plain values -----------------------------------------------------------------------------------------------------

def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars and arrays to Python, NaN and inf to None, tuples to lists, keys to strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, bool, int)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    if hasattr(value, "item"):  # numpy and pandas scalars
        try:
            return _clean(value.item())
        except (ValueError, TypeError):
            pass
    return None if _missing(value) else str(value)  # pandas.NA and NaT are missing; anything else is text


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN, pandas.NA (raises on bool) aside
    except TypeError:
        return True


def _is_frame(data: Any) -> bool:
    return hasattr(data, "iloc") and hasattr(data, "columns")


def _columns(data: Any) -> dict[str, np.ndarray]:
    """Numpy columns of a DataFrame, a ``scanner.ScanResult`` or a dict of arrays. Nullable integers become floats
    with NaN; everything else keeps its dtype."""
    if data is None:
        return {}
    if _is_frame(data):
        out = {}
        for name in data.columns:
            col = data[name]
            dtype = str(col.dtype)
            if dtype in ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float32",
                         "Float64"):
                out[str(name)] = col.to_numpy(dtype="float64", na_value=np.nan)
            elif dtype in ("boolean", "str") or dtype.startswith("string"):
                out[str(name)] = col.to_numpy(dtype=object, na_value=None)
            else:
                out[str(name)] = col.to_numpy()
        return out
    if hasattr(data, "columns") and isinstance(data.columns, Mapping):  # ScanResult
        data = data.columns
    return {str(k): np.asarray(v) for k, v in data.items()}


def _kind(name: str, col: np.ndarray) -> str:
    """How the page sorts and shows a column: int, float, bool or str."""
    if col.dtype.kind == "b":
        return "bool"
    if col.dtype.kind in "iu":
        return "int"
    if col.dtype.kind == "f":
        finite = col[np.isfinite(col)]
        return "int" if name in INT_NAMES and np.all(finite == np.round(finite)) else "float"
    values = [v for v in col.tolist() if not _missing(v)]
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):
        return "bool"
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return "int"
    if values and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in values):
        return "float"
    return "str"


def _round_sig(x: np.ndarray, digits: int) -> np.ndarray:
    """``x`` rounded to ``digits`` significant digits, as the double nearest that decimal (so JSON writes it short).
    Non-finite values stay as they are."""
    x = np.asarray(x, dtype=np.float64)
    out = x.copy()
    ok = np.isfinite(x) & (np.abs(x) >= 1e-290)
    out[np.isfinite(x) & ~ok] = 0.0
    v = x[ok]
    if v.size:
        e = digits - 1 - np.floor(np.log10(np.abs(v))).astype(np.int64)
        pos = e >= 0
        r = np.empty_like(v)
        scale = np.power(10.0, e[pos])
        r[pos] = np.round(v[pos] * scale) / scale
        scale = np.power(10.0, -e[~pos])
        r[~pos] = np.round(v[~pos] / scale) * scale
        out[ok] = r
    return out


def _values(col: np.ndarray, kind: str) -> list:
    """A column as a JSON-ready list (None for missing values)."""
    if kind == "float":
        col = np.asarray(col, dtype=np.float64)
        vals = _round_sig(col, FLOAT_DIGITS).tolist()
        for i in np.flatnonzero(~np.isfinite(col)).tolist():
            vals[i] = None
        return vals
    if kind == "int":
        if col.dtype.kind == "f":
            vals = col.tolist()
            return [None if v != v else int(v) for v in vals]
        if col.dtype.kind in "iu":
            return col.tolist()
        return [None if _missing(v) else int(v) for v in col.tolist()]
    if kind == "bool":
        if col.dtype.kind == "b":
            return col.astype(np.int8).tolist()
        return [None if _missing(v) else int(bool(v)) for v in col.tolist()]
    return [None if _missing(v) else _text(v) for v in col.tolist()]


def _text(v: Any) -> str:
    """A cell as text; integral floats (an expert index read back from CSV) without the ``.0``."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def table_spec(columns: Mapping[str, np.ndarray], rows: np.ndarray | None = None, *,
               hide_empty: bool = True, note: str | None = None) -> dict[str, Any]:
    """The page's form of a table: column names (as in the CSV), kinds, and one value list per column.

    ``rows`` selects and orders rows (all rows when None). Columns with no value at all are left out of the page
    and listed under ``hidden``."""
    names, kinds, data, hidden = [], [], [], []
    for name, col in columns.items():
        col = np.asarray(col)
        if rows is not None:
            col = col[rows]
        kind = _kind(name, col)
        vals = _values(col, kind)
        if hide_empty and vals and all(v is None for v in vals):
            hidden.append(name)
            continue
        names.append(name)
        kinds.append(kind)
        data.append(vals)
    n = len(data[0]) if data else 0
    return {"columns": names, "kinds": kinds, "data": data, "rows": n, "hidden": hidden, "note": note}


def frame_spec(frame: Any, max_rows: int = MAX_ROWS, what: str = "rows") -> dict[str, Any] | None:
    """``table_spec`` of a whole DataFrame (heads, chains, a sweep summary), capped at ``max_rows``."""
    if frame is None:
        return None
    cols = _columns(frame)
    n = len(next(iter(cols.values()))) if cols else 0
    rows = None
    note = None
    if n > max_rows:
        rows = np.arange(max_rows)
        note = f"the first {max_rows:,} of {n:,} {what} (the file has them all)"
    return table_spec(cols, rows, note=note)


# -- the scan page ----------------------------------------------------------------------------------------------------

def _layer_rows(cols: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layer = np.asarray(cols["layer"], dtype=np.float64) if "layer" in cols else np.zeros(len(cols["cos"]))
    cos = np.asarray(cols["cos"], dtype=np.float64)
    if "flagged" in cols:
        flagged = np.array([False if _missing(v) else bool(v) for v in cols["flagged"].tolist()], dtype=bool) \
            if cols["flagged"].dtype == object else np.asarray(cols["flagged"], dtype=bool)
    else:
        flagged = np.zeros(len(cos), dtype=bool)
    return layer, cos, flagged


def histograms(layer: np.ndarray, cos: np.ndarray, layer_ids: list[int], bins: int = HIST_BINS) -> list[dict]:
    """Per layer in ``layer_ids``: counts of finite cos in ``bins`` equal bins over [-1, 1], stored from the first
    to the last non-empty bin ({"first": index, "counts": [...]}); one pass of bincount for all layers."""
    lo, hi = HIST_RANGE
    ids = np.asarray(layer_ids, dtype=np.float64)
    ok = np.isfinite(cos) & np.isin(layer, ids)
    pos = np.searchsorted(ids, layer[ok]) if len(ids) else np.zeros(0, dtype=np.int64)
    b = np.clip(((cos[ok] - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(pos * bins + b, minlength=len(ids) * bins).reshape(len(ids), bins)
    out = []
    for row in counts:
        nz = np.flatnonzero(row)
        out.append({"first": int(nz[0]), "counts": row[nz[0]:nz[-1] + 1].tolist()} if nz.size else
                   {"first": 0, "counts": []})
    return out


def _summary_from_rows(layer: np.ndarray, cos: np.ndarray, flagged: np.ndarray,
                       unit: str = "neuron") -> list[dict[str, Any]]:
    """A per-layer summary for rows that came without one (no null bands: d_model is unknown); ``unit``: what a row
    is ("neuron", or "feature" for a transcoder scan), which names the count (``n_neurons``, ``n_features``)."""
    out = []
    for lid in sorted({int(v) for v in layer[np.isfinite(layer)].tolist()}):
        sel = layer == lid
        c = cos[sel]
        f = np.sort(c[np.isfinite(c)])
        q = [float(np.interp(p * (f.size - 1), np.arange(f.size), f)) if f.size else None
             for p in (0.01, 0.05, 0.25, 0.5)]
        k = int(flagged[sel].sum())
        out.append({"layer": lid, f"n_{unit}s": int(sel.sum()), "n_dead": int(sel.sum() - f.size), "n_flagged": k,
                    "share_flagged": k / max(1, int(sel.sum())), "min": float(f[0]) if f.size else None,
                    "q01": q[0], "q05": q[1], "q25": q[2], "median": q[3]})
    return out


def select_rows(cos: np.ndarray, flagged: np.ndarray, layer: np.ndarray, neuron: np.ndarray | None,
                top_rows: int, max_rows: int, unit: str = "neuron") -> tuple[np.ndarray, str | None]:
    """Indices of the table's rows, most negative cos first: every flagged row plus the ``top_rows`` most negative
    of the rest (dead neurons, with no cos, are left out); at most ``max_rows``, with a note when that cuts.
    ``unit``: what a row is, for the note."""
    finite = np.isfinite(cos)
    flagged = flagged & finite
    rest = np.flatnonzero(~flagged & finite)
    if top_rows < len(rest):
        rest = rest[np.argpartition(cos[rest], top_rows)[:top_rows]] if top_rows > 0 else rest[:0]
    idx = np.concatenate([np.flatnonzero(flagged), rest])
    keys = [cos[idx]]
    keys.insert(0, layer[idx])
    if neuron is not None:
        keys.insert(0, np.asarray(neuron, dtype=np.float64)[idx])
    idx = idx[np.lexsort(keys)]
    note = None
    n_flagged = int(flagged.sum())
    if len(idx) > max_rows:
        idx = idx[:max_rows]
        note = (f"{n_flagged:,} {unit}s are flagged; the table holds the {max_rows:,} most negative of them "
                f"to keep the page small (the CSV has every row)")
    return idx, note


def _panel_key(layer: Any, expert: Any, neuron: Any) -> str:
    e = "" if _missing(expert) else _text(expert)
    return f"{_text(layer)}|{e}|{_text(neuron)}"


def _panels(explain: Iterable[Mapping[str, Any]] | None, unit: str = "neuron") -> dict[str, Any]:
    """Explain documents keyed "layer|expert|neuron" (provenance dropped, save a note on missing attention); those
    of transcoder features (``unit`` "feature") keyed "layer||feature"."""
    out: dict[str, Any] = {}
    for doc in explain or []:
        nrn = doc.get(unit) or {}
        if "layer" not in nrn or unit not in nrn:
            continue
        body = {k: v for k, v in doc.items() if k != "provenance"}
        gap = (doc.get("provenance") or {}).get("attention_gap")
        if gap:
            body["attention_gap"] = gap
        out[_panel_key(nrn["layer"], nrn.get("expert"), nrn[unit])] = _clean(body)
    return out


def scan_data(columns: Any, layers: list[dict] | None, provenance: Mapping[str, Any] | None, *,
               explain: Iterable[Mapping[str, Any]] | None, heads: Any, chains: Any, top_rows: int,
               max_rows: int, notes: Mapping[str, str] | None = None, stats: Any = None,
               name: str | None = None) -> dict[str, Any]:
    if _is_frame(columns) or hasattr(columns, "attrs"):
        attrs = getattr(columns, "attrs", {}) or {}
        layers = attrs.get("layers") if layers is None else layers
        provenance = attrs.get("provenance") if provenance is None else provenance
    cols = _columns(columns)
    if "cos" not in cols:
        raise ValueError("scan_page needs a 'cos' column (the rows of a scan)")
    prov = _clean(dict(provenance or {}))
    unit = "feature" if is_feature_scan(cols) else "neuron"
    if unit == "feature" and stats is not None:
        raise ValueError("corpus statistics are per neuron: a transcoder scan's page cannot join them")
    layer, cos, flagged = _layer_rows(cols)
    threshold = prov.get("threshold")
    if "flagged" not in cols and isinstance(threshold, (int, float)):
        flagged = is_flagged(cos, threshold)
    summary = _clean(list(layers or [])) or _summary_from_rows(layer, cos, flagged, unit)
    summary = sorted(summary, key=lambda s: int(s["layer"]))
    layer_ids = [int(s["layer"]) for s in summary]
    idx, note = select_rows(cos, flagged, layer, cols.get(unit), top_rows, max_rows, unit)
    panels = _panels(explain, unit)
    stats_block = None
    table_cols: Mapping[str, np.ndarray] = cols
    if stats is not None:
        from mmdetect.report.pagestats import page_stats, table_columns

        at, stats_block = page_stats(cols, stats, layer, cos, flagged, layer_ids, list(panels),
                                     threshold if isinstance(threshold, (int, float)) else None)
        table_cols = _with_stats(cols, table_columns(stats.frame, at))
    if unit == "feature":
        links = link_column(layer, cols["feature"], summary)
        if links is not None:
            table_cols = {**cols, "neuronpedia": links}
    table = table_spec(table_cols, idx, note=note)
    n_rows = len(cos)
    n_neurons = sum(int(s.get(f"n_{unit}s") or 0) for s in summary) or n_rows
    n_flagged = sum(int(s.get("n_flagged") or 0) for s in summary) if layers else int(flagged.sum())
    n_dead = sum(int(s.get("n_dead") or 0) for s in summary) if layers else int((~np.isfinite(cos)).sum())
    finite = cos[np.isfinite(cos)]
    convention = prov.get("convention")
    totals = {f"n_{unit}s": n_neurons, "n_flagged": n_flagged, "n_dead": n_dead, "n_layers": len(summary),
              "share_flagged": n_flagged / max(1, n_neurons), "min_cos": float(finite.min()) if finite.size else None,
              "rows_given": n_rows, "rows_in_table": len(idx), "top_rows": int(top_rows)}
    data = {
        "kind": "scan",
        "provenance": prov,
        "convention": {"name": convention, "note": CONVENTIONS.get(str(convention), UNKNOWN_CONVENTION)},
        "threshold": threshold if isinstance(threshold, (int, float)) else None,
        "totals": totals,
        "layers": summary,
        "hist": {"lo": HIST_RANGE[0], "hi": HIST_RANGE[1], "bins": HIST_BINS,
                 "layers": histograms(layer, cos, layer_ids)},
        "tables": {f"{unit}s": table, "heads": frame_spec(heads, max_rows, "heads"),
                   "chains": frame_spec(chains, max_rows, "chains")},
        "panels": panels,
        "notes": {str(k): str(v) for k, v in (notes or {}).items()},
        "name": name or ref_name(prov.get("model")),
        "stats": stats_block,
    }
    if unit == "feature":
        data["unit"] = "feature"   # only here: a neuron page's data is what it was before transcoder pages
    return data


def _with_stats(cols: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scan's columns with the stats columns right after cos (a scan column of the same name is replaced)."""
    out: dict[str, np.ndarray] = {}
    for k, v in cols.items():
        if k in extra:
            continue
        out[k] = v
        if k == "cos":
            out.update(extra)
    for k, v in extra.items():
        out.setdefault(k, v)
    return out


def ref_name(model: Any) -> str:
    """A model's name from the reference it was given as: a Hugging Face cache path gives its hub id
    (``.../models--org--name/snapshots/sha`` -> ``org/name``), another path its last part, anything else itself."""
    import re

    if model is None or model == "":
        return "scan"
    text = str(model)
    m = re.search(r"models--([^/\\]+?)--([^/\\]+)", text)
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    if text.startswith(("/", ".", "~")) or "\\" in text:
        parts = [p for p in re.split(r"[/\\]+", text) if p and p not in (".", "..", "~")]
        return parts[-1] if parts else text
    return text


def scan_page(columns: Any, layers: list[dict] | None = None, provenance: Mapping[str, Any] | None = None, *,
              explain: Iterable[Mapping[str, Any]] | None = None, heads: Any = None, chains: Any = None,
              top_rows: int = 2000, max_rows: int = MAX_ROWS, title: str | None = None,
              notes: Mapping[str, str] | None = None, stats: Any = None, name: str | None = None) -> str:
    """The complete HTML document for one scan.

    columns: the scan's rows as a dict of numpy arrays (``ScanResult.columns``), a ``ScanResult`` or a DataFrame
    (then ``layers`` and ``provenance`` default to its ``attrs``); a transcoder scan's rows (keyed ``layer,
    feature``) give a page of features (``report.featurepage``). layers: the per-layer summary
    (``attrs["layers"]``). provenance: ``attrs["provenance"]``. explain: ``explain()`` documents, one per neuron
    panel (``explain_feature()`` documents for a page of features). heads, chains: the DataFrames of ``heads`` and
    ``chains``. top_rows: the table holds every flagged neuron plus this many of the most negative others; max_rows
    caps the table whatever the flagged count. notes: what was left out and why, by section ("heads", "chains",
    "panels"), shown where that section would be. stats: a corpus pass's result (``report.activations.read_stats``),
    joined onto the rows (``report.pagestats``). name: the model's name for the title and the heading (default: from
    the provenance's model reference, ``ref_name``).
    """
    data = scan_data(columns, layers, provenance, explain=explain, heads=heads, chains=chains,
                     top_rows=top_rows, max_rows=max_rows, notes=notes, stats=stats, name=name)
    return render_page(data, title or f"mmdetect · {data['name']}")


# -- the sweep page ---------------------------------------------------------------------------------------------------

def sweep_page(summary: Any, per_model: Mapping[str, Any] | None = None, *, title: str | None = None) -> str:
    """The complete HTML document for a sweep.

    summary: the sweep's ``summary.csv`` as a DataFrame (one row per model: name, model, revision, status, …,
    share_L0…, seconds, drift, error). per_model: name -> (per-layer summary, provenance) or (layers, provenance,
    n_layers); models missing here fall back to their share_L* columns.
    """
    cols = _columns(summary)
    names = [_text(v) for v in cols.get("name", np.array([], dtype=object)).tolist()]
    share_cols = sorted((c for c in cols if c.startswith("share_L") and c[7:].isdigit()), key=lambda c: int(c[7:]))
    per_model = per_model or {}
    models = []
    for i, name in enumerate(names):
        entry = per_model.get(name)
        layers: list[Any]
        prov: dict[str, Any]
        layers, prov, n_layers = [], {}, None
        if entry is not None:
            layers, prov = entry[0] or [], entry[1] or {}
            n_layers = entry[2] if len(entry) > 2 else None
        layers = _clean(list(layers))
        if not layers:
            layers = [{"layer": int(c[7:]), "share_flagged": float(cols[c][i])} for c in share_cols
                      if not _missing(cols[c][i])]
        if n_layers is None:
            n_layers = max((int(s["layer"]) + 1 for s in layers), default=0)

        def cell(c: str, i: int = i) -> Any:
            return _clean(cols[c][i]) if c in cols and not _missing(cols[c][i]) else None

        prov = _clean(dict(prov))
        conv = prov.get("convention") or (prov.get("options") or {}).get("convention")
        models.append({"name": name, "anchor": f"model-{i}", "status": cell("status"), "model": cell("model"),
                       "revision": cell("revision"), "drift": cell("drift"), "error": cell("error"),
                       "n_neurons": cell("n_neurons"), "n_flagged": cell("n_flagged"),
                       "share_flagged": cell("share_flagged"), "min_cos": cell("min_cos"),
                       "seconds": cell("seconds"), "provenance": prov, "layers": layers, "n_layers": int(n_layers),
                       "convention": conv, "threshold": prov.get("threshold"),
                       "convention_note": CONVENTIONS.get(str(conv), UNKNOWN_CONVENTION)})
    # status and drift next to the name, so they are read first; the per-layer shares are drawn, not tabled
    first = [c for c in ("name", "status", "drift") if c in cols]
    table_cols = {c: cols[c] for c in first + [c for c in cols if c not in share_cols and c not in first]}
    spec = table_spec(table_cols, hide_empty=False)
    statuses = [m["status"] for m in models]
    versions = sorted({str(m["provenance"].get("version")) for m in models if m["provenance"].get("version")})
    data = {"kind": "sweep", "models": models, "table": spec,
            "counts": {s: statuses.count(s) for s in ("ok", "drift", "failed", "skipped") if s in statuses},
            "conventions": sorted({str(m["convention"]) for m in models if m["convention"]}),
            "thresholds": sorted({m["threshold"] for m in models if isinstance(m["threshold"], (int, float))}),
            "versions": versions}
    return render_page(data, title or f"mmdetect sweep · {len(models)} models")


def load_sweep(folder: str | Path) -> tuple[Any, dict[str, tuple[list, dict, int | None]]]:
    """A sweep output folder's summary.csv (as a DataFrame) and, from results.json, each model's per-layer summary,
    provenance and number of layers: the arguments of ``sweep_page``."""
    import pandas as pd

    folder = Path(folder)
    summary = pd.read_csv(folder / "summary.csv", dtype={"name": str, "status": str, "model": str,
                                                         "revision": str, "drift": str, "error": str},
                          keep_default_na=False, na_values=[""])
    per_model: dict[str, tuple[list, dict, int | None]] = {}
    results = folder / "results.json"
    if results.is_file():
        doc = json.loads(results.read_text(encoding="utf-8"))
        for rec in doc.get("models") or []:
            per_model[str(rec.get("name"))] = (rec.get("layers") or [], rec.get("provenance") or {},
                                               rec.get("n_layers"))
    return summary, per_model


# -- the document -----------------------------------------------------------------------------------------------------

def json_for_script(data: Any) -> str:
    """JSON that is safe inside a <script> element: no ``<``, ``>`` or ``&`` (escaped as \\u003c…), ASCII only."""
    text = json.dumps(_clean(data), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def render_page(data: Mapping[str, Any], title: str) -> str:
    """The HTML document around ``data`` (the page's JSON) with the inline style sheet and script.

    A page that carries a corpus pass (``data["stats"]``) also gets ``stats.css`` and ``stats.js``, after the page's
    own: they draw the statistics on what ``page.js`` built. A transcoder scan's page (``data["unit"]`` "feature")
    runs ``page.js`` in the feature's words (``report.featurepage.feature_script``), then ``features.js``, with
    ``features.css``. Either add-on comes after ``addons.js``, the DOM helpers they share. Every other page is
    exactly what it was without them."""
    css, js = _asset("page.css"), _asset("page.js")
    feature, stats = data.get("unit") == "feature", bool(data.get("stats"))
    if feature:                          # a transcoder scan: page.js in the feature's words
        js = feature_script(js)
    if feature or stats:                 # the add-ons' shared helpers, once
        js += _asset("addons.js")
    if feature:
        css, js = css + _asset("features.css"), js + _asset("features.js")
    if stats:
        css, js = css + _asset("stats.css"), js + _asset("stats.js")
    # Nothing may be fetched: only this style sheet and this script run (by hash); images only as data: URIs.
    csp = (f"default-src 'none'; script-src '{_sha256(js)}'; style-src '{_sha256(css)}'; img-src data:; "
           f"base-uri 'none'; form-action 'none'")
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">\n",
        "<meta name=\"generator\" content=\"mmdetect\">\n",
        f"<title>{html.escape(title, quote=True)}</title>\n",
        f"<style>{css}</style>\n</head>\n<body>\n",
        ("<noscript><p>This page draws its charts and tables with JavaScript, which is turned off. The data is in "
         "the page (the script element with id mmdetect-data) and in the scan's CSV.</p></noscript>\n"),
        f"<main id=\"app\" data-kind=\"{html.escape(str(data.get('kind')), quote=True)}\"></main>\n",
        f"<script type=\"application/json\" id=\"mmdetect-data\">{json_for_script(data)}</script>\n",
        f"<script>{js}</script>\n</body>\n</html>\n",
    ])
