"""Memory-management heads: attention heads whose OV circuit writes back the negative of what it reads.

For head h, W_V (``[dh, d]``) maps the residual stream to the head's value space and W_O (``[d, dh]``) maps it back,
both folded by the convention (``convention.head_fold``: in ``folded``, the pre-norm gain into W_V, the post-norm
gain into W_O, which is centred in LayerNorm models). The OV circuit M = W_O W_V
(``[d, d]``, rank dh) has the same nonzero eigenvalues as the small ``[dh, dh]`` matrix W_V W_O, so each head costs one
dh x dh eigenproblem. Scores, with lambda the eigenvalues:

* ``copying`` = sum Re(lambda) / sum |lambda| in [-1, 1] (Elhage et al.'s summary): +1 a head that copies what it
  reads, -1 one that writes back exactly its negative (M = -c I on its subspace), ~0 a rotation or random map;
* ``neg_mass`` = sum over Re(lambda) < 0 of |Re(lambda)| / sum |lambda| in [0, 1];
* ``min_eig`` = the most negative real part, and ``min_eig_rel`` = min_eig / max |lambda|.

Heads are ranked by ``copying``, most negative first, and flagged when it is at most the threshold. The null band is
the central 95% of ``copying`` for heads with independent Gaussian W_V and W_O of the same shape (simulated once per
shape with a fixed seed).
"""
from __future__ import annotations

import functools
import math
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmdetect.analysis.circuit import Circuit, Heads, open_circuit
from mmdetect.convention import DEFAULT
from mmdetect.errors import THRESHOLD, MMDetectError, check_unit
from mmdetect.results import Provenance, is_flagged
from mmdetect.scanner.pipeline import ordered_map, single_threaded

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

COLUMNS = ["rank", "layer", "head", "kv_head", "copying", "neg_mass", "min_eig", "min_eig_rel", "max_abs_eig",
           "ov_norm", "flagged"]
NULL_SAMPLES = 256


def ov_eigenvalues(v: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Nonzero spectrum of one head's OV circuit: eigenvalues of W_V W_O = v @ o.T. v, o: [dh, d] -> [dh] complex."""
    return torch.linalg.eigvals(v.double() @ o.double().T)


def spectrum_scores(eig: torch.Tensor) -> dict[str, float]:
    """copying, neg_mass, min_eig, min_eig_rel, max_abs_eig from eigenvalues [dh] (NaN for an all-zero head)."""
    re, mag = eig.real, eig.abs()
    total = float(mag.sum())
    if not math.isfinite(total) or total == 0.0:
        nan = float("nan")
        return {"copying": nan, "neg_mass": nan, "min_eig": nan, "min_eig_rel": nan, "max_abs_eig": nan}
    min_eig = float(re.min())
    return {"copying": float(re.sum()) / total, "neg_mass": float((-re).clamp(min=0).sum()) / total,
            "min_eig": min_eig, "min_eig_rel": min_eig / float(mag.max()), "max_abs_eig": float(mag.max())}


def ov_norm(v: torch.Tensor, o: torch.Tensor) -> float:
    """Frobenius norm of M = W_O W_V [d, d], via ||M||_F^2 = tr((V V^T)(O O^T)) on dh x dh matrices."""
    v, o = v.double(), o.double()
    return float(torch.sqrt(torch.clamp(((v @ v.T) * (o @ o.T)).sum(), min=0.0)))


def score_heads(heads: Heads) -> list[dict[str, Any]]:
    """One row per head of a layer. Each key/value head's rows are converted to float64 once and shared by the query
    heads that use it (GQA); the arithmetic per head is ``ov_eigenvalues`` and ``ov_norm``'s."""
    rows = []
    v64: dict[int, torch.Tensor] = {}
    for h in range(heads.n_heads):
        kv = heads.kv[h]
        if kv not in v64:
            v64[kv] = heads.v[h].double()
        v, o = v64[kv], heads.o[h].double()
        eig = ov_eigenvalues(v, o)
        rows.append({"layer": heads.layer, "head": h, "kv_head": kv, **spectrum_scores(eig), "ov_norm": ov_norm(v, o)})
    return rows


@functools.cache
def null_copying(d: int, dh: int, level: float = 0.95, samples: int = NULL_SAMPLES) -> tuple[float, float]:
    """Central ``level`` band of ``copying`` for random heads (independent Gaussian W_V, W_O of shape [dh, d]).

    Small heads (dh <= 32) are simulated outright. For larger ones the numerator, trace(W_V W_O) = sum of dh*d
    independent products, is normal with variance dh*d, and the denominator sum |eig| concentrates, so a few samples
    of it give the band: +-z * sqrt(dh * d) / E[sum |eig|].
    """
    from scipy.stats import norm

    gen = torch.Generator().manual_seed(1234 + 7919 * d + dh)
    if dh <= 32:
        vals = []
        for _ in range(samples):
            v, o = torch.randn(dh, d, generator=gen), torch.randn(dh, d, generator=gen)
            vals.append(spectrum_scores(ov_eigenvalues(v, o))["copying"])
        lo, hi = np.quantile(np.array(vals), [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)
    mass = [float(ov_eigenvalues(torch.randn(dh, d, generator=gen), torch.randn(dh, d, generator=gen)).abs().sum())
            for _ in range(4)]
    half = float(norm.ppf((1 + level) / 2)) * math.sqrt(dh * d) / float(np.mean(mass))
    return -half, half


def scan_circuit(circuit: Circuit, *, threshold: float = THRESHOLD, layers: Any = None,
                 progress: bool | None = False) -> pd.DataFrame:
    """Score every head of every (selected) layer; one DataFrame row per head, ranked by copying (ascending)."""
    import pandas as pd

    from mmdetect.results.progress import progress as _progress
    from mmdetect.scanner import parse_layers

    circuit.require_attention()
    wanted = parse_layers(layers) if isinstance(layers, (str, type(None))) else {int(x) for x in layers}
    all_layers = circuit.attention_layers
    chosen = [layer for layer in all_layers if wanted is None or layer in wanted]
    if not chosen:
        raise MMDetectError(f"--layers selects none of this model's attention layers (0-{max(all_layers)})"
                            if all_layers else f"no attention layers found in {circuit.ckpt.ref}")
    rows: list[dict[str, Any]] = []
    shapes: dict[int, tuple[int, int]] = {}
    lock = threading.Lock()

    def work(layer: int) -> tuple[tuple[int, int], list[dict[str, Any]]]:
        with lock:  # one read at a time (the checkpoint's file handles are shared)
            heads = circuit.heads(layer)
        return (int(heads.v.shape[2]), heads.head_dim), score_heads(heads)

    # Layers on worker threads with torch single-threaded, as the scan does: a multi-threaded 128 x 128 eigvals
    # is many times slower on a busy machine (docs/performance.md).
    with _progress(progress, len(chosen), circuit.ckpt.ref) as advance:
        for layer, (shape, layer_rows) in zip(chosen, ordered_map(work, chosen)):
            shapes[layer] = shape
            rows += layer_rows
            advance(1)
    df = pd.DataFrame(rows)
    df["flagged"] = is_flagged(df["copying"], threshold)
    df = df.sort_values(["copying", "layer", "head"], na_position="last", kind="stable").reset_index(drop=True)
    ranks = pd.array(np.arange(1, len(df) + 1), dtype="Int64")
    ranks[df["copying"].isna().to_numpy()] = pd.NA
    df.insert(0, "rank", ranks)
    df = df[COLUMNS]
    df.attrs["provenance"] = Provenance.of(
        circuit.ckpt, "heads", convention=circuit.convention.name, threshold=threshold,
        layers=layers if isinstance(layers, (str, type(None))) else wanted, device="cpu",
        family=circuit.family.family if circuit.family else None, attention_family=circuit.require_attention().family,
        heuristic=circuit.family.heuristic if circuit.family else None,
        score="copying = sum Re(eig) / sum |eig| of W_V W_O").to_dict()
    summary = []
    for layer, group in df.groupby("layer", sort=True):
        d, dh = shapes[int(layer)]
        with single_threaded():
            lo, hi = null_copying(d, dh)
        cop = group["copying"].to_numpy(dtype=np.float64)
        fin = cop[np.isfinite(cop)]
        summary.append({"layer": int(layer), "d_model": d, "d_head": dh, "n_heads": int(len(group)),
                        "n_kv_heads": int(group["kv_head"].nunique()), "n_flagged": int(group["flagged"].sum()),
                        "min": float(fin.min()) if fin.size else float("nan"),
                        "median": float(np.median(fin)) if fin.size else float("nan"),
                        "null_lo": lo, "null_hi": hi})
    df.attrs["layers"] = summary
    return df


def scan_heads(model: str, *, revision: str | None = None, threshold: float = THRESHOLD,
               convention: str = DEFAULT, layers: Any = None, progress: bool | None = False) -> pd.DataFrame:
    """Rank every attention head of ``model`` by the copying score of its OV circuit (most anti-copying first).

    Columns: see ``COLUMNS``; ``df.attrs["provenance"]`` and ``df.attrs["layers"]`` (per-layer counts and the null
    band of the copying score) as for ``scan``. Raises MMDetectError for attention layouts not yet registered.
    """
    check_unit(threshold, "--threshold", "copying scores")
    with open_circuit(model, revision=revision, convention=convention, need_mlps=False) as circuit:
        return scan_circuit(circuit, threshold=threshold, layers=layers, progress=progress)
