"""The streaming reader (scanner/readahead.py) and what it relies on: the same rows as the block-by-block path, bit
for bit,
whatever the tensor order in the files, the pieces, the parts and the page-cache mode; bounded memory; and the
decision to drop pages behind the reader, which only a checkpoint larger than the page cache gets.

The block-by-block path (``pipeline.compute_blocks``, which GGUF, .bin and FP8 checkpoints take) is the reference:
each test scans once with the streaming path and once with ``plan_reads`` made to return None.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tiny
import torch
from builders import llama_config

import mmdetect
import mmdetect.scanner
from mmdetect.convention import Fold, MLPFold
from mmdetect.convention.kernel import HALF, fold_into
from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.io.memory import (
    HEADROOM,
    cgroup_available,
    drop_behind,
    meminfo_available,
)
from mmdetect.registry.resolve import locate_mlps, resolve_family
from mmdetect.scanner import read, readahead
from mmdetect.scanner.neurons import CHUNK, NULL_PAIRS, NeuronCosines, mlp_cosines
from mmdetect.scanner.read import plan_jobs

COLUMNS = ["layer", "expert", "neuron", "cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out", "norm_gate",
           "flagged", "class", "z", "z_layer"]


def scan_both(folder: Path, monkeypatch: pytest.MonkeyPatch, drop: bool = False, **kw: Any) -> tuple[Any, Any]:
    """(streamed, block by block) scans of ``folder``: ScanResults."""
    with monkeypatch.context() as m:
        m.setattr(mmdetect.scanner, "available_memory", (lambda: 0) if drop else (lambda: 1 << 60))
        streamed = mmdetect.scan(str(folder), as_frame=False, **kw)
    with monkeypatch.context() as m:
        m.setattr(mmdetect.scanner, "plan_reads", lambda ckpt, jobs: None)
        blocks = mmdetect.scan(str(folder), as_frame=False, **kw)
    return streamed, blocks


def assert_same(a: Any, b: Any) -> None:
    """Every column of every row, and the per-layer summaries (quantiles, null bands from the mismatched pairs), equal:
    NaN where NaN, every other value to the bit."""
    fa, fb = a.to_frame(), b.to_frame()
    assert len(fa) == len(fb) > 0
    pd.testing.assert_frame_equal(fa[COLUMNS], fb[COLUMNS], check_exact=True)
    assert json.dumps(a.attrs["layers"], sort_keys=True) == json.dumps(b.attrs["layers"], sort_keys=True)


def save_wide_llama(folder: Path, n_mlp: int = 2560, layers: int = 3, **save: Any) -> Path:
    """A float32 Llama with hidden 64 and ``n_mlp`` neurons per layer: several slabs of CHUNK neurons, so it streams
    in several pieces; RMSNorm gains in [0.5, 2] so folding changes every cosine."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config(intermediate_size=n_mlp, num_hidden_layers=layers))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    model.save_pretrained(str(folder), **save)
    return folder


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """save_wide_llama, sharded into files of about 1 MB (each MLP weight is 655 KB)."""
    return save_wide_llama(tmp_path_factory.mktemp("wide") / "llama", max_shard_size="1MB")


def plan_of(folder: Path, **kw: Any) -> tuple[Checkpoint, readahead.Plan]:
    ckpt = open_checkpoint(str(folder))
    family = resolve_family(ckpt)
    _, located = locate_mlps(ckpt, family.mlps_for(ckpt.config))
    plan = readahead.plan_reads(ckpt, plan_jobs(ckpt, located, None), **kw)
    assert plan is not None
    return ckpt, plan


# -- the same rows as the block-by-block path --------------------------------------------------------------------------

@pytest.mark.parametrize("drop", [False, True], ids=["cached", "drop-behind"])
@pytest.mark.parametrize("part_bytes", [64 << 20, 200_000], ids=["whole", "parts"])
def test_streaming_gives_the_blocks_rows_bit_for_bit(wide: Path, monkeypatch: pytest.MonkeyPatch, drop: bool,
                                                      part_bytes: int) -> None:
    """A gated MLP of 2560 neurons in sharded files: pieces of one slab each (PIECE_BYTES tiny), and with
    PART_BYTES lowered, parts of 640 neurons whose pieces start at 0 and 512 of each part."""
    monkeypatch.setattr(read, "PART_BYTES", part_bytes)
    monkeypatch.setattr(readahead, "PIECE_BYTES", 1)
    ckpt, plan = plan_of(wide)
    ckpt.close()
    n_parts = 1 if part_bytes > 1 << 20 else 4
    assert len(plan.jobs) == 3 * n_parts
    assert len(plan.pieces) == 3 * (5 if n_parts == 1 else 8)
    assert_same(*scan_both(wide, monkeypatch, drop=drop))
    assert_same(*scan_both(wide, monkeypatch, drop=drop, convention="raw", layers="1-2"))


@pytest.mark.parametrize("case", ["llama", "gpt2", "phi3", "glm", "opt", "mixtral", "qwen2_moe", "dbrx", "gpt_oss"])
def test_every_layout_streams_to_the_same_rows(families: tiny.Families, case: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv1D (GPT-2: the read weight is column-major), fused gate_up halves (Phi-3) and interleaved (GLM), routed and
    shared experts (Mixtral, Qwen2-MoE), stacked (DBRX) and fused 3-D experts (gpt-oss); in parts, too."""
    folder = families.folder(case)
    assert_same(*scan_both(folder, monkeypatch))
    monkeypatch.setattr(read, "PART_BYTES", 4096)
    assert_same(*scan_both(folder, monkeypatch, drop=True))


def test_gguf_and_bin_keep_the_block_path(gguf_llama: Any, llama: Any, tmp_path: Path) -> None:
    """Ranges that are dequantised or unpickled are not stored as they are read: no streaming plan."""
    from builders import write_bin

    for folder in (gguf_llama.path, write_bin(llama.path, tmp_path / "bin")):
        with open_checkpoint(str(folder)) as ckpt:
            family = resolve_family(ckpt)
            _, located = locate_mlps(ckpt, family.mlps_for(ckpt.config))
            assert readahead.plan_reads(ckpt, plan_jobs(ckpt, located, None)) is None


# -- file order --------------------------------------------------------------------------------------------------------

def write_reordered(src: Path, dst: Path) -> list[str]:
    """``src``'s model.safetensors rewritten with its tensors in reverse order of name (layer 1 before layer 0, and
    down_proj after up_proj), in one file; returns the names in file order."""
    from safetensors.torch import load_file

    state = load_file(str(src / "model.safetensors"))
    names = sorted(state, reverse=True)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        header[name] = {"dtype": codes[state[name].dtype], "shape": list(state[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    with open(dst / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            fh.write(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return names


def test_reads_follow_the_file_and_rows_keep_layer_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors stored in reverse order: the reader goes through the file front to back (layer 2's MLP first, its
    shared down_proj before its rows), yet the rows come out in layer order and equal those of the file in name
    order."""
    src = save_wide_llama(tmp_path / "src")
    dst = tmp_path / "reordered"
    write_reordered(src, dst)
    monkeypatch.setattr(readahead, "PIECE_BYTES", 1)
    ckpt, plan = plan_of(dst)
    with ckpt:
        firsts = []
        for slot in plan.slots:
            layer = int(slot.range.key.split(".")[2])
            if not firsts or firsts[-1][0] != layer:
                firsts.append((layer, slot.where))
        assert [layer for layer, _ in firsts] == [2, 1, 0]  # each MLP once, in file order
        assert [where for _, where in firsts] == sorted(where for _, where in firsts)
        for layer in range(3):
            keys = [s.range.key for s in plan.slots if f"layers.{layer}." in s.range.key]
            assert keys[0].endswith("post_attention_layernorm.weight")   # shared ranges first, in file order:
            assert keys[1].endswith("down_proj.weight")                  # the column-major weight, read whole
            assert all(k.endswith(("up_proj.weight", "gate_proj.weight")) for k in keys[2:])
            assert len(keys) == 2 + 2 * 5                                # then every piece's up and gate rows
    streamed = mmdetect.scan(str(dst), as_frame=False)
    assert [entry["layer"] for entry in streamed.attrs["layers"]] == [0, 1, 2]
    assert_same(streamed, mmdetect.scan(str(src), as_frame=False))


def test_each_range_is_read_once(wide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every byte the scan reads is read once: the ranges of the plan are disjoint, and the scan reads each once
    (counted at Checkpoint.read); together they are the MLP weights and norm gains, exactly."""
    monkeypatch.setattr(read, "PART_BYTES", 200_000)
    monkeypatch.setattr(readahead, "PIECE_BYTES", 1)
    ckpt, plan = plan_of(wide)
    with ckpt:
        extents = sorted((e.file, e.begin, e.end) for e in
                         (ckpt.extent(s.range.key, s.range.start, s.range.stop) for s in plan.slots) if e is not None)
        for (f0, _, e0), (f1, b1, _) in zip(extents, extents[1:]):
            assert f0 != f1 or e0 <= b1
        mlp = [k for k in ckpt.tensors if ".mlp." in k or "post_attention_layernorm" in k]
        assert sum(e - b for _, b, e in extents) == sum(ckpt.nbytes(k) for k in mlp)
    calls: list[tuple[str, Any, Any]] = []
    real_read = Checkpoint.read

    def counting(self: Checkpoint, key: str, start: Any = None, stop: Any = None, populate: bool = True) -> Any:
        calls.append((key, start, stop))
        return real_read(self, key, start, stop, populate)

    monkeypatch.setattr(Checkpoint, "read", counting)
    mmdetect.scan(str(wide))
    assert len(calls) == len(set(calls)) == len(plan.slots)


# -- memory ------------------------------------------------------------------------------------------------------------

def test_bytes_in_flight_stay_within_the_budget(wide: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the smallest budget a plan allows (one piece and its MLP's shared ranges), the bytes read and not yet
    released never exceed it; releases are seen as drop_cached calls, one per range."""
    monkeypatch.setattr(readahead, "PIECE_BYTES", 1)
    ckpt, plan = plan_of(wide, budget=1)
    shared = {s.range.key for s in plan.slots if s.users > 1}
    down = ckpt.nbytes("model.layers.0.mlp.down_proj.weight")
    piece_rows = 2 * CHUNK * 64 * 4                                     # up and gate rows of one slab, float32
    assert plan.budget == down + ckpt.nbytes("model.layers.0.post_attention_layernorm.weight") + piece_rows
    assert shared == {f"model.layers.{i}.{w}.weight" for i in range(3)
                      for w in ("mlp.down_proj", "post_attention_layernorm")}
    held, peak = [0], [0]
    sizes = {s.range: s.nbytes for s in plan.slots}
    real_read, real_drop = Checkpoint.read, Checkpoint.drop_cached

    def reading(self: Checkpoint, key: str, start: Any = None, stop: Any = None, populate: bool = True) -> Any:
        held[0] += sizes[readahead.Range(key, start, stop)]
        peak[0] = max(peak[0], held[0])
        return real_read(self, key, start, stop, populate)

    def dropping(self: Checkpoint, key: str, start: Any = None, stop: Any = None) -> None:
        held[0] -= sizes[readahead.Range(key, start, stop)]
        real_drop(self, key, start, stop)

    monkeypatch.setattr(Checkpoint, "read", reading)
    monkeypatch.setattr(Checkpoint, "drop_cached", dropping)
    family = resolve_family(ckpt)

    def fold(block: Any) -> MLPFold:
        return mmdetect.convention.mlp_fold(mmdetect.convention.get_convention("folded"), block.job.spec,
                                            block.pre_gain, block.post_gain)

    with ckpt:
        results = list(readahead.stream_blocks(ckpt, plan, fold, lambda job, stats, d: (job, stats), drop=True,
                                            workers=3))
    assert family.family == "llama" and len(results) == len(plan.jobs)
    assert held[0] == 0 and 0 < peak[0] <= plan.budget


# -- dropping pages behind the reader ----------------------------------------------------------------------------------

def test_drop_behind_only_when_the_reads_exceed_available_memory() -> None:
    gib = 1 << 30
    assert not drop_behind(10 * gib, 24 * gib)
    assert not drop_behind(23 * gib, 24 * gib)                  # fits, with HEADROOM to spare
    assert drop_behind(23 * gib + 1, 24 * gib)
    assert drop_behind(32 * gib, 24 * gib)
    assert drop_behind(1, HEADROOM)                             # nothing left for the cache
    assert not drop_behind(1 << 50, None)                       # unknown: never drop


def test_available_memory_sources(tmp_path: Path) -> None:
    assert meminfo_available("MemTotal:  24684084 kB\nMemFree: 1 kB\nMemAvailable:   22408716 kB\n") == 22408716 * 1024
    assert meminfo_available("MemTotal: 1 kB\n") is None
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("100\n")
    (tmp_path / "memory.stat").write_text("anon 60\nfile 40\n")
    assert cgroup_available(tmp_path) is None                    # no limit
    (tmp_path / "memory.max").write_text("1000\n")
    assert cgroup_available(tmp_path) == 1000 - 100 + 40         # the group's page cache is reclaimable
    assert cgroup_available(tmp_path / "absent") is None


@pytest.mark.parametrize("available", [1 << 60, 0], ids=["fits", "too-big"])
def test_pages_are_dropped_only_for_a_checkpoint_larger_than_memory(wide: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   available: int) -> None:
    dropped: list[tuple[str, Any, Any]] = []
    monkeypatch.setattr(Checkpoint, "drop_cached", lambda self, key, start=None, stop=None:
                        dropped.append((key, start, stop)))
    monkeypatch.setattr(mmdetect.scanner, "available_memory", lambda: available)
    mmdetect.scan(str(wide))
    ckpt, plan = plan_of(wide)
    ckpt.close()
    expected = sorted((s.range.key, s.range.start or -1, s.range.stop or -1) for s in plan.slots)
    assert sorted((k, a or -1, b or -1) for k, a, b in dropped) == (expected if not available else [])


# -- the kernel in pieces ----------------------------------------------------------------------------------------------

def one_slab_at_a_time(w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None,
                       fold: MLPFold) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gram matrices [n, k, k], mismatched [n]) as the first version computed them (commit 8cf29f3): each slab of
    CHUNK rows folded whole into one buffer by ``fold_into_v1``, one bmm, and the null pairs of the first NULL_PAIRS
    rows."""
    n, d = w_in.shape
    k = 3 if w_gate is not None else 2
    gram = torch.empty(n, k, k)
    mismatched = torch.full((n,), float("nan"))
    buf = torch.empty(CHUNK, k, d)
    for j0 in range(0, n, CHUNK):
        j1 = min(n, j0 + CHUNK)
        b = buf[: j1 - j0]
        fold_into_v1(b[:, 0], w_in[j0:j1], fold.read)
        fold_into_v1(b[:, 1], w_out[j0:j1], fold.write)
        if w_gate is not None:
            fold_into_v1(b[:, 2], w_gate[j0:j1], fold.gate)
        torch.bmm(b, b.transpose(1, 2), out=gram[j0:j1])
        if j1 - j0 > 1 and j0 < NULL_PAIRS:
            dots = torch.bmm(b[:-1, 0:1], b[1:, 1:2].transpose(1, 2)).reshape(-1)
            mismatched[j0:j1 - 1] = dots / torch.sqrt(gram[j0:j1 - 1, 0, 0] * gram[j0 + 1:j1, 1, 1])
    return gram, mismatched


def fold_into_v1(out: torch.Tensor, w: torch.Tensor, f: Fold) -> None:
    """The first version's fold_into: a promoting mul for rows, [m, 64] tiles for a column-major chunk."""
    if w.stride(-1) != 1 and w.stride(0) == 1:
        for k0 in range(0, w.shape[1], 64):
            out[:, k0:k0 + 64].copy_(w[:, k0:k0 + 64])
        if f.gain is not None:
            out.mul_(f.gain)
    elif f.gain is not None:
        torch.mul(w, f.gain, out=out)
    else:
        out.copy_(w)
    if f.centre:
        out.sub_(out.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gated,centre", [(True, False), (False, True)])
def test_pieces_and_sub_slabs_change_no_bit(dtype: torch.dtype, gated: bool, centre: bool) -> None:
    """2600 neurons, d 2560: slabs are folded in sub-slabs (SUB_BYTES), rows arrive in pieces of whole slabs out of
    order; Gram matrices, cosines and the null pairs equal the one-slab-at-a-time computation and one mlp_cosines
    call, to the bit."""
    n, d = 2600, 2560
    g = torch.Generator().manual_seed(5)
    w_in = torch.randn(n, d, generator=g).to(dtype)
    w_out = torch.randn(d, n, generator=g).to(dtype).T                      # column-major, as down_proj is read
    w_gate = torch.randn(n, d, generator=g).to(dtype) if gated else None
    gain = torch.rand(d, generator=g) + 0.5
    fold = MLPFold(Fold(gain, centre), Fold(None, centre), Fold(gain, centre), flip_sign=True)
    acc = NeuronCosines(n, d, gated, fold)
    assert acc.sub < CHUNK                                                  # sub-slabs are in use
    for j0 in (2048, 0, 1536, 512):
        j1 = min(n, j0 + (CHUNK if j0 != 2048 else n - j0))
        acc.add(j0, w_in[j0:j1], w_out[j0:j1], None if w_gate is None else w_gate[j0:j1])
    acc.add(1024, w_in[1024:1536], w_out[1024:1536], None if w_gate is None else w_gate[1024:1536])
    gram, mismatched = one_slab_at_a_time(w_in, w_out, w_gate, fold)
    assert torch.equal(acc.gram, gram)
    assert torch.equal(acc.mismatched.isnan(), mismatched.isnan())
    assert int(acc.mismatched.isfinite().sum()) == NULL_PAIRS - 2           # none across slab boundaries
    assert torch.equal(acc.mismatched.nan_to_num(7.0), mismatched.clamp(-1, 1).nan_to_num(7.0))
    whole = mlp_cosines(w_in, w_out, w_gate, fold)
    pieces = acc.stats()
    for name in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out", "norm_gate", "mismatched"):
        assert torch.equal(getattr(pieces, name).nan_to_num(7.0), getattr(whole, name).nan_to_num(7.0)), name
    with pytest.raises(ValueError, match="whole slabs"):
        acc.add(100, w_in[100:612], w_out[100:612], None if w_gate is None else w_gate[100:612])


def test_fold_into_widens_half_precision_exactly() -> None:
    """The in-place path for bf16/f16 rows gives the promoting product's float32 values, specials included."""
    g = torch.Generator().manual_seed(1)
    gain = torch.rand(96, generator=g) * 3
    gain[5] = 0.0
    for dtype in HALF:
        w = torch.randn(40, 96, generator=g).to(dtype)
        w[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40]).to(dtype)
        out = torch.empty(40, 2, 96)[:, 1]                             # a strided view, as the kernel passes
        fold_into(out, w, Fold(gain))
        assert torch.equal(out.nan_to_num(7.0), torch.mul(w, gain).nan_to_num(7.0))
        assert np.array_equal(out.isnan().numpy(), torch.mul(w, gain).isnan().numpy())
