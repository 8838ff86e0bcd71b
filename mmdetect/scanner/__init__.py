"""The scan: checkpoint -> registry layout -> per-MLP blocks -> neuron rows, ranked by cos.

Data flow: ``registry.resolve`` finds the layout, ``scanner.read`` reads one block at a time in the canonical
orientation, ``scanner.pipeline`` reads and computes blocks side by side, ``scanner.neurons`` computes each neuron's
cosines in the chosen convention, and ``scanner.stats`` flags, classifies and summarises the rows.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mmdetect import __version__
from mmdetect.convention import DEFAULT, Convention, get_convention, mlp_fold
from mmdetect.errors import MMDetectError
from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.registry.resolve import locate_mlps, resolve_family
from mmdetect.report.progress import progress as _progress_bar
from mmdetect.scanner.neurons import NeuronStats, mlp_cosines
from mmdetect.scanner.pipeline import BlockResult, compute_blocks, pick_device
from mmdetect.scanner.read import Block, plan_jobs
from mmdetect.scanner.stats import finish_rows, layer_summary

COLUMNS = ["rank", "layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class", "z", "p",
           "norm_in", "norm_out", "norm_gate"]


def parse_layers(text: str | None) -> set[int] | None:
    """'0-5,10' -> {0, 1, 2, 3, 4, 5, 10}; None or '' -> None (all layers)."""
    if not text:
        return None
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise MMDetectError(f"--layers {text!r} is not a list of layers: use e.g. 0-5,10")
        out.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return out


def _block_rows(block: Block, stats: NeuronStats) -> dict[str, np.ndarray]:
    n, d = block.w_in.shape
    return {
        "layer": np.full(n, block.job.layer, dtype=np.int64),
        "expert": np.full(n, block.expert_label, dtype=object),
        "neuron": np.arange(n, dtype=np.int64) + (block.job.part[0] if block.job.part else 0),
        "cos": stats.cos.numpy().astype(np.float64),
        "cos_gate_out": stats.cos_gate_out.numpy().astype(np.float64),
        "cos_gate_in": stats.cos_gate_in.numpy().astype(np.float64),
        "norm_in": stats.norm_in.numpy().astype(np.float64), "norm_out": stats.norm_out.numpy().astype(np.float64),
        "norm_gate": stats.norm_gate.numpy().astype(np.float64),
        "_gated": np.full(n, block.w_gate is not None), "_d": np.full(n, d, dtype=np.int64),
    }


@dataclass
class ScanResult:
    """A scan's rows as numpy columns (``COLUMNS``, ranked by cos) plus ``attrs`` (provenance, layers).

    The command line writes CSV, TSV and Parquet straight from these columns, so it never imports pandas (a quarter
    of a second); ``to_frame`` gives the DataFrame that the Python API returns.
    """

    columns: dict[str, np.ndarray]
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.columns["cos"])

    def select(self, mask: np.ndarray) -> "ScanResult":
        """The rows where ``mask`` is true (ranks are kept), with the same attrs."""
        return ScanResult({k: v[mask] for k, v in self.columns.items()}, self.attrs)

    def to_frame(self) -> "Any":
        import pandas as pd

        cols = dict(self.columns)
        ranks = pd.array(cols["rank"], dtype="Int64")
        ranks[~np.isfinite(cols["cos"])] = pd.NA
        cols["rank"] = ranks
        df = pd.DataFrame(cols, columns=COLUMNS)
        df.attrs = self.attrs
        return df


def scan_checkpoint(ckpt: Checkpoint, **options: Any) -> "Any":
    """Scan an open checkpoint into a DataFrame; see ``scan`` and ``scan_result``."""
    return scan_result(ckpt, **options).to_frame()


def scan_result(ckpt: Checkpoint, *, threshold: float = -0.5, convention: str | Convention = DEFAULT,
                layers: Any = None, device: str = "cpu", progress: bool | None = None,
                on_block: Callable[[BlockResult], None] | None = None) -> ScanResult:
    """Scan an open checkpoint; see ``scan``."""
    if not -1.0 <= threshold <= 1.0:
        raise MMDetectError(f"--threshold {threshold} is outside [-1, 1]: cosines lie in [-1, 1]")
    conv = get_convention(convention)
    wanted = parse_layers(layers) if isinstance(layers, str) or layers is None else set(map(int, layers))
    family = resolve_family(ckpt)
    specs, located = locate_mlps(ckpt, family.mlps_for(ckpt.config))
    if not located:
        raise MMDetectError(f"no MLP tensors of the {family.family!r} layout (e.g. {specs[0].out.key}) were found in "
                            f"{ckpt.ref}: the checkpoint is incomplete or mislabelled as {ckpt.model_type!r}")
    if wanted is not None and not wanted & set(located):
        raise MMDetectError(f"--layers selects none of this model's layers (0-{max(located)})")
    dev = pick_device(device)
    jobs = plan_jobs(ckpt, located, wanted)
    parts: list[dict[str, np.ndarray]] = []
    mismatched: dict[int, list[np.ndarray]] = {}
    d_model: dict[int, int] = {}

    def compute(block: Block) -> BlockResult:
        fold = mlp_fold(conv, block.job.spec, block.pre_gain, block.post_gain)
        stats = mlp_cosines(block.w_in, block.w_out, block.w_gate, fold, device=dev)
        return BlockResult(block.job, _block_rows(block, stats), stats.mismatched.numpy(), int(block.w_in.shape[1]))

    with _progress_bar(progress, len(jobs), ckpt.ref) as advance:
        for result in compute_blocks(ckpt, jobs, compute, workers=1 if dev != "cpu" else None):
            parts.append(result.rows)
            mismatched.setdefault(result.job.layer, []).append(result.mismatched)
            d_model[result.job.layer] = result.d_model
            if on_block is not None:
                on_block(result)
            advance(1)
    rows = finish_rows({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, threshold)
    # Rank by cos (dead neurons last), ties by layer then neuron: lexsort's last key is the primary one.
    order = np.lexsort((rows["neuron"], rows["layer"], np.where(np.isfinite(rows["cos"]), rows["cos"], np.inf)))
    columns = {"rank": np.arange(1, len(order) + 1, dtype=np.int64),
               **{k: rows[k][order] for k in COLUMNS if k != "rank"}}
    attrs: dict[str, Any] = {"provenance": {
        "tool": "mmdetect", "version": __version__, "model": ckpt.ref, "path": str(ckpt.path),
        "format": ckpt.format, "model_type": ckpt.model_type, "family": family.family,
        "heuristic": family.heuristic, "revision": ckpt.revision, "fingerprint": ckpt.fingerprint(),
        "convention": conv.name, "threshold": threshold,
        "layers": layers if isinstance(layers, str) or layers is None else sorted(wanted or []),
        "device": dev, "torch": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }}
    attrs["layers"] = layer_summary(columns, mismatched, d_model)
    return ScanResult(columns, attrs)


def scan(model: str, *, revision: str | None = None, threshold: float = -0.5, convention: str | Convention = DEFAULT,
         raw: bool = False, layers: Any = None, device: str = "cpu", progress: bool | None = False,
         as_frame: bool = True) -> "Any":
    """Scan every MLP neuron of ``model`` and return a pandas DataFrame, one row per neuron, ranked by cos.

    model: a local checkpoint folder, a hub id (``revision`` selects a branch, tag or commit) or a ``.gguf`` file.
    threshold: a neuron is flagged when cos <= threshold. convention: a name in ``mmdetect.convention.CONVENTIONS``
    (``folded``, or ``raw`` for plain cosines of the stored weights); ``raw=True`` is an alias of
    ``convention="raw"``. layers: ``"0-5,10"`` or an iterable of ints. device: ``cpu``, ``cuda`` or ``mps``.
    Columns: see ``COLUMNS``. ``df.attrs["provenance"]`` records what was scanned and how; ``df.attrs["layers"]`` is
    the per-layer summary (counts, quantiles, null bands). ``as_frame=False`` returns the ``ScanResult`` instead.
    """
    conv = get_convention(convention)  # an unknown name fails before the checkpoint is opened
    if raw:
        if conv.name not in (DEFAULT, "raw"):
            raise MMDetectError(f"raw=True contradicts convention={conv.name!r}: pass one of them")
        conv = get_convention("raw")
    with open_checkpoint(model, revision=revision) as ckpt:
        result = scan_result(ckpt, threshold=threshold, convention=conv, layers=layers, device=device,
                             progress=progress)
    return result.to_frame() if as_frame else result


