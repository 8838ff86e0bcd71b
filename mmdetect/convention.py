"""The conventions, in one place: how stored weights become the vectors a neuron (or head, or token) reads and writes.

A convention is data: one :class:`Rule` per role of a row (MLP read, gate and write; attention V and O; token
embedding; unembedding), saying whether the gain of that role's norm is multiplied in and whether the row is centred
over d_model where centring applies, plus whether gated MLPs have their signs canonicalised. ``CONVENTIONS`` names
them; a new convention is one more entry, never a new code path.

Every path (the scan's kernel, explain, ``scan --verify``, heads, chains) asks the functions below which gain and
which centring to apply, and folds rows with :func:`fold` / :func:`fold_into`. Pure torch, no I/O. Shapes: ``n`` rows
(neurons, heads x head_dim, tokens), ``d`` = d_model; rows arrive in the canonical orientation ``[n, d]``.

Where each role's norm and centring condition come from (the norm facts are the registry's ``NormSpec``s):

====================  ===========================  ============================================================
role                  gain                         centred (when the rule centres) if
====================  ===========================  ============================================================
MLP read (W_in/up)    pre-MLP norm                 the pre-MLP norm is a LayerNorm (it centres its input)
MLP gate              pre-MLP norm                 the pre-MLP norm is a LayerNorm
MLP write (W_out)     post-MLP norm (Gemma 2/3)    the MLP's pre- or post-norm is a LayerNorm (every reader
                                                   of the residual then removes the mean)
head read (V rows)    pre-attention norm           the pre-attention norm is a LayerNorm
head write (O rows)   post-attention norm          the model has a LayerNorm anywhere (``layernorm_model``)
token embedding       embedding norm (BLOOM)       the model has a LayerNorm anywhere, or the embedding norm is one
unembedding           final norm                   the final norm is a LayerNorm
====================  ===========================  ============================================================
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from mmdetect.errors import MMDetectError

if TYPE_CHECKING:  # pragma: no cover
    from mmdetect.registry import NormSpec


@dataclass(frozen=True)
class Rule:
    """How rows of one role are folded: ``gain`` multiplies in the gain of the role's norm, ``centre`` subtracts
    the mean over d_model where the role's centring condition holds (see the module docstring)."""

    gain: bool
    centre: bool


@dataclass(frozen=True)
class Convention:
    name: str
    summary: str
    mlp_read: Rule
    mlp_gate: Rule
    mlp_write: Rule
    head_read: Rule
    head_write: Rule
    embed: Rule
    unembed: Rule
    flip_gate_sign: bool  # gated MLPs: flip up_j and out_j together where gate_j . up_j < 0 (cos_gate_in >= 0)


FOLD = Rule(gain=True, centre=True)
KEEP = Rule(gain=False, centre=False)

CONVENTIONS: dict[str, Convention] = {
    "folded": Convention(
        "folded", "norm gains folded in (pre- and post-MLP), LayerNorm centring, gate signs canonicalised",
        mlp_read=FOLD, mlp_gate=FOLD, mlp_write=FOLD, head_read=FOLD, head_write=FOLD, embed=FOLD, unembed=FOLD,
        flip_gate_sign=True),
    "raw": Convention(
        "raw", "the stored weights: no norm gains, no centring, no sign canonicalisation",
        mlp_read=KEEP, mlp_gate=KEEP, mlp_write=KEEP, head_read=KEEP, head_write=KEEP, embed=KEEP, unembed=KEEP,
        flip_gate_sign=False),
}
DEFAULT = "folded"


def get_convention(name: str | Convention) -> Convention:
    """The convention called ``name`` (a Convention passes through); MMDetectError listing the choices otherwise."""
    if isinstance(name, Convention):
        return name
    conv = CONVENTIONS.get(str(name))
    if conv is None:
        raise MMDetectError(f"convention {name!r} is not one of {', '.join(CONVENTIONS)}")
    return conv


# -- what to apply, per role -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """What one role's rows get: times ``gain`` ([d], effective: 1 + w already added for Gemma-style norms) when it is
    not None, then minus their mean over d when ``centre``."""

    gain: torch.Tensor | None = None
    centre: bool = False


@dataclass(frozen=True)
class MLPFold:
    """The folds of one MLP's read (up / W_in), write (W_out) and gate rows, and whether to canonicalise signs."""

    read: Fold
    write: Fold
    gate: Fold
    flip_sign: bool


class HasMLPNorms(Protocol):
    @property
    def pre_norm(self) -> NormSpec | None: ...

    @property
    def post_norm(self) -> NormSpec | None: ...


def centres(norm: NormSpec | None) -> bool:
    """The norm is a LayerNorm, which subtracts its input's mean over d_model."""
    return norm is not None and norm.centres


def layernorm_model(norms: Iterable[NormSpec | None]) -> bool:
    """Any of ``norms`` is a LayerNorm: then every reader of the residual removes its mean, so writes are centred."""
    return any(centres(n) for n in norms)


def _apply(rule: Rule, gain: torch.Tensor | None, centre_here: bool) -> Fold:
    return Fold(gain if rule.gain else None, rule.centre and centre_here)


def mlp_fold(conv: Convention, spec: HasMLPNorms, pre_gain: torch.Tensor | None,
             post_gain: torch.Tensor | None) -> MLPFold:
    """The folds of an MLP (one ``MLPSpec``: its pre_norm and post_norm facts) with gains pre_gain, post_gain [d]."""
    reads_centred = centres(spec.pre_norm)
    return MLPFold(read=_apply(conv.mlp_read, pre_gain, reads_centred),
                   write=_apply(conv.mlp_write, post_gain, layernorm_model((spec.pre_norm, spec.post_norm))),
                   gate=_apply(conv.mlp_gate, pre_gain, reads_centred),
                   flip_sign=conv.flip_gate_sign)


def head_fold(conv: Convention, pre_norm: NormSpec | None, is_layernorm_model: bool, pre_gain: torch.Tensor | None,
              post_gain: torch.Tensor | None) -> tuple[Fold, Fold]:
    """(V fold, O fold) of a layer's attention: V rows read through the pre-attention norm (gain pre_gain [d]); O rows
    write through the post-attention norm (gain post_gain [d], Gemma 2/3) and are centred in LayerNorm models."""
    return (_apply(conv.head_read, pre_gain, centres(pre_norm)),
            _apply(conv.head_write, post_gain, is_layernorm_model))


def embedding_fold(conv: Convention, embed_norm: NormSpec | None, is_layernorm_model: bool,
                   gain: torch.Tensor | None) -> Fold:
    """The token embedding's rows (what each token writes): an embedding norm's gain, centred in LayerNorm models."""
    return _apply(conv.embed, gain, is_layernorm_model or centres(embed_norm))


def unembedding_fold(conv: Convention, final_norm: NormSpec | None, gain: torch.Tensor | None) -> Fold:
    """The unembedding's rows (the residual direction raising each token's logit): the final norm's gain, centred
    when the final norm is a LayerNorm."""
    return _apply(conv.unembed, gain, centres(final_norm))


# -- applying a fold ---------------------------------------------------------------------------------------------------

TILE = 64  # columns of d per transposing copy: a [m, 64] tile of a column-major chunk stays in L1/L2


def fold_into(out: torch.Tensor, w: torch.Tensor, f: Fold) -> None:
    """out[m, d] (float32, may be a view into a work buffer) <- fold(w[m, d]) without intermediate copies.

    A row-major chunk converts and scales in one pass. A column-major chunk (an ``out`` weight stored [d, n], seen
    through a transposed view) is converted and transposed in [m, TILE] tiles, which keeps both sides of the copy in
    cache: about 3x faster than one strided copy of the whole chunk. ``f.gain`` must be float32 on out's device.
    """
    if w.stride(-1) != 1 and w.stride(0) == 1 and w.device == out.device:
        for k0 in range(0, w.shape[1], TILE):
            out[:, k0:k0 + TILE].copy_(w[:, k0:k0 + TILE])
        if f.gain is not None:
            out.mul_(f.gain)
    elif f.gain is not None:
        torch.mul(w.to(out.device), f.gain, out=out)
    else:
        out.copy_(w)
    if f.centre:
        out.sub_(out.mean(dim=1, keepdim=True))


def fold(w: torch.Tensor, f: Fold) -> torch.Tensor:
    """[n, d] (any float dtype, any strides) -> [n, d] float32: times the gain, then centred over d if ``f.centre``.

    The same arithmetic as ``fold_into``, on a new tensor that keeps w's strides (a transposed view stays one), so
    the mean is reduced in the same order whichever path made it.
    """
    out = w.float()
    if f.gain is not None:
        out = out * f.gain.to(out.device, torch.float32)
    if f.centre:
        out = out - out.mean(dim=1, keepdim=True)
    return out


def canonical_sign(gate_up: torch.Tensor) -> torch.Tensor:
    """[n] -> [n] of +1 / -1 from gate_j . up_j (or any quantity of the same sign, such as cos(gate_j, up_j)).

    Flipping up_j and out_j together leaves a gated MLP unchanged; the canonical sign makes gate_j . up_j >= 0.
    NaN (a dead neuron) keeps +1.
    """
    return torch.where(gate_up < 0, -1.0, 1.0)


@dataclass
class FoldedMLP:
    """One MLP's rows in a convention, float32 [n, d]: read r_j, write o_j and gate g_j. r_j and o_j are already
    multiplied by ``sign`` [n] (the canonical flip of up and out together; all +1 when the convention does not flip
    or the MLP is not gated); the gate is never flipped, so g_j . r_j >= 0 after a flip."""

    read: torch.Tensor
    write: torch.Tensor
    gate: torch.Tensor | None
    sign: torch.Tensor


def fold_mlp(f: MLPFold, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None) -> FoldedMLP:
    """w_in, w_out, w_gate [n, d] (canonical orientation) -> the MLP's folded, sign-canonicalised rows."""
    r, o = fold(w_in, f.read), fold(w_out, f.write)
    g = None if w_gate is None else fold(w_gate, f.gate)
    sign = torch.ones(r.shape[0], device=r.device)
    if g is not None and f.flip_sign:
        sign = canonical_sign((g * r).sum(dim=1))
        r, o = r * sign[:, None], o * sign[:, None]
    return FoldedMLP(r, o, g, sign)


def actual_write(w_out: torch.Tensor, post_gain: torch.Tensor | None) -> torch.Tensor:
    """[n, d] -> [n, d] float32: what each neuron adds to the residual per unit of activation, in every convention
    (the stored write times the post-MLP norm's gain; the norm's 1/rms, a positive scalar per token, is left out)."""
    return fold(w_out, Fold(post_gain, False))
