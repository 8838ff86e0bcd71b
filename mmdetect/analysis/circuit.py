"""Every component that reads or writes the residual stream, read from disk in one convention.

A :class:`Circuit` wraps an open checkpoint with its two registry entries: the MLP layout (``architectures/*.yaml``,
through ``scanner``) and the attention layout (``architectures/attention.yaml``). It hands out, one layer at a time:

* MLP neurons: read vectors r_j, write vectors o_j and gate vectors g_j, ``[n, d]``, folded exactly as ``scan``
  folds them;
* attention heads: ``V`` ``[H, d_head, d]`` (row e of head h is what head dimension e reads) and ``O``
  ``[H, d_head, d]`` (row e is what head dimension e writes), with GQA/MQA key-value heads already expanded to the
  query heads that use them;
* the token embedding (rows are what each token writes) and the unembedding (rows are the residual direction that
  raises each token's logit), in row chunks so a 150k vocabulary never sits in memory.

Which gains and centring each of these gets is ``mmdetect.convention``'s decision (``mlp_fold``, ``head_fold``,
``embedding_fold``, ``unembedding_fold``); this module only reads the tensors and the norm gains. Nothing here builds
the model; tensors are read one at a time as in ``scan``.
"""
from __future__ import annotations

import re
from collections.abc import Container, Iterator
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from mmdetect.convention import (
    DEFAULT,
    Convention,
    Fold,
    MLPFold,
    Rule,
    embedding_fold,
    for_model,
    get_convention,
    head_fold,
    layernorm_model,
    mlp_fold,
    unembedding_fold,
)
from mmdetect.convention.kernel import actual_write, canonical_sign, fold, fold_mlp
from mmdetect.errors import MMDetectError
from mmdetect.io.checkpoint import Checkpoint, open_checkpoint
from mmdetect.registry import AttentionLayout, MLPSpec, NormSpec, Proj, tensor_key
from mmdetect.registry.resolve import resolve_layout
from mmdetect.scanner.read import Block, Job, Writes, load_input_rows, read_gain

ROW_CHUNK = 8192  # embedding / unembedding rows per slab


@dataclass
class Heads:
    """One layer's attention heads, folded. H query heads, head size dh, d = d_model.

    v: [H, dh, d] read rows (key/value heads repeated for GQA); o: [H, dh, d] write rows; kv: [H] kv-head index.
    """

    layer: int
    v: torch.Tensor
    o: torch.Tensor
    kv: list[int]

    @property
    def n_heads(self) -> int:
        return int(self.v.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.v.shape[1])


@dataclass
class Neurons:
    """One MLP (or one expert) of one layer in the circuit's convention: r, o and g (None for non-gated MLPs) are
    [n, d] float32, folded by ``convention.fold_mlp`` as ``scan`` folds them (signs canonicalised where the convention
    flips). w_write is the stored write [n, d] times the post-norm gain (``convention.actual_write``): what the
    neuron adds to the residual per unit of activation, up to the post-norm's 1/rms.
    """

    layer: int
    spec: MLPSpec
    expert: int | None
    expert_label: object
    r: torch.Tensor
    o: torch.Tensor
    g: torch.Tensor | None
    w_write: torch.Tensor
    sign: torch.Tensor   # [n] +1 or -1: the canonical flip applied to r and o (activations flip with it)


class Circuit:
    """An open checkpoint with its MLP and attention layouts. Use as a context manager (it closes the checkpoint)."""

    def __init__(self, ckpt: Checkpoint, *, convention: str | Convention = DEFAULT, need_mlps: bool = True) -> None:
        self.ckpt = ckpt
        layout = resolve_layout(ckpt, need_mlps=need_mlps)
        self.family = layout.family
        self.specs: tuple[MLPSpec, ...] = layout.mlps
        self.located: dict = layout.located
        # a convention that follows a tool gets the registry's exceptions for this model type
        self.convention = get_convention(convention)
        if layout.resolved is not None:
            self.convention = for_model(self.convention, layout.resolved, ckpt.config)
        self.attention, self.attention_gap = layout.attention, layout.attention_gap

    # -- layouts ---------------------------------------------------------------------------------------------------

    def layers_hint(self) -> int:
        return min(self.located) if self.located else 0

    def require_attention(self) -> AttentionLayout:
        if self.attention is None:
            raise MMDetectError(self.attention_gap or "no attention layout")
        return self.attention

    @property
    def d_model(self) -> int:
        if self.attention is not None and self.attention.embed and self.attention.embed in self.ckpt:
            return int(self.ckpt.tensors[self.attention.embed].shape[-1])
        from mmdetect.registry.heuristic import hidden_size

        d = hidden_size(self.ckpt.config)
        if d is None:
            raise MMDetectError(f"cannot tell d_model of {self.ckpt.ref}: config.json has no hidden_size")
        return d

    @property
    def layernorm_model(self) -> bool:
        """A LayerNorm anywhere in front of a reader (an MLP's norms, the attention's, the final norm)."""
        lay = self.attention
        norms = [n for s in self.specs for n in (s.pre_norm, s.post_norm)]
        if lay is not None:
            norms += [lay.pre_norm, lay.post_norm, lay.final_norm]
        return layernorm_model(norms)

    @cached_property
    def attention_layers(self) -> list[int]:
        if self.attention is None:
            return []
        head, tail = self.attention.o.key.split("{i}", 1)
        rx = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + "$")
        return sorted({int(m.group(1)) for k in self.ckpt.tensors if (m := rx.match(k))})

    @property
    def n_layers(self) -> int:
        return max([*self.located, *self.attention_layers, -1]) + 1

    # -- reading -----------------------------------------------------------------------------------------------------
    def gain(self, rule: Rule, norm: NormSpec | None, layer: int, d: int) -> torch.Tensor | None:
        """The norm's effective gain [d], read exactly as the MLP scan reads it; None when ``rule`` (the
        convention's rule for the rows it scales) does not fold it, so an unused norm is never read."""
        from mmdetect.scanner.read import read_gain

        return read_gain(self.ckpt, norm, layer, d) if rule.gain else None

    def _canonical(self, proj: Proj, layer: int) -> torch.Tensor:
        """The projection with heads x head_dim on axis 0: [rows, d] float32."""
        key = tensor_key(proj.key, layer)
        if key not in self.ckpt:
            raise MMDetectError(f"tensor {key!r} is missing from {self.ckpt.ref}: the checkpoint does not match the "
                                f"attention layout for {self.ckpt.model_type!r}")
        t = self.ckpt.read(key)
        if t.dim() != 2:
            raise MMDetectError(f"tensor {key!r} has shape {list(t.shape)}; the attention registry expects 2-D")
        return (t if proj.axis == 0 else t.transpose(0, 1)).float()

    def heads(self, layer: int) -> Heads:
        """Layer ``layer``'s heads: V and O rows [H, dh, d], folded by ``convention.head_fold``."""
        lay = self.require_attention()
        n_heads = lay.n_heads(self.ckpt.config)
        if n_heads is None:  # resolve_layout reports this as the attention gap
            raise MMDetectError(f"the number of attention heads of {self.ckpt.ref} is unknown")
        o = self._canonical(lay.o, layer)                              # [H*dh, d]
        rows, d = o.shape
        if rows % n_heads:
            raise MMDetectError(f"layer {layer}: the output projection has {rows} input rows, not a multiple of "
                                f"{n_heads} heads")
        dh = rows // n_heads
        if lay.qkv is not None:
            v = self._split_qkv(lay.qkv, layer, n_heads, dh)            # [KV*dh, d]
        elif lay.v is not None:
            v = self._canonical(lay.v, layer)
        else:
            raise MMDetectError(f"the attention layout of {self.ckpt.model_type!r} names neither v nor qkv")
        if v.shape[1] != d or v.shape[0] % dh or n_heads % (v.shape[0] // dh):
            raise MMDetectError(f"layer {layer}: value rows {list(v.shape)} do not fit {n_heads} heads of size {dh} "
                                f"and d_model {d}; the attention layout for {self.ckpt.model_type!r} does not fit")
        n_kv = v.shape[0] // dh
        kv = [h // (n_heads // n_kv) for h in range(n_heads)]
        conv = self.convention
        fold_v, fold_o = head_fold(conv, lay.pre_norm, self.layernorm_model,
                                   self.gain(conv.head_read, lay.pre_norm, layer, d),
                                   self.gain(conv.head_write, lay.post_norm, layer, d))
        v = fold(v, fold_v).reshape(n_kv, dh, d)[kv]                    # [H, dh, d]
        o = fold(o, fold_o).reshape(n_heads, dh, d)
        return Heads(layer, v, o, kv)

    def head_dim(self, layer: int) -> int:
        """d_head of a layer's heads, from the output projection's shape alone (nothing is read)."""
        lay = self.require_attention()
        n_heads = lay.n_heads(self.ckpt.config)
        key = tensor_key(lay.o.key, layer)
        shape = self.ckpt.tensors[key].shape if key in self.ckpt else ()
        rows = int(shape[0 if lay.o.axis == 0 else 1]) if len(shape) == 2 else 0
        if n_heads is None or not rows or rows % n_heads:
            return self.heads(layer).head_dim  # (which reports what does not fit)
        return rows // n_heads

    def _split_qkv(self, proj: Proj, layer: int, n_heads: int, dh: int) -> torch.Tensor:
        """The value rows of a fused projection, [KV*dh, d], in key/value-head order."""
        t = self._canonical(proj, layer)
        rows, d = t.shape
        if rows % dh or (rows // dh - n_heads) % 2 or rows // dh <= n_heads:
            raise MMDetectError(f"layer {layer}: fused qkv has {rows} rows, which is not (heads + 2 kv_heads) x "
                                f"{dh} for {n_heads} heads")
        n_kv = (rows // dh - n_heads) // 2
        if isinstance(proj.groups, int):
            groups = proj.groups
        elif proj.groups in ("heads", "kv_heads"):
            groups = n_heads if proj.groups == "heads" else n_kv
        else:  # the registry loader admits only these for a fused projection
            raise MMDetectError(f"layer {layer}: fused qkv groups {proj.groups!r} is not heads, kv_heads or an "
                                f"integer")
        if n_heads % groups or n_kv % groups:
            raise MMDetectError(f"layer {layer}: {n_heads} heads and {n_kv} kv heads do not split into {groups} "
                                f"groups as the attention registry says")
        sizes = {"q": n_heads // groups * dh, "k": n_kv // groups * dh, "v": n_kv // groups * dh}
        blocks = t.reshape(groups, rows // groups, d)
        start = sum(sizes[p] for p in proj.order[: proj.order.index("v")])
        return blocks[:, start:start + sizes["v"]].reshape(n_kv * dh, d)

    def mlp_fold(self, block: Block | Writes) -> MLPFold:
        """How this circuit's convention folds one scanner Block: the scan's own ``convention.mlp_fold``."""
        return mlp_fold(self.convention, block.job.spec, block.pre_gain, block.post_gain)

    def neurons(self, block: Block) -> Neurons:
        """One scanner Block's read/write/gate vectors, folded as the scan folds them."""
        rows = fold_mlp(self.mlp_fold(block), block.w_in, block.w_out, block.w_gate)
        return Neurons(block.job.layer, block.job.spec, block.job.expert, block.expert_label, rows.read, rows.write,
                       rows.gate, actual_write(block.w_out, block.post_gain), rows.sign)

    def write_rows(self, block: Block | Writes) -> torch.Tensor:
        """[n, d] float32: the block's write rows folded as ``neurons`` folds them, *before* the canonical sign flip.

        What a writer scan needs: |cos|, a head's align and erase are the same for o_j and -o_j (bit for bit: a
        flip only negates), so only the few rows that are reported need their sign (``row_signs``), and the read
        and gate rows are never folded for the whole block.
        """
        return fold(block.w_out, self.mlp_fold(block).write)

    def row_signs(self, job: Job, rows: list[int]) -> list[float]:
        """The canonical sign (+1.0 / -1.0) that ``neurons`` applies to the given rows of ``job``'s block
        (block-relative indices): sign(g_j . r_j) of the folded gate and read rows for a gated MLP where the
        convention flips. Reads only those rows of the input and gate weights (``load_input_rows``)."""
        spec = job.spec
        gated = spec.gate is not None or spec.gate_up is not None
        if not gated or not self.convention.flip_gate_sign or not rows:
            return [1.0] * len(rows)
        w_in, w_gate = load_input_rows(self.ckpt, job, rows)
        assert w_gate is not None
        f = mlp_fold(self.convention, spec, read_gain(self.ckpt, spec.pre_norm, job.layer, self.d_model), None)
        r, g = fold(w_in, f.read), fold(w_gate, f.gate)
        return canonical_sign((g * r).sum(dim=1), f.zero_ties).tolist()

    def iter_neurons(self, layers: Container[int] | None = None) -> Iterator[Neurons]:
        from mmdetect.scanner.pipeline import iter_blocks
        from mmdetect.scanner.read import plan_jobs

        for block in iter_blocks(self.ckpt, plan_jobs(self.ckpt, self.located, layers)):
            yield self.neurons(block)

    def embedding_key(self) -> str | None:
        """The token embedding's tensor name when the checkpoint has it."""
        lay = self.attention
        return lay.embed if lay is not None and lay.embed and lay.embed in self.ckpt else None

    def has_embedding(self) -> bool:
        return self.embedding_key() is not None

    def embedding_rows(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(first token id, [c, d] folded write of each token): gain of an embedding norm and centring applied."""
        lay = self.require_attention()
        key = self.embedding_key()
        if key is None:
            raise MMDetectError(f"the token embedding {lay.embed!r} is not in {self.ckpt.ref}")
        for start, stop in self.embedding_spans(chunk):
            yield start, self.embedding_fold_rows(self.embedding_raw(start, stop))

    def embedding_spans(self, chunk: int | None = None) -> list[tuple[int, int]]:
        """Token ranges [start, stop) of ``chunk`` rows covering the embedding (for reading it in slabs)."""
        key = self.embedding_key()
        if key is None:
            raise MMDetectError(f"the token embedding {self.require_attention().embed!r} is not in {self.ckpt.ref}")
        n, chunk = int(self.ckpt.tensors[key].shape[0]), chunk or ROW_CHUNK
        return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]

    def embedding_raw(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the token embedding as stored, [c, d]."""
        key = self.embedding_key()
        assert key is not None
        return self.ckpt.read(key, start, stop)

    @cached_property
    def token_fold(self) -> Fold:
        """How the token embedding's rows are folded (``convention.embedding_fold``), read once."""
        lay, conv = self.require_attention(), self.convention
        return embedding_fold(conv, lay.embed_norm, self.layernorm_model,
                              self.gain(conv.embed, lay.embed_norm, 0, self.d_model))

    def embedding_fold_rows(self, raw: torch.Tensor) -> torch.Tensor:
        """[c, d] stored embedding rows -> what each token writes: an embedding norm's gain, centred in LayerNorm
        models (``convention.embedding_fold``)."""
        rows = fold(raw, replace(self.token_fold, centre_rows=False))
        return rows if self.token_mean is None else rows - self.token_mean

    @cached_property
    def token_mean(self) -> torch.Tensor | None:
        """The mean folded embedding row when the convention centres rows over the vocabulary, read once."""
        key = self.embedding_key()
        return None if key is None else self._row_mean(key, self.token_fold)

    def unembedding_key(self) -> str:
        lay = self.require_attention()
        for key in lay.unembed:
            if key in self.ckpt:
                return key
        tied = self.embedding_key()
        if tied is not None:
            return tied
        raise MMDetectError(f"{self.ckpt.ref} has neither an unembedding ({', '.join(lay.unembed)}) nor a token "
                            f"embedding to tie it to")

    def unembedding_rows(self, chunk: int = ROW_CHUNK) -> Iterator[tuple[int, torch.Tensor]]:
        """(first token id, [c, d]): row t is the residual direction that raises token t's logit, folded by
        ``convention.unembedding_fold`` (final-norm gain, centred when the final norm is a LayerNorm; under
        ``center_unembed`` minus the mean row over the whole vocabulary, which costs one more pass)."""
        for start, stop in self.unembedding_spans(chunk):
            yield start, self.unembedding_slab(start, stop)

    def unembedding_spans(self, chunk: int | None = None) -> list[tuple[int, int]]:
        """Token ranges [start, stop) of ``chunk`` rows covering the unembedding; reads its fold's gain first."""
        _ = self.logit_fold, self.logit_mean  # checks the shape, reads the final norm's gain, on the calling thread
        n, chunk = int(self.ckpt.tensors[self.unembedding_key()].shape[0]), chunk or ROW_CHUNK
        return [(start, min(n, start + chunk)) for start in range(0, n, chunk)]

    @cached_property
    def logit_fold(self) -> Fold:
        """How the unembedding's rows are folded (``convention.unembedding_fold``), read once."""
        lay = self.require_attention()
        key = self.unembedding_key()
        d = self.d_model
        if self.ckpt.tensors[key].shape[-1] != d:
            raise MMDetectError(f"the unembedding {key!r} is {list(self.ckpt.tensors[key].shape)}, not [vocab, "
                                f"{d}]: models with an output projection (OPT-350m) are not supported here")
        conv = self.convention
        return unembedding_fold(conv, lay.final_norm, self.gain(conv.unembed, lay.final_norm, 0, d))

    def unembedding_slab(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the unembedding, folded: [c, d]."""
        return self.logit_fold_rows(self.ckpt.read(self.unembedding_key(), start, stop))

    def logit_fold_rows(self, raw: torch.Tensor) -> torch.Tensor:
        """[c, d] stored unembedding rows -> the residual directions raising each token's logit."""
        rows = fold(raw, replace(self.logit_fold, centre_rows=False))
        return rows if self.logit_mean is None else rows - self.logit_mean

    @cached_property
    def logit_mean(self) -> torch.Tensor | None:
        """The mean folded unembedding row under ``center_unembed`` (one more pass over it), read once."""
        return self._row_mean(self.unembedding_key(), self.logit_fold)

    def vocab_size(self) -> int:
        return int(self.ckpt.tensors[self.unembedding_key()].shape[0])

    def _row_mean(self, key: str, f: Fold) -> torch.Tensor | None:
        """The mean folded row over all rows of ``key`` when ``f`` centres rows (``center_unembed``), else None:
        one pass over the matrix, in float64."""
        if not f.centre_rows:
            return None
        f = replace(f, centre_rows=False)
        n = int(self.ckpt.tensors[key].shape[0])
        total = torch.zeros(int(self.ckpt.tensors[key].shape[-1]), dtype=torch.float64)
        for start in range(0, n, ROW_CHUNK):
            total += fold(self.ckpt.read(key, start, min(n, start + ROW_CHUNK)), f).sum(dim=0, dtype=torch.float64)
        return (total / max(n, 1)).float()

    def close(self) -> None:
        self.ckpt.close()

    def __enter__(self) -> Circuit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_circuit(model: str, *, revision: str | None = None, convention: str | Convention = DEFAULT,
                 need_mlps: bool = True) -> Circuit:
    """Open ``model`` (folder, hub id or .gguf) with its MLP and attention layouts, in ``convention`` (a name in
    ``convention.CONVENTIONS``, or a Convention)."""
    conv = get_convention(convention)  # an unknown name fails before the checkpoint is opened
    ckpt = open_checkpoint(model, revision=revision)
    try:
        return Circuit(ckpt, convention=conv, need_mlps=need_mlps)
    except BaseException:
        ckpt.close()
        raise
