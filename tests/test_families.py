"""Every registry family against transformers itself.

For each model type in the registry (and each configuration that changes its layout, ``tiny.VARIANTS``) a tiny random
checkpoint is built from its transformers config class and saved with ``save_pretrained``. Then:

* fast path == slow path: the cosines ``mmdetect.scan`` streams from the safetensors files equal the ones computed from
  the model transformers builds from the same folder (``tests/slowpath.py``, which finds MLPs, gate/up and norms from
  the module tree and the forward pass, never from the registry), to 1e-5, folded and raw;
* planted neurons: a neuron whose folded read and write are exact opposites comes out first at cos = -1, under every
  layout (Conv1D, Linear, fused, stacked and 3-D experts, shared experts), and a raw-convention plant does the same
  with ``raw=True``;
* the real Llama checkpoints in ``../shared/models`` (when present) agree with the slow path too.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import slowpath
import tiny
import torch
from builders import REAL_LLAMAS, SHARED_MODELS, needs_shared

import mmdetect
from mmdetect.registry import load_registry

# Every test here builds or loads a transformers model per registry family: the genuinely slow part of the suite,
# marked so that `pytest -m "not slow"` gives a quick loop. `make test` runs it.
pytestmark = pytest.mark.slow

TOL = 1e-5
COLUMNS = ("cos", "cos_gate_out", "cos_gate_in")

FAMILY_OF = {t: fam.family for fam in load_registry().families if fam.format == "safetensors"
             for t in fam.model_types}
# case id -> (model type, config overrides); the ``families`` fixture (conftest.py) builds each case once.
CASES: dict[str, tuple[str, dict | None]] = {**{t: (t, None) for t in sorted(FAMILY_OF)}, **tiny.VARIANTS}
assert all(tiny.case_spec(c) == spec for c, spec in CASES.items())


def _representative(family: str) -> str:
    """One model type per family: the family's namesake when it is a model type."""
    types = sorted(t for t, f in FAMILY_OF.items() if f == family)
    return family if family in types else types[0]


# Families whose own layout the planted-neuron test exercises, plus the variant layouts that add MLPs.
PLANT_CASES = sorted({_representative(f) for f in FAMILY_OF.values()}) + [
    "gemma4_text+enable_moe_block=True", "llama4_text+interleave_moe_layer_step=2"]


# -- comparing -------------------------------------------------------------------------------------------------------

def _label(expert: Any) -> Any:
    """The expert column as a dictionary key: None for dense MLPs, int for routed experts, str otherwise."""
    if expert is None or (isinstance(expert, float) and math.isnan(expert)):
        return None
    return int(expert) if isinstance(expert, (int, np.integer)) else expert


def fast_rows(df: pd.DataFrame) -> dict[tuple[int, Any, int], tuple[float, float, float]]:
    keys = zip(df["layer"].astype(int), map(_label, df["expert"]), df["neuron"].astype(int))
    return dict(zip(keys, zip(*(df[c].to_numpy(dtype=np.float64) for c in COLUMNS))))


def assert_same_cosines(df: pd.DataFrame, units: list[slowpath.Unit], raw: bool) -> None:
    """Same neurons (layer, expert, neuron), same cos / cos_gate_out / cos_gate_in to TOL, NaN where the other is."""
    fast = fast_rows(df)
    slow = {k: tuple(v[c] for c in COLUMNS) for k, v in slowpath.reference_rows(units, raw)}
    only_fast, only_slow = sorted(set(fast) - set(slow), key=str), sorted(set(slow) - set(fast), key=str)
    assert not only_fast and not only_slow, (
        f"{len(only_fast)} neurons only in the scan (e.g. {only_fast[:3]}), {len(only_slow)} only in the full model "
        f"(e.g. {only_slow[:3]})")
    keys = sorted(slow, key=str)
    a = np.array([fast[k] for k in keys])
    b = np.array([slow[k] for k in keys])
    assert np.array_equal(np.isnan(a), np.isnan(b)), "NaN in one path but not the other"
    diff = np.nan_to_num(np.abs(a - b))
    worst = np.unravel_index(diff.argmax(), diff.shape)
    assert diff.max() <= TOL, (f"{COLUMNS[worst[1]]} of {keys[worst[0]]}: scan {a[worst]:.7f}, full model "
                               f"{b[worst]:.7f}")


def folding_changes_cosines(units: list[slowpath.Unit]) -> float:
    """Largest |folded - raw| cos over all neurons: the checkpoint's gains must make the conventions differ."""
    return max(float((slowpath.unit_cosines(u, False)["cos"] - slowpath.unit_cosines(u, True)["cos"]).abs().max())
               for u in units)


# -- fast path == slow path ------------------------------------------------------------------------------------------

def test_every_registry_family_has_a_case() -> None:
    families = {f.family for f in load_registry().families if f.format == "safetensors"}
    assert {FAMILY_OF[mt] for mt, _ in CASES.values()} == families
    assert set(FAMILY_OF) <= set(CASES)
    assert {FAMILY_OF[c] for c in PLANT_CASES if c in FAMILY_OF} == families


@pytest.mark.parametrize("case,raw", [(c, raw) for c in CASES for raw in (False, True)],
                         ids=[f"{c}-{'raw' if raw else 'folded'}" for c in CASES for raw in (False, True)])
def test_fast_path_equals_slow_path(families: tiny.Families, case: str, raw: bool) -> None:
    units = families.units(case)
    assert units, "the slow path found no MLP"
    df = mmdetect.scan(str(families.folder(case)), raw=raw)
    prov = df.attrs["provenance"]
    assert (prov["family"], prov["convention"]) == (FAMILY_OF[CASES[case][0]], "raw" if raw else "folded")
    assert_same_cosines(df, units, raw)
    if not raw and not all(folding_is_identity(u) for u in units):
        assert folding_changes_cosines(units) > 0.05, "random norm gains should change the folded cosines"


# -- the slow path's own findings, spot-checked against the modelling code -------------------------------------------

@pytest.mark.parametrize("case,layer,expert,pre,post,gated", [
    ("gpt2", 0, None, ("layernorm", 0.0), (), False),                   # Conv1D, LayerNorm
    ("nanochat", 1, None, ("rms", 0.0), (), False),                     # RMSNorm without a weight
    ("gemma", 1, None, ("rms", 1.0), (), True),                         # gain 1 + w
    ("gemma2", 0, None, ("rms", 1.0), (("rms", 1.0),), True),           # pre- and post-feed-forward norms
    ("olmo2", 1, None, None, (("rms", 0.0),), True),                    # reads the raw residual
    ("olmo_hybrid", 0, None, ("rms", 0.0), (), True),                   # linear-attention layer
    ("olmo_hybrid", 1, None, None, (("rms", 0.0),), True),              # full-attention layer: OLMo 2 style
    ("axk1", 1, "shared", ("rms", 0.0), (("rms", 0.0),), True),         # norm inside the MoE block
    ("gemma4_text+enable_moe_block=True", 0, 2, ("rms", 0.0), (("rms", 0.0), ("rms", 0.0)), True),
    ("dbrx", 1, 3, ("layernorm", 0.0), (), True),                       # experts stacked as [E*n, d]
])
def test_slow_path_finds_the_documented_structure(families: tiny.Families, case: str, layer: int, expert: Any,
                                                  pre: tuple | None, post: tuple, gated: bool) -> None:
    unit = next(u for u in families.units(case) if (u.layer, u.expert) == (layer, expert))
    assert (unit.gate is not None) == gated
    assert (None if unit.pre is None else (unit.pre.kind, unit.pre.offset)) == pre
    assert tuple((n.kind, n.offset) for n in unit.post) == post


@pytest.mark.parametrize("case,split", [("phi3", "halves"), ("gpt_oss", "interleave"), ("mixtral", "halves")])
def test_slow_path_splits_fused_gate_up_as_the_modelling_code(families: tiny.Families, case: str,
                                                              split: str) -> None:
    """Phi-3 ``gate, up = gate_up.chunk(2)``; GPT-OSS ``gate_up[..., ::2], gate_up[..., 1::2]``; Mixtral's in-memory
    experts ``gate_up_proj`` chunked gate first (transformers.integrations.moe)."""
    unit = next(u for u in families.units(case) if u.gate is not None)
    n = unit.n
    expected_up = torch.arange(n, 2 * n) if split == "halves" else torch.arange(1, 2 * n, 2)
    assert torch.equal(unit.up.rows, expected_up)


# -- planted neurons -------------------------------------------------------------------------------------------------

@dataclass
class Plant:
    unit: slowpath.Unit
    neuron: int
    convention: str               # "folded" | "raw"
    flip: bool = False            # plant gate = -up: only the gate-sign canonicalisation brings it back to +1

    @property
    def key(self) -> tuple[int, Any, int]:
        return self.unit.layer, self.unit.expert, self.neuron


def _ones_if_none(g: torch.Tensor | None, d: int) -> torch.Tensor:
    return torch.ones(d) if g is None else g


def plant(p: Plant, gen: torch.Generator) -> None:
    """Write neuron ``p.neuron`` so that its read and write are exact opposites in ``p.convention``.

    Folded: pick a centred r (centring then changes nothing), store up = r / g_pre and out = -r / g_post, so the
    folded read is r and the folded write -r whatever the norm kinds. Gated MLPs get gate = up (or -up for ``flip``).
    Raw: up = gate = v and out = -v.
    """
    u = p.unit
    d = u.up.canon.shape[-1]
    v = torch.randn(d, generator=gen)
    if p.convention == "folded":
        r = v - v.mean()
        g_pre = _ones_if_none(None if u.pre is None else u.pre.gain, d)
        g_post = torch.ones(d)
        for norm in u.post:
            g_post = g_post * _ones_if_none(norm.gain, d)
        up, out = r / g_pre, -r / g_post
    else:
        up, out = v, -v
    u.up.write(p.neuron, up)
    u.out.write(p.neuron, out)
    if u.gate is not None:
        u.gate.write(p.neuron, -up if p.flip else up)


@contextmanager
def planted(plants: list[Plant], gen: torch.Generator) -> Iterator[None]:
    """The plants written into the (session-cached) model, and its original rows put back afterwards."""
    slots = [(s, p.neuron) for p in plants for s in (p.unit.up, p.unit.out, p.unit.gate) if s is not None]
    saved = [(s, j, s.canon[s.expert, s.rows[j]].detach().clone()) for s, j in slots]
    try:
        for p in plants:
            plant(p, gen)
        yield
    finally:
        for s, j, row in reversed(saved):
            s.write(j, row)


def folding_is_identity(unit: slowpath.Unit) -> bool:
    norms = [n for n in (unit.pre, *unit.post) if n is not None]
    return all(n.gain is None and not n.centres for n in norms)


def minus_one_in_both(p: Plant) -> bool:
    """Whether the plant is at -1 in the other convention too: only when no norm has a gain, and, for a raw plant,
    reads and writes are centred alike (centring is linear: C(-v) = -C(v))."""
    u = p.unit
    norms = [n for n in (u.pre, *u.post) if n is not None]
    if any(n.gain is not None for n in norms):
        return False
    return p.convention == "folded" or (u.pre is not None and u.pre.centres) == any(n.centres for n in norms)


def choose_plants(units: list[slowpath.Unit]) -> list[Plant]:
    """Folded plants in the last MLP layer: a routed expert other than 0, the non-routed MLP beside it (a shared
    expert), and a flipped-gate twin; a raw plant in the first MLP layer."""
    last = max(u.layer for u in units)
    here = [u for u in units if u.layer == last]
    routed = [u for u in here if isinstance(u.expert, int)]
    plants = [Plant(routed[min(1, len(routed) - 1)] if routed else here[0], 3, "folded")]
    plants += [Plant(u, 4, "folded") for u in here if not isinstance(u.expert, int) and u is not plants[0].unit][:1]
    if plants[0].unit.gate is not None:
        plants.append(Plant(plants[0].unit, 6, "folded", flip=True))
    first = next(u for u in units if u.layer == min(x.layer for x in units))
    plants.append(Plant(first, 5, "raw"))
    return plants


@pytest.mark.parametrize("case", PLANT_CASES)
def test_planted_opposite_neurons_rank_first(families: tiny.Families, tmp_path: Path, case: str) -> None:
    plants = choose_plants(families.units(case))
    with planted(plants, torch.Generator().manual_seed(7)):
        tiny.save(families.model(case), tmp_path)

    for convention in ("folded", "raw"):
        df = mmdetect.scan(str(tmp_path), raw=convention == "raw")  # ranked: rank 1 first
        rows = {(r["layer"], _label(r["expert"]), r["neuron"]): r for r in df.to_dict("records")}
        # Plants at -1 in this convention: its own, and the other convention's where folding changes nothing.
        at_minus_one = {p.key for p in plants if p.convention == convention or minus_one_in_both(p)}
        for p in plants:
            if p.key not in at_minus_one:
                continue
            row = rows[p.key]
            assert row["cos"] == pytest.approx(-1.0, abs=TOL), f"{convention} plant {p.key}"
            assert row["flagged"]
            if p.unit.gate is not None:
                # cos(gate, out) = -1, cos(gate, up) = +1; the flipped twin gets there only by the folded convention's
                # canonicalisation, raw it stays at (+1, -1).
                expected = (1.0, -1.0) if p.flip and convention == "raw" else (-1.0, 1.0)
                assert (row["cos_gate_out"], row["cos_gate_in"]) == pytest.approx(expected, abs=TOL)
            assert row["class"] == "weakening"
        n = len(at_minus_one)
        assert df["rank"].head(n).tolist() == list(range(1, n + 1))
        assert {(r["layer"], _label(r["expert"]), r["neuron"]) for r in df.head(n).to_dict("records")} == at_minus_one
        assert df["cos"].iloc[n] > -1.0 + 1e-3, "only the plants may reach -1"


def test_plants_cover_conv1d_linear_routed_and_shared_experts(families: tiny.Families) -> None:
    """The layouts the planted test must include, checked on what it plants."""
    def kinds(case: str) -> list[tuple[Any, bool]]:
        return [(p.unit.expert, p.flip) for p in choose_plants(families.units(case)) if p.convention == "folded"]

    assert kinds("gpt2") == [(None, False)]                                      # Conv1D
    assert kinds("llama") == [(None, False), (None, True)]                       # Linear, gated
    assert kinds("mixtral") == [(1, False), (1, True)]                           # routed expert 1
    assert kinds("qwen2_moe") == [(1, False), ("shared", False), (1, True)]      # and the shared expert
    assert {"gpt2", "llama", "mixtral", "qwen2_moe", "dbrx", "gpt_oss"} <= set(PLANT_CASES)


# -- real checkpoints ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_shared(n)) for n in REAL_LLAMAS])
@pytest.mark.parametrize("raw", [False, True], ids=["folded", "raw"])
def test_real_llama_checkpoints_fast_path_equals_slow_path(name: str, raw: bool) -> None:
    folder = SHARED_MODELS / name
    units = slowpath.find_units(tiny.load(folder))
    df = mmdetect.scan(str(folder), raw=raw)
    assert_same_cosines(df, units, raw)


# -- scanning in parts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama", "gpt2", "phi3", "glm", "opt", "mixtral", "qwen2_moe", "dbrx", "gpt_oss"])
def test_scanning_in_neuron_parts_gives_the_same_rows(families: tiny.Families, case: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Large MLPs are scanned in parts of neurons (rows of row-major weights, columns of column-major ones, each
    half of a fused gate|up). With a tiny part size every MLP here is split, and every row must come out the same."""
    import mmdetect.scanner

    folder = families.folder(case)
    whole = mmdetect.scan(str(folder))
    monkeypatch.setattr(mmdetect.scanner.read, "PART_BYTES", 4096)
    parts = mmdetect.scan(str(folder))
    with mmdetect.io.checkpoint.open_checkpoint(str(folder)) as ckpt:
        family = mmdetect.registry.resolve.resolve_family(ckpt)
        _, located = mmdetect.registry.resolve.locate_mlps(ckpt, family.mlps_for(ckpt.config))
        jobs = mmdetect.scanner.read.plan_jobs(ckpt, located, None)
    if case not in ("gpt_oss", "dbrx"):  # fused and stacked experts are never split (one expert is small)
        assert any(job.part is not None for job in jobs)
    key = ["layer", "neuron", "cos", "cos_gate_out", "cos_gate_in", "flagged", "class", "norm_in", "norm_out"]
    a = whole.assign(expert=whole["expert"].map(_label))[key + ["expert"]]
    b = parts.assign(expert=parts["expert"].map(_label))[key + ["expert"]]
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["llama", "gpt2", "phi3", "glm", "mixtral", "qwen2_moe", "dbrx", "gpt_oss"])
@pytest.mark.parametrize("part_bytes", [64 << 20, 4096])
def test_input_rows_read_alone_equal_the_blocks_rows(families: tiny.Families, case: str, part_bytes: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer pass reads only the output weight (``load_writes``) and, for the few rows it reports, those rows of
    the input and gate weights (``load_input_rows``: row reads in the plain layout, the whole block otherwise). Both
    must be exactly what the whole block holds, for every layout and for MLPs read in parts."""
    import torch

    from mmdetect.scanner.read import load_block, load_input_rows, load_writes

    monkeypatch.setattr(mmdetect.scanner.read, "PART_BYTES", part_bytes)
    folder = families.folder(case)
    with mmdetect.io.checkpoint.open_checkpoint(str(folder)) as ckpt:
        family = mmdetect.registry.resolve.resolve_family(ckpt)
        _, located = mmdetect.registry.resolve.locate_mlps(ckpt, family.mlps_for(ckpt.config))
        jobs = mmdetect.scanner.read.plan_jobs(ckpt, located, None)
        assert jobs
        for job in jobs:
            block = load_block(ckpt, job)
            n = block.w_in.shape[0]
            rows = sorted({0, n - 1, n // 3, n // 2})[::-1]             # out of order, first and last included
            w_in, w_gate = load_input_rows(ckpt, job, rows)
            idx = torch.tensor(rows)
            assert torch.equal(w_in, block.w_in[idx])
            assert (w_gate is None) == (block.w_gate is None)
            if w_gate is not None:
                assert block.w_gate is not None and torch.equal(w_gate, block.w_gate[idx])
            writes = load_writes(ckpt, job)
            assert torch.equal(writes.w_out, block.w_out)
            for mine, theirs in ((writes.pre_gain, block.pre_gain), (writes.post_gain, block.post_gain)):
                assert (mine is None and theirs is None) or torch.equal(mine, theirs)
            assert load_input_rows(ckpt, job, [])[0].shape == (0, block.w_in.shape[1])
