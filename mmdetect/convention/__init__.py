"""The conventions, in one place: how stored weights become the vectors a neuron (or head, or token) reads and writes.

A convention is data: one :class:`Rule` per role of a row (MLP read, gate and write; attention V and O; token
embedding; unembedding), saying whether the gain of that role's norm is multiplied in and whether the row is centred
over d_model where centring applies, plus whether gated MLPs have their signs canonicalised and what an exact tie
does. ``CONVENTIONS`` names them; a new convention is one more entry, never a new code path. A convention that
follows a tool (``transformerlens``) also names the registry section where that tool's per-model-type exceptions are
written (a family file's ``transformerlens:``); :func:`for_model` applies them, so model types stay out of the code.

The three conventions, against each other (``docs/conventions.md`` has the measured differences):

* ``folded``: every norm gain folded in (pre- and post-MLP, pre- and post-attention, embedding norm, final norm),
  LayerNorm centring of reads (gate included) and writes, gate signs canonicalised (a tie keeps +1);
* ``raw``: the stored rows;
* ``transformerlens``: TransformerLens 4.3 ``fold_ln`` + ``center_writing_weights`` + ``center_unembed`` and
  Gerstner & Schütze's ``refactor_glu`` flip. As folded, except: the gate is never centred; no post-norm gain
  (Gemma 2/3, OLMo 2, GLM-4 ``post_*_layernorm``) and no embedding-norm gain is folded in; the unembedding also has
  its mean over the vocabulary removed (not under a logit softcap), and is not centred over d_model through a
  parameter-free final LayerNorm; the flip is ``torch.sign`` (an exact tie zeroes the neuron); and where the
  registry says TransformerLens's adapter folds no norm (``fold_ln: false``) or centres no write
  (``center_writing_weights: false``), neither is done (``logit_scale``: Cohere's scale folded into the
  unembedding).

Every path (the scan's kernel, explain, ``scan --verify``, heads, chains) asks the functions below which gain and
which centring to apply (a :class:`Fold` per role), and applies it with the one kernel in ``convention.kernel``
(``fold_into``; ``fold`` is it on a new tensor). This module is data and decisions only: it imports neither torch nor
anything else heavy, so the command line reads its names and default at start-up. Shapes: ``n`` rows (neurons,
heads x head_dim, tokens), ``d`` = d_model; rows arrive in the canonical orientation ``[n, d]``.

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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from mmdetect.errors import MMDetectError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mmdetect.registry import NormSpec


@dataclass(frozen=True)
class Rule:
    """How rows of one role are folded: ``gain`` multiplies in the gain of the role's norm, ``centre`` subtracts
    the mean over d_model where the role's centring condition holds (see the module docstring)."""

    gain: bool
    centre: bool
    centre_vocab: bool = False  # unembedding only: also subtract the mean row over the vocabulary (center_unembed)
    centre_weightless: bool = True  # centre through a LayerNorm without a gain too (TransformerLens folds, and so
    #                                 centres through, only a final norm that has a weight: OLMo-1's has none)


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
    zero_ties: bool = False  # with the flip: an exact tie gate_j . up_j = 0 gives sign 0 (torch.sign), which zeroes
    #                          up_j and out_j, so the neuron's three cosines are NaN; otherwise a tie keeps +1
    processing: str | None = None  # the tool whose per-model-type exceptions apply (a ``Resolved.processing`` key)
    softcap_keys: tuple[str, ...] = ()  # config keys of a final logit softcap: where one is > 0 the unembedding gets
    #                                     no vocabulary centring (tanh capping is not shift-invariant)
    unembed_scale: float = 1.0  # a constant the unembedding is multiplied by (set per model by ``for_model``)


FOLD = Rule(gain=True, centre=True)
KEEP = Rule(gain=False, centre=False)
CENTRE = Rule(gain=False, centre=True)

CONVENTIONS: dict[str, Convention] = {
    "folded": Convention(
        "folded", "norm gains folded in (pre- and post-MLP), LayerNorm centring, gate signs canonicalised",
        mlp_read=FOLD, mlp_gate=FOLD, mlp_write=FOLD, head_read=FOLD, head_write=FOLD, embed=FOLD, unembed=FOLD,
        flip_gate_sign=True),
    "raw": Convention(
        "raw", "the stored weights: no norm gains, no centring, no sign canonicalisation",
        mlp_read=KEEP, mlp_gate=KEEP, mlp_write=KEEP, head_read=KEEP, head_write=KEEP, embed=KEEP, unembed=KEEP,
        flip_gate_sign=False),
    "transformerlens": Convention(
        "transformerlens", "TransformerLens's default processing (fold_ln, center_writing_weights, center_unembed) "
        "with Gerstner & Schütze's gate sign flip: the route of their published numbers",
        mlp_read=FOLD, mlp_gate=Rule(gain=True, centre=False), mlp_write=CENTRE, head_read=FOLD, head_write=CENTRE,
        embed=CENTRE, unembed=Rule(gain=True, centre=True, centre_vocab=True, centre_weightless=False),
        flip_gate_sign=True, zero_ties=True, processing="transformerlens",
        softcap_keys=("final_logit_softcapping", "logits_soft_cap")),
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


class Limits(Protocol):
    """What a tool's adapter lets its processing do for one model type (``registry.Processing``)."""

    @property
    def fold_ln(self) -> bool: ...

    @property
    def center_writing_weights(self) -> bool: ...

    @property
    def logit_scale(self) -> float | None: ...


class HasProcessing(Protocol):
    @property
    def processing(self) -> Mapping[str, Limits]: ...


def for_model(conv: Convention, resolved: HasProcessing | None, config: Mapping[str, Any] | None = None) -> Convention:
    """``conv`` for one checkpoint (``resolved``: its registry entry, variants applied, None when it has none;
    ``config``: its config.json).

    A convention that follows a tool drops what that tool's adapter does not do for this model type: without
    ``fold_ln`` no norm gain is folded into any reader (MLP read and gate, V rows, unembedding) and no read is centred
    over d_model; without ``center_writing_weights`` no write (MLP out, O rows, embedding) is centred. The unembedding's
    vocabulary centring is a separate step of the tool: it stays, except where the config sets a logit softcap
    (``conv.softcap_keys``). Where the adapter folds the logit scale (Cohere), the unembedding is multiplied by
    config.json's ``logit_scale``. Other conventions pass through unchanged.
    """
    config = config or {}
    if conv.unembed.centre_vocab and any(isinstance(config.get(k), (int, float)) and config[k] > 0
                                         for k in conv.softcap_keys):
        conv = replace(conv, unembed=replace(conv.unembed, centre_vocab=False))
    if conv.processing is None or resolved is None or conv.processing not in resolved.processing:
        return conv
    limits = resolved.processing[conv.processing]
    if not limits.fold_ln:
        conv = replace(conv, mlp_read=KEEP, mlp_gate=KEEP, head_read=KEEP,
                       unembed=replace(conv.unembed, gain=False, centre=False))
    if not limits.center_writing_weights:
        conv = replace(conv, mlp_write=replace(conv.mlp_write, centre=False),
                       head_write=replace(conv.head_write, centre=False), embed=replace(conv.embed, centre=False))
    if limits.logit_scale is not None:
        scale = config.get("logit_scale")
        conv = replace(conv, unembed_scale=float(scale if isinstance(scale, (int, float)) else limits.logit_scale))
    return conv


# -- what to apply, per role -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """What one role's rows get: times ``gain`` ([d], effective: 1 + w already added for Gemma-style norms) when it is
    not None, then minus their mean over d when ``centre``, then (``centre_rows``, the unembedding under
    ``center_unembed``) minus the mean row over ALL rows: a caller folding rows in chunks subtracts that mean itself
    (``Circuit.unembedding_rows``); :func:`fold` takes the rows it is given as all of them."""

    gain: torch.Tensor | None = None
    centre: bool = False
    centre_rows: bool = False
    scale: float = 1.0  # a constant factor (the unembedding's logit scale), applied with the gain


@dataclass(frozen=True)
class MLPFold:
    """The folds of one MLP's read (up / W_in), write (W_out) and gate rows, and whether to canonicalise signs."""

    read: Fold
    write: Fold
    gate: Fold
    flip_sign: bool
    zero_ties: bool = False  # see Convention.zero_ties


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
                   flip_sign=conv.flip_gate_sign, zero_ties=conv.zero_ties)


def feature_fold(conv: Convention, spec: HasMLPNorms, pre_gain: torch.Tensor | None, post_gain: torch.Tensor | None,
                 *, reads_normed: bool, writes_before_post_norm: bool, centres_input: bool = False) -> MLPFold:
    """The folds of a transcoder that stands in for the MLP ``spec``: its encoder columns are read rows and its
    decoder rows write rows, folded as that MLP's neurons' rows are (``mlp_fold``), as far as the transcoder's hooks
    see the MLP's norms.

    ``reads_normed``: the encoder reads the pre-MLP norm's output (``blocks.L.ln2.hook_normalized``), so its columns
    get that norm's gain and centring as a neuron's read row does; otherwise it reads the residual stream itself
    (``hook_resid_mid``) and nothing is folded. ``writes_before_post_norm``: the decoder writes the MLP's own output,
    before a post-MLP norm (``blocks.L.mlp.hook_out``), so its rows get that norm's gain; otherwise (``hook_mlp_out``,
    which TransformerLens places after the post-norm) only the write's centring applies. ``centres_input``: the
    transcoder normalises its input with a LayerNorm of its own (SAELens ``normalize_activations: layer_norm``),
    which centres the read wherever the convention centres reads. No gate, so no sign flip.
    """
    f = mlp_fold(conv, spec, pre_gain, post_gain if writes_before_post_norm else None)
    read = f.read if reads_normed else Fold()
    if centres_input and conv.mlp_read.centre:
        read = replace(read, centre=True)
    return MLPFold(read=read, write=f.write, gate=Fold(), flip_sign=False)


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
    when the final norm is a LayerNorm, and minus the mean row over the vocabulary where the rule says so."""
    rule = conv.unembed
    centre_here = centres(final_norm) and (rule.centre_weightless or bool(final_norm and final_norm.weights))
    return replace(_apply(rule, gain, centre_here), centre_rows=rule.centre_vocab, scale=conv.unembed_scale)
