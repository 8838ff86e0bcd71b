"""The maths of mmdetect.neurons on hand-made tensors: known answers, conventions, baselines and classes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmdetect.convention import MLPFold, get_convention, mlp_fold
from mmdetect.registry import MLPSpec, NormSpec, TensorSpec
from mmdetect.scanner.neurons import mlp_cosines
from mmdetect.scanner.stats import GATED_CLASSES, PLAIN_CLASSES, classify, null_band, null_p, null_z


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def np_cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = a.double().numpy(), b.double().numpy()
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def conv_fold(convention: str = "folded", pre_gain: torch.Tensor | None = None,
              post_gain: torch.Tensor | None = None, layernorm: bool = False) -> MLPFold:
    """The fold the scan would use for an MLP behind an RMSNorm (or a LayerNorm) with these gains, plus a post-MLP
    norm when ``post_gain`` is given."""
    kind = "layernorm" if layernorm else "rms"
    spec = MLPSpec("mlp", TensorSpec("m.{i}.out", 1), pre_norm=NormSpec("m.{i}.pre", kind),
                   post_norm=None if post_gain is None else NormSpec("m.{i}.post", kind))
    return mlp_fold(get_convention(convention), spec, pre_gain, post_gain)


# -- planted answers under both storage orientations ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_planted_neuron_is_minus_one_under_linear_orientation(dtype: torch.dtype) -> None:
    # nn.Linear storage: up is [I, d] (neuron = row), down is [d, I] (neuron = column).
    up = randn(48, 32).to(dtype)
    down = randn(32, 48, seed=1).to(dtype)
    down[:, 5] = -up[5]
    stats = mlp_cosines(up, down.T)  # down.T is a strided view, as the scanner passes it
    assert stats.cos[5].item() == pytest.approx(-1.0, abs=1e-6)
    others = np.delete(stats.cos.numpy(), 5)
    assert np.abs(others).max() < 0.9
    np.testing.assert_allclose(stats.cos.numpy(), np_cos(up.float(), down.T.float()), atol=1e-6)


def test_planted_neuron_is_minus_one_under_conv1d_orientation() -> None:
    # GPT-2 Conv1D storage: c_fc is [d, I] (neuron = column), c_proj is [I, d] (neuron = row).
    c_fc = randn(32, 48)
    c_proj = randn(48, 32, seed=1)
    c_proj[11] = -c_fc[:, 11]
    stats = mlp_cosines(c_fc.T, c_proj)
    assert stats.cos[11].item() == pytest.approx(-1.0, abs=1e-6)
    assert int(torch.argmin(stats.cos)) == 11
    np.testing.assert_allclose(stats.cos.numpy(), np_cos(c_fc.T, c_proj), atol=1e-6)


def test_chunking_does_not_change_results() -> None:
    w_in, w_out, w_gate = randn(70, 16), randn(70, 16, seed=1), randn(70, 16, seed=2)
    g = torch.rand(16, generator=torch.Generator().manual_seed(3)) + 0.5
    whole = mlp_cosines(w_in, w_out, w_gate, conv_fold(pre_gain=g), chunk=1000)
    slabs = mlp_cosines(w_in, w_out, w_gate, conv_fold(pre_gain=g), chunk=7)
    for field in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out", "norm_gate"):
        torch.testing.assert_close(getattr(slabs, field), getattr(whole, field), rtol=0, atol=1e-6)


def test_norms_are_row_norms_of_folded_vectors() -> None:
    w_in, w_out = randn(10, 16), randn(10, 16, seed=1)
    g = torch.full((16,), 2.0)
    stats = mlp_cosines(w_in, w_out, fold=conv_fold(pre_gain=g))
    torch.testing.assert_close(stats.norm_in, 2.0 * w_in.norm(dim=1))
    torch.testing.assert_close(stats.norm_out, w_out.norm(dim=1))
    assert torch.isnan(stats.norm_gate).all() and torch.isnan(stats.cos_gate_in).all()


# -- folding ----------------------------------------------------------------------------------------------------

def test_gain_folding_turns_an_orthogonal_neuron_into_minus_one() -> None:
    w_in = torch.tensor([[1.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    gain = torch.tensor([1.0, -1.0, 1.0, -1.0, 3.0, 3.0, 3.0, 3.0])
    w_out = -(gain * w_in)  # [-1, 1, -2, 2, 0...]: orthogonal to w_in itself
    folded = mlp_cosines(w_in, w_out, fold=conv_fold(pre_gain=gain))
    raw = mlp_cosines(w_in, w_out, fold=conv_fold("raw", pre_gain=gain))
    assert folded.cos.item() == pytest.approx(-1.0, abs=1e-6)
    assert raw.cos.item() == pytest.approx(0.0, abs=1e-6)


def test_post_gain_folds_into_write_vectors() -> None:
    w_in = randn(4, 8)
    g_post = torch.tensor([0.5, 2.0, 4.0, 1.0, 0.25, 8.0, 1.0, 2.0])
    w_out = -w_in / g_post  # the block writes g_post * w_out = -w_in
    stats = mlp_cosines(w_in, w_out, fold=conv_fold(post_gain=g_post))
    np.testing.assert_allclose(stats.cos.numpy(), -1.0, atol=1e-6)
    assert (mlp_cosines(w_in, w_out, fold=conv_fold("raw", post_gain=g_post)).cos > -0.999).all()


def test_one_plus_w_offset() -> None:
    assert NormSpec("w", "rms1p").offset == 1.0
    assert NormSpec("w", "layernorm1p").offset == 1.0
    assert NormSpec("w", "rms").offset == 0.0
    assert NormSpec("w", "layernorm").offset == 0.0
    # A Gemma-style stored gain w near 0: the effective gain is 1 + w. Folding 1 + w gives -1; folding w would not.
    w_stored = torch.tensor([-0.5, 0.0, 1.0, 3.0, -0.75, 0.5, 0.0, 1.0])
    w_in = randn(3, 8)
    w_out = -((1.0 + w_stored) * w_in)
    right = mlp_cosines(w_in, w_out, fold=conv_fold(pre_gain=1.0 + w_stored))
    wrong = mlp_cosines(w_in, w_out, fold=conv_fold(pre_gain=w_stored))
    np.testing.assert_allclose(right.cos.numpy(), -1.0, atol=1e-6)
    assert (wrong.cos > -0.99).all()


def test_layernorm_centring_removes_a_mean_only_difference() -> None:
    assert NormSpec("w", "layernorm").centres and NormSpec("w", "layernorm1p").centres
    assert not NormSpec("w", "rms").centres and not NormSpec("w", "rms1p").centres
    w_in = randn(5, 16)
    w_out = -w_in + 3.0  # differs from -w_in only by a constant along the all-ones direction
    centred = mlp_cosines(w_in, w_out, fold=conv_fold(layernorm=True))
    plain = mlp_cosines(w_in, w_out, fold=conv_fold())
    np.testing.assert_allclose(centred.cos.numpy(), -1.0, atol=1e-6)
    assert (plain.cos > -0.5).all()
    assert (mlp_cosines(w_in, w_out, fold=conv_fold("raw", layernorm=True)).cos > -0.5).all()


def test_centring_is_applied_after_the_gain() -> None:
    # C(g * w): a read vector that is constant after the gain is all mean, so it vanishes (NaN cos).
    gain = torch.tensor([1.0, 2.0, 4.0, 0.5])
    w_in = (1.0 / gain).reshape(1, 4)
    stats = mlp_cosines(w_in, randn(1, 4), fold=conv_fold(pre_gain=gain, layernorm=True))
    assert stats.norm_in.item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(stats.cos.item())


# -- gate sign canonicalisation -----------------------------------------------------------------------------------

def test_gate_sign_flip_canonicalises_gate_in_and_flips_gate_out() -> None:
    n, d = 200, 24
    w_in, w_out, w_gate = randn(n, d), randn(n, d, seed=1), randn(n, d, seed=2)
    w_gate[:100] = w_gate[:100] + 2 * w_in[:100]     # strongly aligned with up
    w_gate[100:] = w_gate[100:] - 2 * w_in[100:]     # strongly anti-aligned with up: will be flipped
    folded = mlp_cosines(w_in, w_out, w_gate, conv_fold())
    raw = mlp_cosines(w_in, w_out, w_gate, conv_fold("raw"))
    raw_gate_in = np_cos(w_gate, w_in)
    assert (raw_gate_in[100:] < 0).all() and (raw_gate_in[:100] > 0).all()
    assert (folded.cos_gate_in >= 0).all()
    np.testing.assert_allclose(folded.cos_gate_in.numpy(), np.abs(raw_gate_in), atol=1e-6)
    # cos(up, out) is invariant under the joint flip of up and out; cos(gate, out) changes sign with it.
    np.testing.assert_allclose(folded.cos.numpy(), raw.cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(folded.cos_gate_out.numpy()[:100], raw.cos_gate_out.numpy()[:100], atol=1e-6)
    np.testing.assert_allclose(folded.cos_gate_out.numpy()[100:], -raw.cos_gate_out.numpy()[100:], atol=1e-6)


def test_raw_convention_does_not_flip() -> None:
    w_in, w_out, w_gate = randn(50, 16), randn(50, 16, seed=1), randn(50, 16, seed=2)
    raw = mlp_cosines(w_in, w_out, w_gate, conv_fold("raw"))
    np.testing.assert_allclose(raw.cos_gate_in.numpy(), np_cos(w_gate, w_in), atol=1e-6)
    np.testing.assert_allclose(raw.cos_gate_out.numpy(), np_cos(w_gate, w_out), atol=1e-6)
    assert (raw.cos_gate_in < 0).any()


def test_gate_is_folded_with_the_pre_gain() -> None:
    w_in, w_out, w_gate = randn(20, 8), randn(20, 8, seed=1), randn(20, 8, seed=2)
    g = torch.tensor([0.25, 4.0, 1.0, 2.0, 0.5, 8.0, 1.0, 0.125])
    stats = mlp_cosines(w_in, w_out, w_gate, conv_fold(pre_gain=g))
    gate_in = np_cos(w_gate * g, w_in * g)
    sign = np.where(gate_in < 0, -1, 1)
    np.testing.assert_allclose(stats.cos_gate_in.numpy(), gate_in * sign, atol=1e-6)
    np.testing.assert_allclose(stats.cos_gate_out.numpy(), np_cos(w_gate * g, w_out) * sign, atol=1e-6)


# -- dead neurons -----------------------------------------------------------------------------------------------

def test_nan_and_zero_rows_give_nan_cos_and_no_class() -> None:
    w_in, w_out, w_gate = randn(6, 8), randn(6, 8, seed=1), randn(6, 8, seed=2)
    w_in[1] = float("nan")
    w_out[2] = 0.0
    w_in[3] = 0.0
    w_out[4, 0] = float("inf")
    w_gate[5] = 0.0
    stats = mlp_cosines(w_in, w_out, w_gate, conv_fold())
    cos = stats.cos.numpy()
    assert np.isnan(cos[1:5]).all()
    assert np.isfinite(cos[[0, 5]]).all()
    assert np.isnan(stats.cos_gate_in.numpy()[[1, 3, 5]]).all()
    assert np.isnan(stats.cos_gate_out.numpy()[[2, 4, 5]]).all()
    classes = classify(cos, stats.cos_gate_out.numpy(), stats.cos_gate_in.numpy())
    assert list(classes[1:5]) == ["", "", "", ""]
    assert classes[0] != ""
    with np.errstate(invalid="ignore"):
        assert not (cos <= 1.0)[1:5].any()  # a NaN cos compares false against any threshold


def test_all_zero_matrix_does_not_raise() -> None:
    stats = mlp_cosines(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(4, 8))
    assert torch.isnan(stats.cos).all() and torch.isnan(stats.cos_gate_out).all()
    assert (stats.norm_in == 0).all()


# -- random baseline --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d, half_width", [(768, 0.0707), (2048, 0.0433), (4096, 0.0306)])
def test_null_band_matches_published_values(d: int, half_width: float) -> None:
    lo, hi = null_band(d)
    assert hi == pytest.approx(half_width, abs=1e-3)
    assert lo == pytest.approx(-hi, abs=1e-12)


def test_null_band_small_d_is_wide() -> None:
    lo, hi = null_band(64)
    assert hi == pytest.approx(0.24, abs=0.01)
    assert null_band(64, level=0.99)[1] > hi


def test_null_band_is_two_sided_5_percent() -> None:
    for d in (64, 768, 4096):
        lo, hi = null_band(d)
        assert null_p(np.array([lo]), d)[0] == pytest.approx(0.025, abs=1e-9)
        assert null_p(np.array([hi]), d)[0] == pytest.approx(0.975, abs=1e-9)


def test_null_p_is_monotone_and_half_at_zero() -> None:
    grid = np.linspace(-1.0, 1.0, 401)
    for d in (64, 768, 4096):
        p = null_p(grid, d)
        assert (np.diff(p) >= 0).all()
        assert null_p(np.array([0.0]), d)[0] == pytest.approx(0.5, abs=1e-12)
        assert p[0] == 0.0 and p[-1] == 1.0
    assert null_p(np.array([-0.1]), 4096)[0] < null_p(np.array([-0.1]), 64)[0]


def test_null_p_and_z_propagate_nan() -> None:
    assert np.isnan(null_p(np.array([np.nan]), 64)[0])
    assert np.isnan(null_z(np.array([np.nan]), 64)[0])


def test_null_z_is_cos_in_units_of_one_over_sqrt_d() -> None:
    np.testing.assert_allclose(null_z(np.array([-0.5, 0.0, 0.25]), 64), [-4.0, 0.0, 2.0])


# -- Gerstner & Schuetze's classes --------------------------------------------------------------------------------

GATED_ROWS = [
    # (cos = linout, gateout, gatelin) -> class, one row per line of the research README's table
    ((0.9, 0.9, 0.9), "strengthening"),
    ((0.9, -0.9, 0.0), "atypical strengthening"),
    ((0.9, 0.0, 0.0), "conditional strengthening"),
    ((0.9, 0.0, 0.9), "atypical conditional strengthening"),
    ((0.0, 0.9, 0.0), "proportional change"),
    ((0.0, -0.9, 0.9), "atypical proportional change"),
    ((0.0, 0.0, 0.9), "orthogonal output"),
    ((-0.9, -0.9, 0.9), "weakening"),
    ((-0.9, 0.9, 0.9), "atypical weakening"),
    ((-0.9, 0.0, 0.0), "conditional weakening"),
    ((-0.9, 0.0, 0.9), "atypical conditional weakening"),
]


@pytest.mark.parametrize("triple, name", GATED_ROWS)
def test_gated_class_for_each_table_row(triple: tuple[float, float, float], name: str) -> None:
    cos, gate_out, gate_in = (np.array([v]) for v in triple)
    assert classify(cos, gate_out, gate_in)[0] == name


def test_gated_table_is_complete() -> None:
    assert sorted(GATED_CLASSES.values()) == sorted(name for _, name in GATED_ROWS)
    assert len(GATED_CLASSES) == 11


def test_typical_uses_the_sign_of_gate_out() -> None:
    # (-1, 1, typical): a(gatelin) must equal a(linout) * a(gateout). Uncanonicalised gatelin = -1 with gateout = +1
    # is the same neuron as the canonical weakening one with both up and out flipped.
    assert classify(np.array([-0.9]), np.array([0.9]), np.array([-0.9]))[0] == "weakening"
    assert classify(np.array([0.9]), np.array([-0.9]), np.array([-0.9]))[0] == "strengthening"


def test_orthogonal_output_regardless_of_gate_in() -> None:
    names = classify(np.zeros(3), np.zeros(3), np.array([-0.9, 0.0, 0.9]))
    assert list(names) == ["orthogonal output"] * 3


def test_plain_classes_and_thresholds() -> None:
    cos = np.array([0.9, 0.0, -0.9, -0.5, -0.5001, 0.5, 0.5001, np.nan])
    assert list(classify(cos)) == ["strengthening", "orthogonal output", "weakening", "orthogonal output",
                                   "weakening", "orthogonal output", "strengthening", ""]
    assert set(PLAIN_CLASSES.values()) == {"strengthening", "orthogonal output", "weakening"}


def test_gated_nan_cos_has_no_class() -> None:
    assert classify(np.array([np.nan]), np.array([0.9]), np.array([0.9]))[0] == ""


@pytest.mark.parametrize("d", [3, 16, 64, 768, 2048, 5120, 16384, 1_000_000])
def test_null_p_matches_scipy_betainc(d: int) -> None:
    """The tabulated null CDF equals the regularized incomplete beta function to 1e-5 relative, tails included."""
    from scipy.special import betainc, betaincinv

    a = (d - 1) / 2
    x = np.concatenate([np.linspace(-1, 0, 2001), np.linspace(-8 / np.sqrt(d), 0, 2001)])
    ref = betainc(a, a, (x + 1) / 2)
    got = null_p(x, d)
    keep = ref > 1e-280
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-5)
    wide = ref > 1e-6  # below that, 1 - P(X <= -x) is lost to rounding in float64 anyway
    np.testing.assert_allclose(1 - null_p(-x[wide], d), ref[wide], rtol=1e-5)  # the upper half mirrors the lower
    assert null_band(d)[0] == pytest.approx(2 * betaincinv(a, a, 0.025) - 1, abs=1e-8)
