"""A scan's rows joined with the statistics of ``mmdetect activations`` (``scan --activations STATS``).

The statistics are read back checked (``report.activations.read_stats``), refused when they were measured on
another model (its weight fingerprint) or in another convention, and joined on ``layer, expert, neuron``: every
column of ``corpus.activations.COLUMNS`` but the keys, in that order, after the scan's own columns. A scanned neuron
the statistics lack (a run with ``--layers``) gets empty cells. The per-layer summary gains the relation GLUScope
reports (``layer_relation``): the share of flagged neurons that fire on more than half of the tokens, and the
Spearman correlation of ``cos`` with ``freq_pos`` and, for gated MLPs, with the negative-gate share
``freq_gn_ip + freq_gn_in``, each with its p-value.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from mmdetect.corpus.activations import COLUMNS as STATS_COLUMNS
from mmdetect.corpus.activations import Result
from mmdetect.errors import UsageError
from mmdetect.report.activations import KEYS
from mmdetect.results.rows import ScanResult

JOINED = [c for c in STATS_COLUMNS if c not in KEYS]
FIRES = 0.5  # a neuron "fires on most tokens" when freq_pos > FIRES
LAYER_KEYS = ("n_stats", "share_flagged_firing", "spearman_freq_pos", "spearman_freq_pos_p", "spearman_gate_neg",
              "spearman_gate_neg_p")


def check_stats(stats: Result, scan_provenance: dict[str, Any], where: str) -> None:
    """Refuse (UsageError, one line) statistics of another model or convention than the scan's."""
    prov = stats.provenance
    fp, want = prov.fingerprint, scan_provenance.get("fingerprint")
    if fp != want:
        raise UsageError(f"--activations {where} was measured on another model ({prov.model}, weight fingerprint "
                         f"{str(fp)[:12]}) than the one scanned ({scan_provenance.get('model')}, {str(want)[:12]}): "
                         f"run `mmdetect activations {scan_provenance.get('model')} -o STATS` or pass "
                         f"--activations auto")
    if prov.convention != scan_provenance.get("convention"):
        raise UsageError(f"--activations {where} is in the {prov.convention} convention, the scan in the "
                         f"{scan_provenance.get('convention')} convention: scan with --convention {prov.convention} "
                         f"or rerun `mmdetect activations --convention {scan_provenance.get('convention')}`")


def _key(layer: Any, expert: Any, neuron: Any) -> tuple[int, str | None, int]:
    missing = expert is None or (isinstance(expert, float) and math.isnan(expert))
    return int(layer), None if missing else str(expert), int(neuron)


def _rows_of(stats: Result) -> tuple[dict[tuple[int, str | None, int], int], dict[str, np.ndarray]]:
    frame = stats.frame
    index = {_key(la, e, n): i for i, (la, e, n) in
             enumerate(zip(frame["layer"].tolist(), frame["expert"].tolist(), frame["neuron"].tolist()))}
    return index, {c: frame[c].to_numpy() for c in JOINED}


def joined_columns(layer: np.ndarray, expert: np.ndarray, neuron: np.ndarray,
                   stats: Result) -> dict[str, np.ndarray]:
    """``JOINED`` columns aligned with the given key columns: float64 with NaN where the statistics lack a neuron
    (``tokens`` int64 when every neuron is there)."""
    index, values = _rows_of(stats)
    at = np.array([index.get(_key(la, e, n), -1) for la, e, n in zip(layer.tolist(), expert.tolist(),
                                                                     neuron.tolist())], dtype=np.int64)
    found = at >= 0
    out = {}
    for name in JOINED:
        src = values[name]
        if name == "tokens" and found.all():
            out[name] = src.astype(np.int64)[at]
            continue
        col = np.full(len(at), np.nan)
        col[found] = src.astype(np.float64)[at[found]]
        out[name] = col
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan"), float("nan")
    from scipy.stats import spearmanr

    res = spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue)


def layer_relation(layer: np.ndarray, cos: np.ndarray, flagged: np.ndarray, gated: np.ndarray,
                   stat: dict[str, np.ndarray], which: int) -> dict[str, Any]:
    """The ``LAYER_KEYS`` of one layer: over its neurons that have statistics, the share of flagged ones with
    freq_pos > 0.5, and Spearman's rho (scipy) of cos with freq_pos and, when the layer is gated, with
    freq_gn_ip + freq_gn_in, with the two-sided p-values; NaN where undefined (no flagged neuron, fewer than 3
    neurons, a constant column)."""
    sel = (layer == which) & np.isfinite(np.asarray(stat["freq_pos"], dtype=np.float64))
    fp = np.asarray(stat["freq_pos"], dtype=np.float64)[sel]
    fl = flagged[sel].astype(bool)
    rho, p = _spearman(cos[sel].astype(np.float64), fp)
    out: dict[str, Any] = {"n_stats": int(sel.sum()),
                           "share_flagged_firing": float((fp[fl] > FIRES).mean()) if fl.any() else float("nan"),
                           "spearman_freq_pos": rho, "spearman_freq_pos_p": p,
                           "spearman_gate_neg": float("nan"), "spearman_gate_neg_p": float("nan")}
    if gated[sel].any():
        neg = (np.asarray(stat["freq_gn_ip"], dtype=np.float64) + np.asarray(stat["freq_gn_in"], dtype=np.float64))
        out["spearman_gate_neg"], out["spearman_gate_neg_p"] = _spearman(cos[sel].astype(np.float64), neg[sel])
    return out


def source_of(stats: Result, where: str) -> dict[str, Any]:
    """What the scan's provenance records of the statistics it joined (options["activations"])."""
    prov = stats.provenance
    return {"path": where, "created": prov.created, "rows": int(len(stats.frame)),
            **{k: v for k, v in (prov.options or {}).items() if k in ("corpus", "dataset", "text", "max_tokens",
                                                                        "seq_len", "tokens", "windows", "layers")}}


def join_stats(rows: Any, stats: Result, where: str) -> Any:
    """``rows`` (a ``ScanResult`` or a scan DataFrame) with the ``JOINED`` columns, the per-layer summary's
    ``LAYER_KEYS`` and ``provenance.options.activations``; checked first (``check_stats``). ``rows`` is not
    changed."""
    attrs = copy.deepcopy(rows.attrs)
    check_stats(stats, attrs.get("provenance", {}), where)
    if isinstance(rows, ScanResult):
        get = rows.columns.__getitem__
    else:
        def get(name: str) -> np.ndarray:
            col = rows[name]
            return col.to_numpy(dtype=object) if name == "expert" else col.to_numpy()
    layer, expert, neuron = (np.asarray(get(k)) for k in KEYS)
    extra = joined_columns(layer, expert, neuron, stats)
    cos = np.asarray(get("cos"), dtype=np.float64)
    flagged = np.asarray(get("flagged"), dtype=bool)
    gated = np.isfinite(np.asarray(get("cos_gate_in"), dtype=np.float64))
    for entry in attrs.get("layers", []):
        entry.update(layer_relation(layer, cos, flagged, gated, extra, int(entry["layer"])))
    attrs.setdefault("provenance", {}).setdefault("options", {})["activations"] = source_of(stats, where)
    if isinstance(rows, ScanResult):
        return ScanResult({**{k: v for k, v in rows.columns.items() if k not in extra}, **extra}, attrs)
    out = rows.drop(columns=[c for c in JOINED if c in rows.columns]).copy()
    for name, col in extra.items():
        out[name] = col
    out.attrs = attrs
    return out


def load_stats(spec: str, model: str, *, revision: str | None = None, convention: str = "folded",
               layers: str | None = None, device: str = "cpu", progress: bool | None = None) -> tuple[Result, str]:
    """(the statistics, how the provenance names them) for ``--activations spec``: an output of ``mmdetect
    activations`` read back checked, or for ``auto`` the corpus pass run now on ``model`` with its defaults (the
    scan's convention and layers; no state saved)."""
    if spec == "auto":
        from mmdetect.corpus.activations import Request, run

        return run(Request(model, revision=revision, convention=convention, layers=layers, device=device,
                           progress=progress)), "auto"
    from mmdetect.report.activations import read_stats

    return read_stats(spec), spec
