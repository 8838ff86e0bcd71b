"""The scan: checkpoint -> registry layout -> per-MLP blocks -> neuron rows, ranked by cos.

Data flow: ``registry.resolve`` finds the layout, ``scanner.read`` reads one block at a time in the canonical
orientation, ``scanner.readahead`` reads every MLP byte range once in file order on a reader thread and computes pieces
of blocks side by side (``scanner.pipeline``: whole blocks, for GGUF, .bin, FP8 and GPUs), ``scanner.neurons`` computes
each neuron's cosines in the chosen convention, and ``scanner.stats`` flags, classifies and summarises the rows.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, overload

import numpy as np

from mmdetect.convention import DEFAULT, Convention, MLPFold, for_model, get_convention, mlp_fold
from mmdetect.errors import THRESHOLD, MMDetectError, check_unit
from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.io.memory import available_memory, drop_behind
from mmdetect.registry.resolve import resolve_layout
from mmdetect.results.progress import progress as _progress_bar
from mmdetect.results.provenance import Provenance
from mmdetect.results.rows import COLUMNS, ScanResult
from mmdetect.scanner.layers import LayerSet, parse_layers  # noqa: F401 (parse_layers: the API's entry)
from mmdetect.scanner.neurons import NeuronStats, mlp_cosines
from mmdetect.scanner.pipeline import BlockResult, compute_blocks, pick_device
from mmdetect.scanner.read import Block, Job, plan_jobs
from mmdetect.scanner.readahead import plan_reads, stream_blocks
from mmdetect.scanner.stats import finish_rows, layer_summary

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def _block_rows(job: Job, stats: NeuronStats, d: int) -> dict[str, np.ndarray]:
    n = len(stats.cos)
    return {
        "layer": np.full(n, job.layer, dtype=np.int64),
        "expert": np.full(n, job.expert_label, dtype=object),
        "neuron": np.arange(n, dtype=np.int64) + (job.part[0] if job.part else 0),
        "cos": stats.cos.numpy().astype(np.float64),
        "cos_gate_out": stats.cos_gate_out.numpy().astype(np.float64),
        "cos_gate_in": stats.cos_gate_in.numpy().astype(np.float64),
        "norm_in": stats.norm_in.numpy().astype(np.float64), "norm_out": stats.norm_out.numpy().astype(np.float64),
        "norm_gate": stats.norm_gate.numpy().astype(np.float64),
        "_gated": np.full(n, job.spec.gated), "_d": np.full(n, d, dtype=np.int64),
    }


def _blocks(ckpt: Checkpoint, jobs: list[Job], conv: Convention, dev: str) -> Iterator[BlockResult]:
    """Each job's result, in job order. A checkpoint whose MLP weights are stored as they are read (float
    safetensors) streams (``scanner.readahead``: file order, a reader thread, pages dropped behind the reader when it is
    larger than the page cache); GGUF, .bin, FP8 and a GPU take ``pipeline.compute_blocks``, one block per job."""

    def fold(block: Block) -> MLPFold:
        return mlp_fold(conv, block.job.spec, block.pre_gain, block.post_gain)

    def finish(job: Job, stats: NeuronStats, d: int) -> BlockResult:
        return BlockResult(job, _block_rows(job, stats, d), stats.mismatched.numpy(), d)

    plan = plan_reads(ckpt, jobs) if dev == "cpu" else None
    if plan is not None:
        return stream_blocks(ckpt, plan, fold, finish, drop=drop_behind(plan.nbytes, available_memory()))

    def compute(block: Block) -> BlockResult:
        stats = mlp_cosines(block.w_in, block.w_out, block.w_gate, fold(block), device=dev)
        return finish(block.job, stats, int(block.w_in.shape[1]))

    return compute_blocks(ckpt, jobs, compute, workers=1 if dev != "cpu" else None)


def scan_checkpoint(ckpt: Checkpoint, **options: Any) -> pd.DataFrame:
    """Scan an open checkpoint into a DataFrame; see ``scan`` and ``scan_result``."""
    return scan_result(ckpt, **options).to_frame()


def scan_result(ckpt: Checkpoint, *, threshold: float = THRESHOLD, convention: str | Convention = DEFAULT,
                layers: Any = None, device: str = "cpu", progress: bool | None = None,
                on_block: Callable[[BlockResult], None] | None = None) -> ScanResult:
    """Scan an open checkpoint; see ``scan``."""
    check_unit(threshold)
    conv = get_convention(convention)
    selection = LayerSet.of(layers)
    layout = resolve_layout(ckpt, attention=False)
    conv = for_model(conv, layout.resolved, ckpt.config)  # a convention that follows a tool: its exceptions here
    family, located = layout.family, layout.located
    assert family is not None  # need_mlps: a checkpoint without a family raised above
    wanted = selection.select(located) if selection is not None else None
    dev = pick_device(device)
    jobs = plan_jobs(ckpt, located, wanted)
    parts: list[dict[str, np.ndarray]] = []
    mismatched: dict[int, list[np.ndarray]] = {}
    d_model: dict[int, int] = {}

    with _progress_bar(progress, len(jobs), ckpt.ref) as advance:
        for result in _blocks(ckpt, jobs, conv, dev):
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
    prov = Provenance.of(ckpt, "scan", convention=conv.name, threshold=threshold,
                         layers=layers if isinstance(layers, str) or layers is None else wanted,
                         device=dev, family=family.family, heuristic=family.heuristic)
    attrs: dict[str, Any] = {"provenance": prov.to_dict()}
    attrs["layers"] = layer_summary(columns, mismatched, d_model)
    return ScanResult(columns, attrs)


@overload
def scan(model: str | os.PathLike[str], *, revision: str | None = ..., threshold: float = ...,
         convention: str | Convention = ...,
         raw: bool = ..., layers: Any = ..., device: str = ..., progress: bool | None = ...,
         as_frame: Literal[True] = ...) -> pd.DataFrame: ...
@overload
def scan(model: str | os.PathLike[str], *, revision: str | None = ..., threshold: float = ...,
         convention: str | Convention = ...,
         raw: bool = ..., layers: Any = ..., device: str = ..., progress: bool | None = ...,
         as_frame: Literal[False]) -> ScanResult: ...
@overload
def scan(model: str | os.PathLike[str], *, revision: str | None = ..., threshold: float = ...,
         convention: str | Convention = ...,
         raw: bool = ..., layers: Any = ..., device: str = ..., progress: bool | None = ...,
         as_frame: bool = ...) -> pd.DataFrame | ScanResult: ...


def scan(model: str | os.PathLike[str], *, revision: str | None = None, threshold: float = THRESHOLD,
         convention: str | Convention = DEFAULT,
         raw: bool = False, layers: Any = None, device: str = "cpu", progress: bool | None = False,
         as_frame: bool = True) -> pd.DataFrame | ScanResult:
    """Scan every MLP neuron of ``model`` and return a pandas DataFrame, one row per neuron, ranked by cos.

    model: a local checkpoint folder, a hub id (``revision`` selects a branch, tag or commit) or a ``.gguf`` file.
    threshold: a neuron is flagged when cos <= threshold. convention: a name in ``mmdetect.convention.CONVENTIONS``
    (``folded``; ``raw`` for plain cosines of the stored weights; ``transformerlens`` for TransformerLens's processing
    with Gerstner & Schütze's sign flip, the route of their published numbers); ``raw=True`` is an alias of
    ``convention="raw"``. layers: ``"0-5,10"`` or an iterable of ints. device: ``cpu``, ``cuda`` or ``mps``.
    Columns: see ``COLUMNS``. ``df.attrs["provenance"]`` records what was scanned and how; ``df.attrs["layers"]`` is
    the per-layer summary (counts, quantiles, null bands). ``as_frame=False`` returns the ``ScanResult`` instead.
    """
    check_unit(threshold)               # a bad threshold or convention fails before the checkpoint is opened
    conv = get_convention(convention)
    if raw:
        if conv.name not in (DEFAULT, "raw"):
            raise MMDetectError(f"raw=True contradicts convention={conv.name!r}: pass one of them")
        conv = get_convention("raw")
    with open_checkpoint(model, revision=revision) as ckpt:
        result = scan_result(ckpt, threshold=threshold, convention=conv, layers=layers, device=device,
                             progress=progress)
    return result.to_frame() if as_frame else result


