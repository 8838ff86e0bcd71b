"""A sweep's reports: summary.csv, summary.md (also appended to $GITHUB_STEP_SUMMARY), results.json, overview.png.

Models with a corpus pass (``activations:``) add, per model, the relation scan's per-layer summary shows when
statistics are joined (``RELATION_COLUMNS``, aggregated over the model's layers by ``relation``); a sweep without one
writes the files it always wrote.

Every file goes through ``report`` (atomically). results.json is written before anything that may fail for reasons
outside the sweep (the step summary, the figure), so a finished sweep always leaves it complete.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdetect.errors import OutputError, warn
from mmdetect.results.provenance import now
from mmdetect.sweep.gates import exit_code
from mmdetect.sweep.records import STATUSES, Drift, ModelRecord
from mmdetect.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def counts(records: list[ModelRecord]) -> dict[str, int]:
    """Models per outcome, and how many were reused unchanged from an earlier run."""
    out = {s: sum(r.status == s for r in records) for s in STATUSES}
    out["reused"] = sum(not r.rescanned and not r.error for r in records)
    return out


def describe(records: list[ModelRecord]) -> str:
    """'3 ok · 1 failed · 2 reused': the non-zero counts, for the command line."""
    c = counts(records)
    parts = [f"{c[s]} {s}" for s in STATUSES if c[s]]
    if c["reused"]:
        parts.append(f"{c['reused']} reused (unchanged, not rescanned)")
    return " · ".join(parts) or "no models"


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _totals(layers: list[dict[str, Any]]) -> tuple[int, int, list[float]]:
    n = sum(int(s["n_neurons"]) for s in layers)
    k = sum(int(s["n_flagged"]) for s in layers)
    mins = [m for m in (_nan(s.get("min")) for s in layers) if not math.isnan(m)]
    return n, k, mins


# The summary's columns for models with statistics: the corpus tokens, then report.join.LAYER_KEYS aggregated.
RELATION_COLUMNS = ("stats_tokens", "share_flagged_firing", "spearman_freq_pos", "spearman_freq_pos_p",
                    "spearman_gate_neg", "spearman_gate_neg_p")


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def relation(record: ModelRecord) -> dict[str, Any]:
    """``RELATION_COLUMNS`` of one model with statistics (None where undefined).

    * ``share_flagged_firing``: pooled, i.e. of all the model's flagged neurons, the share with freq_pos > 0.5 (the
      layers' shares weighted by their flagged counts; every flagged neuron has statistics, the pass measuring the
      scan's layers);
    * ``spearman_freq_pos``, ``spearman_gate_neg`` (gated MLPs): the median over layers of the per-layer Spearman
      rho of cos with freq_pos, and with freq_gn_ip + freq_gn_in; their ``_p`` columns the median over the same
      layers of the per-layer two-sided p-values (layers where rho is undefined are left out of both).
    """
    def finite(s: dict[str, Any], key: str) -> float | None:
        v = s.get(key)
        return float(v) if v is not None and math.isfinite(float(v)) else None

    weighted = [(v, int(s["n_flagged"])) for s in record.layers
                if (v := finite(s, "share_flagged_firing")) is not None and int(s["n_flagged"]) > 0]
    flagged = sum(k for _, k in weighted)
    out: dict[str, Any] = {"stats_tokens": record.stats["tokens"] if record.stats else None,
                           "share_flagged_firing": sum(v * k for v, k in weighted) / flagged if flagged else None}
    for key in ("spearman_freq_pos", "spearman_gate_neg"):
        pairs = [(rho, p) for s in record.layers
                 if (rho := finite(s, key)) is not None and (p := finite(s, f"{key}_p")) is not None]
        out[key] = _median([rho for rho, _ in pairs])
        out[f"{key}_p"] = _median([p for _, p in pairs])
    return out


def summary_frame(records: list[ModelRecord]) -> pd.DataFrame:
    """One row per model in config order. Per-layer flagged shares are wide columns share_L0, share_L1, …

    ``status`` is the outcome (ok, drift, failed) whether or not the model was scanned in this run; ``rescanned``
    says whether it was. Wide numeric columns read best in pandas: ``df.filter(like="share_L")`` is a model x layer
    matrix ready for ``.T.plot()`` or a heatmap; a model with fewer layers has blanks there. When any model has
    statistics, ``RELATION_COLUMNS`` follow the share columns (blank for the models without).
    """
    import pandas as pd

    n_layers = max((int(s["layer"]) + 1 for r in records for s in r.layers), default=0)
    share_cols = [f"share_L{i}" for i in range(n_layers)]
    stats_cols = list(RELATION_COLUMNS) if any(r.stats for r in records) else []
    rows = []
    for r in records:
        n, k, mins = _totals(r.layers)
        prov = r.provenance
        row: dict[str, Any] = {
            "name": r.name, "model": r.model, "revision": (prov.revision if prov else None) or r.revision,
            "status": r.status, "rescanned": r.rescanned, "n_neurons": n if r.layers else None,
            "n_flagged": k if r.layers else None, "share_flagged": k / n if n else None,
            "min_cos": min(mins) if mins else None}
        shares = {int(s["layer"]): float(s["share_flagged"]) for s in r.layers}
        row.update({col: shares.get(i) for i, col in enumerate(share_cols)})
        if stats_cols:
            row.update(relation(r) if r.stats and r.layers else dict.fromkeys(stats_cols))
        row.update({"seconds": r.seconds, "drift": drift_text(r.drift) or None, "error": r.error or None})
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["name", "model", "revision", "status", "rescanned", "n_neurons",
                                        "n_flagged", "share_flagged", "min_cos"] + share_cols + stats_cols
                         + ["seconds", "drift", "error"])
    for col in ("n_neurons", "n_flagged") + (("stats_tokens",) if stats_cols else ()):
        frame[col] = frame[col].astype("Int64")
    for col in ["share_flagged", "min_cos", "seconds"] + share_cols + stats_cols[1:]:
        frame[col] = frame[col].astype("float64")
    for col in ("model", "revision", "drift", "error"):
        frame[col] = frame[col].astype(object)
    return frame


def _share_text(v: float | None, kind: str) -> str:
    if v is None:
        return "not scanned"
    return f"{100 * v:.1f}%" if kind == "shares" else f"{int(v)}"


def drift_text(items: list[Drift]) -> str:
    """'expect L1 45.2% → 30.0% (±1.0 pp); baseline L3 …': the layers that moved, one clause each."""
    parts = []
    for d in items:
        tol = f"±{100 * d.tolerance:.1f} pp" if d.metric == "shares" else f"±{d.tolerance:g} neurons"
        if d.expected is None:
            parts.append(f"{d.source} L{d.layer} new layer at {_share_text(d.actual, d.metric)}")
        else:
            parts.append(f"{d.source} L{d.layer} {_share_text(d.expected, d.metric)} → "
                         f"{_share_text(d.actual, d.metric)} ({tol})")
    return "; ".join(parts)


def finish_text(record: ModelRecord) -> str:
    """The progress line of a finished model."""
    if record.error:
        return f"failed: {record.error}"
    n, k, _ = _totals(record.layers)
    text = f"{record.status} · {n:,} neurons · {k:,} flagged ({100 * k / max(1, n):.1f}%)"
    if record.stats:
        text += f" · statistics over {record.stats['tokens']:,} tokens"
    if not record.rescanned:
        text += " · unchanged, not rescanned (--force rescans)"
    if record.drift:
        text += f" · drift: {drift_text(record.drift)}"
    return text


def _spark(shares: list[float]) -> str:
    """Unicode bars of the per-layer shares, scaled to the model's own peak (▁ for 0)."""
    bars = "▁▂▃▄▅▆▇█"
    peak = max((s for s in shares if not math.isnan(s)), default=0.0)
    if peak <= 0:
        return bars[0] * len(shares)
    return "".join(" " if math.isnan(s) else bars[min(7, int(round(7 * s / peak)))] for s in shares)


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def summary_markdown(records: list[ModelRecord], header: dict[str, Any]) -> str:
    c = counts(records)
    conf = header["config"]
    title = conf.get("description") or Path(conf["path"]).name
    where = f" · shard {header['shard']}" if header.get("shard") else ""
    where += f" · merged from {len(header['merged_from'])} folders" if header.get("merged_from") else ""
    lines = [f"## mmdetect sweep: {_md_cell(title)}", "",
             f"{len(records)} models{where} · " + " · ".join(f"{c[s]} {s}" for s in STATUSES)
             + f" · {c['reused']} reused · mmdetect {__version__}", ""]
    conventions = sorted({str(r.options["convention"]) for r in records if r.options.get("convention")})
    thresholds = sorted({float(r.options["threshold"]) for r in records if r.options.get("threshold") is not None})
    if conventions and thresholds:
        lines += [f"Flagged: cos ≤ {' / '.join(f'{t:g}' for t in thresholds)} ({' / '.join(conventions)} "
                  f"convention{'s' * (len(conventions) > 1)}). Layers: flagged share per layer, scaled to each "
                  f"model's peak.", ""]
    lines += ["| name | model | status | neurons | flagged | share | min cos | peak layer | layers | seconds |",
              "|---|---|---|---:|---:|---:|---:|---|---|---:|"]
    for r in records:
        if r.layers:
            n, k, mins = _totals(r.layers)
            peak = max(r.layers, key=lambda s: (float(s["share_flagged"]), -int(s["layer"])))
            full = {int(s["layer"]): float(s["share_flagged"]) for s in r.layers}
            shares = [full.get(i, float("nan")) for i in range(max(full) + 1)]
            cells = [f"{n:,}", f"{k:,}", f"{100 * k / n:.2f}%" if n else "", f"{min(mins):+.3f}" if mins else "",
                     f"L{peak['layer']} ({100 * float(peak['share_flagged']):.1f}%)", f"`{_spark(shares)}`"]
        else:
            cells = [""] * 6
        status = {"failed": "❌ failed", "drift": "⚠️ drift"}.get(r.status, r.status)
        lines.append("| " + " | ".join([_md_cell(r.name), f"`{_md_cell(r.model)}`" if r.model else "", status]
                                       + cells + [f"{r.seconds or 0:.1f}"]) + " |")
    lines += _relation_markdown(records)
    drifted = [r for r in records if r.status == "drift"]
    if drifted:
        lines += ["", "### Drift", ""]
        for r in drifted:
            lines.append(f"- **{_md_cell(r.name)}**: layers that moved:")
            lines += [f"  - {_md_cell(drift_text([d]))}" for d in r.drift]
    failed = [r for r in records if r.status == "failed"]
    if failed:
        lines += ["", "### Failures", ""]
        lines += [f"- **{_md_cell(r.name)}** (`{_md_cell(r.model or '?')}`): {_md_cell(r.error)}" for r in failed]
    return "\n".join(lines) + "\n"


def _relation_markdown(records: list[ModelRecord]) -> list[str]:
    """The section of the models with statistics (``relation``); nothing when none has any."""
    with_stats = [r for r in records if r.stats and r.layers]
    if not with_stats:
        return []

    def rho(v: float | None, p: float | None) -> str:
        return "" if v is None else f"{v:+.3f} (p {p:.2g})" if p is not None else f"{v:+.3f}"

    lines = ["", "### Activation statistics", "",
             "Over each model's corpus pass: the share of flagged neurons firing (freq_pos > 0.5) on more than half "
             "of the tokens, pooled over layers; Spearman's rho of cos with freq_pos and, for gated MLPs, with the "
             "negative-gate share freq_gn_ip + freq_gn_in: the median over layers of the per-layer rho (and of its "
             "p-value).", "",
             "| name | corpus | tokens | flagged firing | rho(cos, freq_pos) | rho(cos, negative gate) |",
             "|---|---|---:|---:|---|---|"]
    for r in with_stats:
        v = relation(r)
        firing = "" if v["share_flagged_firing"] is None else f"{100 * v['share_flagged_firing']:.1f}%"
        corpus = (r.stats or {}).get("corpus", "")
        lines.append("| " + " | ".join([_md_cell(r.name), _md_cell(corpus), f"{v['stats_tokens']:,}", firing,
                                        rho(v["spearman_freq_pos"], v["spearman_freq_pos_p"]),
                                        rho(v["spearman_gate_neg"], v["spearman_gate_neg_p"])]) + " |")
    return lines


def write_reports(out: Path, records: list[ModelRecord], header: dict[str, Any], plots: bool = True,
                  final: bool = True) -> None:
    """summary.csv, summary.md and results.json; when ``final``, also $GITHUB_STEP_SUMMARY and overview.png.
    Until ``final``, results.json says the sweep is still running (``complete: false``)."""
    from mmdetect import report

    report.write(summary_frame(records), "csv", out / "summary.csv")
    markdown = summary_markdown(records, header)
    report.write_text(markdown, out / "summary.md")
    doc = {"tool": "mmdetect", "version": __version__, "created": now(), "python": sys.version.split()[0],
           **header, "complete": final, "counts": counts(records), "exit_code": exit_code(records),
           "models": [r.to_dict() for r in records]}
    report.write_document(doc, out / "results.json")
    if not final:
        return
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        try:
            report.append_text(step_summary, markdown + "\n")
        except OutputError as exc:
            warn(f"$GITHUB_STEP_SUMMARY: {exc}; the summary is in {out / 'summary.md'}")
    series = [(r.name, r.layers, r.n_layers) for r in records if r.layers]
    if plots and series:
        from mmdetect.report.plot import overview_figure, save

        thresholds = {r.options.get("threshold") for r in records if r.layers}
        conventions = {r.options.get("convention") for r in records if r.layers}
        save(overview_figure(series, threshold=thresholds.pop() if len(thresholds) == 1 else None,
                             convention=conventions.pop() if len(conventions) == 1 else None), out / "overview.png")

