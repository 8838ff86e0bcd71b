"""Figures: one model's cos distribution per layer, and the zoo's flagged share against relative depth.

matplotlib is imported inside the functions and only through its object API (``Figure`` + the Agg canvas), never
pyplot: the CLI stays fast to start, and a library call never switches the backend of a user's notebook.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mmdetect.errors import THRESHOLD, MMDetectError
from mmdetect.results.rows import is_flagged

THRESHOLD_COLOR = "#c0392b"
FLAGGED_COLOR = "#c0392b"
BODY_COLOR = "#4c72b0"
NULL_COLOR = "#7f7f7f"
RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
      "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100,
      "savefig.dpi": 150}


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG atomically (a temporary file renamed over ``path``)."""
    from mmdetect.report import atomic_open

    with atomic_open(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=RC["savefig.dpi"])
    return Path(path)


# -- reading any scan output ----------------------------------------------------------------------------------------

def _sibling_meta(path: Path) -> dict[str, Any]:
    """Provenance and per-layer summary from a file beside a CSV/TSV/JSONL scan: the sweep's ``<name>.meta.json``,
    or a JSON/Parquet output of the same scan."""
    from mmdetect.report import read_metadata

    stem = path.with_suffix("")
    for candidate in (Path(f"{stem}.meta.json"), stem.with_suffix(".json"), stem.with_suffix(".parquet")):
        if not candidate.is_file() or candidate == path:
            continue
        try:
            meta = json.loads(candidate.read_text()) if candidate.name.endswith(".meta.json") else \
                read_metadata(candidate)
        except Exception:  # an unrelated file with that name: no metadata, not an error
            continue
        if isinstance(meta, dict) and meta.get("layers"):
            return {"provenance": meta.get("provenance") or {}, "layers": meta["layers"], "from": str(candidate)}
    return {}


def read_scan(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """(rows, metadata) from any ``mmdetect scan`` output: csv, tsv, json, jsonl or parquet.

    The metadata (provenance, per-layer summary with d_model) comes from the file itself for JSON and Parquet, and
    from a sibling file for the plain-text formats; it is ``{}`` when there is none.
    """
    import pandas as pd

    from mmdetect.report import infer_format, read_metadata

    path = Path(path)
    fmt = infer_format(path)
    try:
        if fmt in ("csv", "tsv"):
            df, meta = pd.read_csv(path, sep="," if fmt == "csv" else "\t"), _sibling_meta(path)
        elif fmt == "jsonl":
            df, meta = pd.read_json(path, lines=True), _sibling_meta(path)
        elif fmt == "json":
            doc = json.loads(path.read_text())
            rows = doc["features"] if "features" in doc and "neurons" not in doc else doc["neurons"]
            df, meta = pd.DataFrame(rows), {"provenance": doc.get("provenance") or {},
                                            "layers": doc.get("layers") or []}
        elif fmt == "parquet":
            df, meta = pd.read_parquet(path), read_metadata(path)
        else:
            raise MMDetectError(f"{path}: cannot plot a {fmt} file; give a csv, tsv, json, jsonl or parquet scan "
                                f"output")
    except (ValueError, KeyError, OSError) as exc:
        raise MMDetectError(f"{path} is not a readable mmdetect scan output ({type(exc).__name__}: {exc}); "
                            f"write one with `mmdetect scan MODEL -o out.csv`") from exc
    missing = {"layer", "cos"} - set(df.columns)
    if missing:
        raise MMDetectError(f"{path} has no {' or '.join(sorted(missing))} column: it is not an mmdetect scan output")
    return df, meta


# -- one model ------------------------------------------------------------------------------------------------------

def _null_bands(layers: list[dict] | None, d_model: int | None, ids: list[int]) -> dict[int, tuple[float, float]]:
    """{layer: (lo, hi)}: the 95% band of cos between random directions, from the scan's summary or from d_model."""
    if layers:
        bands = {int(s["layer"]): (float(s["null_lo"]), float(s["null_hi"])) for s in layers
                 if s.get("null_lo") is not None and s.get("null_hi") is not None}
        if set(ids) <= set(bands):
            return bands
    if d_model:
        from mmdetect.scanner.stats import null_band

        lo, hi = null_band(int(d_model))
        return dict.fromkeys(ids, (lo, hi))
    return {}


@dataclass
class _ScanPlot:
    """What the model figure draws, prepared from a scan's rows: per layer (``ids``) the finite cosines (``data``),
    neuron counts, flagged counts and shares; every row's cos, layer and flag."""

    ids: list[int]
    data: list[Any]
    cos: Any
    layer: Any
    flagged: Any
    n_flag: Any
    shares: Any
    gated: bool
    threshold: float
    convention: str | None
    prov: dict[str, Any]
    layers: list[dict] | None
    what: str = "neurons"  # a transcoder scan (one row per feature): "features"


def _scan_plot(df: Any, layers: list[dict] | None, threshold: float | None, convention: str | None) -> _ScanPlot:
    import numpy as np

    prov = df.attrs.get("provenance", {}) if hasattr(df, "attrs") else {}
    layers = layers if layers is not None else (df.attrs.get("layers") if hasattr(df, "attrs") else None)
    cos_all = df["cos"].to_numpy(dtype=np.float64)
    layer_all = df["layer"].to_numpy()
    ids = sorted({int(v) for v in layer_all})
    if not ids:
        raise MMDetectError("the scan output has no rows to plot")
    data = [cos_all[(layer_all == i) & np.isfinite(cos_all)] for i in ids]
    if threshold is None:
        threshold = float(prov.get("threshold", THRESHOLD))
    flagged = df["flagged"].to_numpy(dtype=bool) if "flagged" in df else is_flagged(cos_all, threshold)
    counts = np.array([int((layer_all == i).sum()) for i in ids])
    n_flag = np.array([int(((layer_all == i) & flagged).sum()) for i in ids])
    return _ScanPlot(ids, data, cos_all, layer_all, flagged, n_flag, 100.0 * n_flag / np.maximum(counts, 1),
                     "cos_gate_in" in df and bool(df["cos_gate_in"].notna().any()), threshold,
                     convention or prov.get("convention"), prov, layers,
                     "features" if "feature" in df.columns else "neurons")


def model_figure(df: Any, *, layers: list[dict] | None = None, d_model: int | None = None,
                 threshold: float | None = THRESHOLD, title: str | None = None, convention: str | None = None) -> Any:
    """Per layer: the distribution of cos (violin, median tick), each flagged neuron as a red dot, the
    random-direction 95% band in grey and the threshold as a dashed line; above it, the flagged share per layer.

    ``layers`` is the scan's per-layer summary (``df.attrs["layers"]``); without it, ``d_model`` gives the null band;
    with neither, the band is left out and the figure says so.
    """
    import numpy as np

    sp = _scan_plot(df, layers, threshold, convention)
    n = len(sp.ids)
    with style():
        fig = figure(min(13.0, max(6.4, 1.6 + 0.26 * n)), 4.8)
        top, ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 3.2]})
        x = np.arange(n)
        _draw_shares(top, x, sp)
        bands = _null_bands(sp.layers, d_model, sp.ids)
        handles = _draw_cosines(ax, x, sp, bands, d_model) + _draw_flagged(ax, x, sp)
        _finish(fig, top, ax, x, sp, handles, bool(bands), title, len(df))
    return fig


def _draw_shares(top: Any, x: Any, sp: _ScanPlot) -> None:
    """The upper panel: the flagged share of each layer, labelled when there are few layers."""
    top.bar(x, sp.shares, width=0.7, color=FLAGGED_COLOR, alpha=0.85)
    top.set_ylabel("flagged (%)")
    top.set_ylim(0, max(1.0, float(sp.shares.max()) * 1.25))
    for xi, s, k in zip(x, sp.shares, sp.n_flag):
        if len(sp.ids) <= 24 and k:
            top.annotate(f"{s:.1f}", (xi, s), xytext=(0, 1.5),
                         textcoords="offset points", ha="center", va="bottom", fontsize=6.5, color="#444")
    top.grid(axis="y", color="#e6e6e6", linewidth=0.6)
    top.set_axisbelow(True)


def _draw_cosines(ax: Any, x: Any, sp: _ScanPlot, bands: dict[int, tuple[float, float]],
                  d_model: int | None) -> list[Any]:
    """The random-direction band, each layer's violin and median; their legend entries."""
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []  # legend entries: patches and lines
    if bands:
        ds = {int(s["layer"]): s.get("d_model") for s in sp.layers or []} if sp.layers else {}
        for xi, i in zip(x, sp.ids):
            lo, hi = bands[i]
            ax.fill_between([xi - 0.5, xi + 0.5], lo, hi, color=NULL_COLOR, alpha=0.22, linewidth=0, zorder=0)
        dvals = {v for v in ds.values() if v} or ({int(d_model)} if d_model else set())
        dtext = f", d={dvals.pop()}" if len(dvals) == 1 else ""
        handles.append(Patch(color=NULL_COLOR, alpha=0.35, label=f"random directions, 95%{dtext}"))
    nonempty = [k for k, d in enumerate(sp.data) if d.size > 1 and np.ptp(d) > 0]
    if nonempty:
        parts = ax.violinplot([sp.data[k] for k in nonempty], positions=x[nonempty], widths=0.8, showextrema=False,
                              showmedians=False, points=120)
        for body in parts["bodies"]:
            body.set_facecolor(BODY_COLOR)
            body.set_edgecolor(BODY_COLOR)
            body.set_alpha(0.45)
            body.set_linewidth(0.5)
    medians = np.array([np.median(d) if d.size else np.nan for d in sp.data])
    ax.scatter(x, medians, marker="_", s=90, color="#1f1f1f", linewidths=1.2, zorder=3)
    handles.append(Patch(color=BODY_COLOR, alpha=0.55, label=f"all {sp.what}"))
    handles.append(Line2D([], [], marker="_", linestyle="none", color="#1f1f1f", markersize=9, label="median"))
    return handles


def _draw_flagged(ax: Any, x: Any, sp: _ScanPlot) -> list[Any]:
    """Each flagged neuron as a dot, jittered within its layer (a fixed seed: the same figure every time)."""
    import numpy as np
    from matplotlib.lines import Line2D

    rng = np.random.default_rng(0)
    fx, fy = [], []
    for xi, i in zip(x, sp.ids):
        ys = sp.cos[(sp.layer == i) & sp.flagged & np.isfinite(sp.cos)]
        fx.append(xi + rng.uniform(-0.22, 0.22, ys.size))
        fy.append(ys)
    fx_all, fy_all = np.concatenate(fx), np.concatenate(fy)
    if not fy_all.size:
        return []
    size = 7 if fy_all.size < 2000 else 3
    ax.scatter(fx_all, fy_all, s=size, color=FLAGGED_COLOR, alpha=0.75 if fy_all.size < 2000 else 0.35,
               linewidths=0, zorder=4, rasterized=fy_all.size > 5000)
    return [Line2D([], [], marker="o", linestyle="none", color=FLAGGED_COLOR, markersize=4,
                   label=f"flagged ({int(fy_all.size):,})")]


def _finish(fig: Any, top: Any, ax: Any, x: Any, sp: _ScanPlot, handles: list[Any], banded: bool,
            title: str | None, n_rows: int) -> None:
    """The threshold line, axes, ticks, legend and title."""
    from matplotlib.lines import Line2D

    n = len(sp.ids)
    ax.axhline(sp.threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0, zorder=2)
    handles.append(Line2D([], [], color=THRESHOLD_COLOR, linestyle="--", linewidth=1.0,
                          label=f"threshold {_num(sp.threshold)}"))
    ax.axhline(0, color="#bbbbbb", linewidth=0.6, zorder=1)
    ax.set_ylim(-1.02, 1.02)
    ax.set_xlim(-0.6, n - 0.4)
    read, write = ("up", "down") if sp.gated else ("W_enc[:, i]", "W_dec[i]") if sp.what == "features" else \
        ("w_in", "w_out")
    ax.set_ylabel(f"cos({read}, {write})" + (f", {sp.convention}" if sp.convention else ""))
    ax.set_xlabel("layer")
    step = 1 if n <= 26 else 2 if n <= 52 else max(1, n // 24)
    ax.set_xticks(x[::step], [str(i) for i in sp.ids][::step])
    ax.grid(axis="y", color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False,
               handlelength=1.4, columnspacing=1.4)
    if not banded:
        ax.text(0.01, 0.02, "no random-direction band: d_model unknown (pass --d-model)", transform=ax.transAxes,
                fontsize=7, color="#666666", va="bottom")
    total = int(sp.flagged.sum())
    name = title or sp.prov.get("model") or "scan"
    kind = f" · {sp.prov['model_type']}" if sp.prov.get("model_type") else ""
    share = 100 * total / max(1, n_rows)
    top.set_title(f"{name}{kind} · {total:,} of {n_rows:,} {sp.what} flagged ({share:.1f}%)", loc="left")


def _num(v: float) -> str:
    """-0.5 -> '−0.5': a typographic minus, matching matplotlib's tick labels."""
    return f"{v:g}".replace("-", "\u2212")


class style:
    """matplotlib rc settings for the figures, scoped so a user's own settings are untouched afterwards."""

    def __enter__(self) -> None:
        import matplotlib

        self._ctx: Any = matplotlib.rc_context(cast(Any, RC))
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


# -- the zoo --------------------------------------------------------------------------------------------------------

def overview_figure(series: list[tuple[str, list[dict], int | None]], *, threshold: float | None = None,
                    convention: str | None = None) -> Any:
    """Flagged share per layer against relative depth (layer / (n_layers - 1)), one line per model.

    ``series``: (label, per-layer summary, the model's number of layers or None for "the last layer scanned").
    Relative depth puts a 6-layer and a 48-layer model on one axis, which is how the field compares where in the
    network weakening neurons sit (early-middle in GPT-2 and Pythia, the last layer in gated models).
    """
    import numpy as np

    if not series:
        raise MMDetectError("no model has results to plot")
    with style():
        many = len(series) > 8
        fig = figure(8.6 if many else 6.8, 4.4)
        ax = fig.subplots()
        import matplotlib

        cmap = matplotlib.colormaps["tab10" if len(series) <= 10 else "tab20"]
        markers = "osD^v<>ph*"
        for k, (name, layers, n_layers) in enumerate(series):
            ordered = sorted(layers, key=lambda s: int(s["layer"]))
            ids = np.array([int(s["layer"]) for s in ordered], dtype=float)
            share = np.array([100.0 * float(s["share_flagged"]) for s in ordered])
            last = max(float(n_layers or 0) - 1, ids.max(), 1.0)
            depth = ids / last
            ax.plot(depth, share, color=cmap(k % cmap.N), marker=markers[k % len(markers)], markersize=3.5,
                    linewidth=1.4, label=name)
        ax.set_xlabel("relative depth (layer / last layer)")
        what = f"cos ≤ {_num(threshold)}" if threshold is not None else "cos ≤ threshold"
        ax.set_ylabel(f"flagged neurons ({what}), % of layer")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(bottom=0)
        ax.grid(color="#eeeeee", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_title(f"Flagged share by depth · {len(series)} model{'s' * (len(series) != 1)}"
                     + (f" · {convention} convention" if convention else ""), loc="left")
        if many:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                      ncols=1 if len(series) <= 20 else 2)
        else:
            ax.legend(loc="best", frameon=False)
    return fig


def plot_file(path: str | os.PathLike, output: str | os.PathLike | None = None, *, d_model: int | None = None,
              threshold: float | None = None, title: str | None = None) -> tuple[Path, str | None]:
    """Draw the per-model figure for a scan output (or the overview for a sweep folder). Returns (png, note)."""
    path = Path(path)
    if path.is_dir():
        results = path / "results.json"
        if not results.is_file():
            raise MMDetectError(f"{path} is a folder without results.json: give a scan output file or a sweep "
                                f"--output-dir")
        doc = json.loads(results.read_text())
        series = [(r["name"], r["layers"], r.get("n_layers")) for r in doc["models"] if r.get("layers")]
        opts = [r.get("options") or {} for r in doc["models"] if r.get("layers")]
        ths = {o.get("threshold") for o in opts}
        convs = {o.get("convention") for o in opts}
        target = Path(output) if output else path / "overview.png"
        save(overview_figure(series, threshold=ths.pop() if len(ths) == 1 else None,
                             convention=convs.pop() if len(convs) == 1 else None), target)
        return target, None
    df, meta = read_scan(path)
    df.attrs["provenance"] = meta.get("provenance") or {}
    layers = meta.get("layers") or None
    if threshold is not None and "flagged" in df:
        df = df.drop(columns="flagged")  # flag again at the requested threshold
    if threshold is None:
        threshold = (meta.get("provenance") or {}).get("threshold")
    note = None
    if not layers and not d_model:
        note = "d_model is unknown (no sibling .meta.json/.json/.parquet), so the random-direction band is left " \
               "out; pass --d-model to draw it"
    target = Path(output) if output else path.with_suffix(".png")
    if target.suffix.lower() != ".png":
        raise MMDetectError(f"--output {target} must end in .png")
    save(model_figure(df, layers=layers, d_model=d_model, threshold=threshold,
                      title=title or (meta.get("provenance") or {}).get("model") or path.stem), target)
    return target, note
