"""The slow path: per-neuron cosines from a fully built transformers model, found without mmdetect's registry.

mmdetect reads tensors by name from a registry of on-disk layouts. This module checks that registry from the other
side: it takes the model transformers built and finds every MLP, its neurons and its norms from the module tree and
the model's own forward pass. In-memory names break two ties only: which of two same-shaped 3-D expert tensors is the
down projection, and gate vs up where a norm between them hides the linear branch (BitNet).

* projections: weights that read d_model (in_features == d) or write it (out_features == d). A writer and the
  nearest readers of width n (or 2n, fused) form one MLP of n neurons. ``nn.Linear`` is ``[out, in]``, ``Conv1D``
  ``[in, out]``; 3-D expert parameters are ``[E, width, d]`` or ``[E, d, width]`` (``n != d`` in the models tested,
  so the shape says which axis is which).
* gate vs up, and how a fused gate_up splits: scale candidate rows by s in {-1, 0, 1, 2} and re-run the MLP's block
  on the inputs recorded in the forward pass. The writer's output is affine in s exactly for the up rows: they enter
  linearly, the gate goes through the activation.
* norms: the pre-MLP norm is the norm whose output *is* the block's input in the forward pass; a post-MLP norm is
  one whose input is the block's output (or which produces it from inside the block). Its kind (RMSNorm or
  LayerNorm, gain w or 1 + w) comes from running a copy with weight = 1 and weight = 0.

``unit_cosines`` then applies the convention of ``shared/research/README.md`` in plain torch: fold the gains, centre
for LayerNorm, flip up and out together when cos(gate, up) < 0.
"""
from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Read-write pairs that are not MLPs: attention (MLA's q_a -> q_b is a low-rank pair), Mamba and linear-attention
# mixers, Gemma 3n's LAuReL low-rank residual and AltUp, Gemma 3n/4's per-layer-input projection. Matched against
# module paths and class names.
NOT_MLP = re.compile(r"attn|attention|laurel|altup|per_layer|mamba|deltanet", re.IGNORECASE)


@dataclass
class Proj:
    """One projection. ``canon`` is a view of the parameter as [E, width, d] (E = 1 for a matrix).

    Row k of ``canon[e]`` is what output unit k reads (``reads``) or what hidden unit k writes. ``canon`` shares
    storage with the model, so writing into it changes the model: the gate/up probe and the planting rely on that.
    """

    path: str                     # relative to the layer
    canon: torch.Tensor
    reads: bool
    name: str
    owner: str                    # the module whose forward uses the parameter
    is_3d: bool = False           # stored as a 3-D [E, ...] parameter (even when E = 1)

    @property
    def experts(self) -> int:
        return self.canon.shape[0]

    @property
    def width(self) -> int:
        return self.canon.shape[1]


@dataclass
class Slot:
    """Neuron rows of one expert of a projection: neuron j is ``canon[expert, rows[j]]``."""

    canon: torch.Tensor
    expert: int
    rows: torch.Tensor

    def read(self) -> torch.Tensor:
        """[n, d] float32 copy."""
        return self.canon[self.expert, self.rows].float().clone()

    def write(self, j: int, vector: torch.Tensor) -> None:
        with torch.no_grad():
            self.canon[self.expert, self.rows[j]] = vector.to(self.canon.dtype)


@dataclass
class Norm:
    path: str
    kind: str                     # "rms" | "layernorm"
    offset: float                 # 1.0 when the module scales by 1 + w (Gemma)
    gain: torch.Tensor | None     # effective gain [d] (offset already added), None for a norm without parameters

    @property
    def centres(self) -> bool:
        return self.kind == "layernorm"


@dataclass
class Unit:
    """One MLP (a dense MLP, one routed expert, a shared expert) of one layer."""

    layer: int
    expert: Any                   # the routed expert's index, "shared", "sharedN", a module path, or None
    up: Slot                      # what each neuron reads (the up projection of a gated MLP)
    out: Slot                     # what each neuron writes
    gate: Slot | None
    pre: Norm | None
    post: tuple[Norm, ...]        # norms applied to the MLP's output, innermost first (Gemma 4 MoE layers: two)

    @property
    def n(self) -> int:
        return len(self.up.rows)


# -- finding projections ---------------------------------------------------------------------------------------------

def _projections(layer: torch.nn.Module, config: Any, d: int) -> list[Proj]:
    from transformers.pytorch_utils import Conv1D

    out: list[Proj] = []
    for path, mod in layer.named_modules():
        if NOT_MLP.search(path) or NOT_MLP.search(type(mod).__name__):
            continue
        w = getattr(mod, "weight", None)
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and w is not None and w.dim() == 2:
            w_oi = w.detach().T if isinstance(mod, Conv1D) else w.detach()  # now [out, in]
            leaf = path.split(".")[-1]
            if w_oi.shape[1] == d and w_oi.shape[0] != d:
                out.append(Proj(path, w_oi.unsqueeze(0), True, leaf, path))
            elif w_oi.shape[0] == d and w_oi.shape[1] != d:
                out.append(Proj(path, w_oi.T.unsqueeze(0), False, leaf, path))
            continue
        own = {k: p.detach() for k, p in mod.named_parameters(recurse=False)}
        if {"w1", "v1", "w2"} <= set(own):
            # DBRX's DbrxExpertGLU stacks its experts as [E*n, d]: gate = x @ w1[e].T, up = x @ v1[e].T and
            # out = h @ w2[e], so all three hold neuron j of expert e in row e*n + j.
            experts = config.ffn_config.moe_num_experts
            for name in ("w1", "v1", "w2"):
                p = own[name]
                out.append(Proj(f"{path}.{name}", p.view(experts, -1, p.shape[1]), name != "w2", name, path))
            continue
        for name, p in own.items():
            if p.dim() != 3 or name.endswith("bias"):
                continue
            full = f"{path}.{name}" if path else name
            _, a, b = p.shape
            # Readers are [E, width, d] (x @ W[e].T) or [E, d, width] (x @ W[e]); writers [E, d, n] (W[e] @ h) or
            # [E, n, d] (h @ W[e]). Which one a module uses is not in the shape (GPT-OSS and Llama 4 store both
            # transposed), so the writer is the tensor named like a down projection (JetMoE: output_linear).
            canon = p if b == d and a != d else p.transpose(1, 2) if a == d and b != d else None
            if canon is not None:
                is_out = bool(re.search(r"down|output|w2|fc2", full, re.IGNORECASE))
                out.append(Proj(full, canon, not is_out, name, path, is_3d=True))
    return out


def _common(a: str, b: str) -> int:
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    return n


def _pair(projs: list[Proj]) -> list[tuple[Proj, list[Proj]]]:
    """Each writer with its nearest readers of width n or 2n (and as many experts or more: LongCat's zero experts)."""
    readers = [p for p in projs if p.reads]
    pairs = []
    for w in (p for p in projs if not p.reads):
        cands = [r for r in readers if r.width in (w.width, 2 * w.width) and r.experts >= w.experts]
        if cands:
            best = max(_common(r.path, w.path) for r in cands)
            pairs.append((w, [r for r in cands if _common(r.path, w.path) == best]))
    return pairs


# -- recording the forward pass --------------------------------------------------------------------------------------

def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "to_tuple"):
        obj = obj.to_tuple()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for o in obj:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


@dataclass
class Call:
    args: tuple
    kwargs: dict
    x: torch.Tensor | None        # first tensor input (cloned)
    y: torch.Tensor | None = None  # first tensor output (cloned)


@dataclass
class Trace:
    """The first call of every module in one forward pass, by full module path."""

    calls: dict[str, Call] = field(default_factory=dict)

    def record(self, model: torch.nn.Module, ids: torch.Tensor) -> None:
        handles = []

        def pre(mod: torch.nn.Module, args: tuple, kwargs: dict, name: str) -> None:
            if name not in self.calls:
                x = _first_tensor(args) if args else _first_tensor(kwargs)
                # Clone: in-place updates of the residual stream later in the pass must not change the record.
                self.calls[name] = Call(args, kwargs, None if x is None else x.detach().clone())

        def post(mod: torch.nn.Module, args: tuple, kwargs: dict, out: Any, name: str) -> None:
            call, y = self.calls[name], _first_tensor(out)
            if call.y is None and y is not None:
                call.y = y.detach().clone()

        for name, mod in model.named_modules():
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, k, name=name: pre(m, a, k, name), with_kwargs=True))
            handles.append(mod.register_forward_hook(
                lambda m, a, k, o, name=name: post(m, a, k, o, name), with_kwargs=True))
        try:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Bitwise-equal activations (ignoring how the leading batch/sequence axes are shaped)."""
    return (a is not None and b is not None and a.shape[-1] == b.shape[-1] and a.numel() == b.numel()
            and torch.equal(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])))


# -- norms -----------------------------------------------------------------------------------------------------------

def _is_norm(mod: torch.nn.Module) -> bool:
    return "norm" in type(mod).__name__.lower() and not any("norm" in type(c).__name__.lower()
                                                            for c in mod.children())


def _gain_param(mod: torch.nn.Module) -> torch.nn.Parameter | None:
    params = dict(mod.named_parameters(recurse=False))
    return next((params[k] for k in ("weight", "scale", "gamma", "g") if k in params), None)


def norm_kind(mod: torch.nn.Module, d: int) -> tuple[str, float]:
    """('rms' | 'layernorm', offset) from running a copy with gain 1, then gain 0 (a module that computes 1 + w)."""
    probe = copy.deepcopy(mod).float()
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(0)) * 3 + 1.5
    refs = {"rms": x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
            "layernorm": (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)}
    gain = _gain_param(probe)
    for offset, fill in ((0.0, 1.0), (1.0, 0.0)):
        with torch.no_grad():
            for p in probe.parameters(recurse=False):
                p.fill_(fill if p is gain else 0.0)  # biases to 0
            y = _first_tensor(probe(x))
        for kind, ref in refs.items():
            if torch.allclose(y, ref, atol=2e-3, rtol=2e-3):
                return kind, offset
        if gain is None:
            break
    raise AssertionError(f"{type(mod).__name__} is neither an RMSNorm nor a LayerNorm")


def _norm(layer: torch.nn.Module, path: str, d: int) -> Norm:
    mod = layer.get_submodule(path)
    kind, offset = norm_kind(mod, d)
    gain = _gain_param(mod)
    return Norm(path, kind, offset, None if gain is None else gain.detach().float() + offset)


# -- gate vs up ------------------------------------------------------------------------------------------------------

def _replay(block: torch.nn.Module, call: Call, watch: torch.nn.Module) -> torch.Tensor:
    """Re-run ``block`` on its recorded inputs scaled by 0.1, and return everything ``watch`` output.

    Watching the writer's own output (not the block's) keeps a norm inside the block from hiding linearity; the small
    input keeps GPT-OSS's clamp and Inkling 2's softcap of the up branch in their (nearly) linear range.
    """
    outs: list[torch.Tensor] = []
    handle = watch.register_forward_hook(lambda m, a, o: outs.append(_first_tensor(o).detach().double().flatten()))
    args, kwargs = list(call.args), dict(call.kwargs)
    pos = next((k for k, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    if pos is not None:
        args[pos] = args[pos] * 0.1
    else:
        key = next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
        kwargs[key] = kwargs[key] * 0.1
    try:
        block(*args, **kwargs)
    finally:
        handle.remove()
    return torch.cat(outs)


def _curvature(block: torch.nn.Module, call: Call, watch: torch.nn.Module, target: torch.Tensor,
               rows: torch.Tensor) -> float:
    """Second difference in s of the writer's output when ``target[:, rows]`` is scaled by s, relative to its change.

    ~0 when those rows enter linearly (the up branch); NaN when the output does not depend on them at all.
    """
    saved = target.clone()
    outs = {}
    with torch.no_grad():
        for s in (-1.0, 0.0, 1.0, 2.0):
            target.copy_(saved)
            target[:, rows] *= s
            outs[s] = _replay(block, call, watch)
        target.copy_(saved)
    change = (outs[1.0] - outs[0.0]).abs().max()
    if change == 0:
        return float("nan")
    d2 = torch.maximum((outs[1.0] - 2 * outs[0.0] + outs[-1.0]).abs().max(),
                       (outs[2.0] - 2 * outs[1.0] + outs[0.0]).abs().max())
    return float(d2 / change)


def _pick_linear(curv: dict[Any, float]) -> Any:
    """The one candidate with (near) zero curvature, or None. Softcaps and clamps on up leave a little curvature,
    so the smallest must be far below the next rather than exactly zero."""
    assert not any(math.isnan(c) for c in curv.values()), f"the probe did not reach the weights: {curv}"
    ranked = sorted(curv, key=curv.get)
    if curv[ranked[0]] < 1e-3 and curv[ranked[1]] > 30 * curv[ranked[0]]:
        return ranked[0]
    return None


# -- per layer -------------------------------------------------------------------------------------------------------

def _layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layer stack: the ModuleList holding the most parameters."""
    return max(((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)),
               key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _top(layer: torch.nn.Module, path: str) -> str:
    """The layer's child module that holds ``path`` (one level deeper inside a ModuleList: LongCat's mlps.0)."""
    parts = path.split(".")
    if isinstance(layer.get_submodule(parts[0]), (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return ".".join(parts[:2])
    return parts[0]


def _roles(layer: torch.nn.Module, calls: dict[str, Call], prefix: str, writer: Proj, readers: list[Proj],
           ) -> tuple[Slot, Slot | None]:
    """What the writer's neurons read: the single reader, or the up and gate rows of two readers / a fused one."""
    every = torch.arange(writer.width)
    if len(readers) == 1 and readers[0].width == writer.width:
        return Slot(readers[0].canon, 0, every), None
    block = _top(layer, writer.path)
    args = (layer.get_submodule(block), calls[f"{prefix}.{block}"], layer.get_submodule(writer.owner))
    if len(readers) == 2 and all(r.width == writer.width for r in readers):
        up = _pick_linear({k: _curvature(*args, r.canon, every) for k, r in enumerate(readers)})
        if up is None:
            # BitNet's ffn_sub_norm sits between act(gate) * up and down, so neither branch is affine there:
            # fall back to the names transformers gives the two projections.
            up = next((k for k, r in enumerate(readers) if re.fullmatch(r"up_proj|w3|c_fc_1|v1", r.name)), None)
        assert up is not None, f"{writer.path}: cannot tell gate from up"
        return Slot(readers[up].canon, 0, every), Slot(readers[1 - up].canon, 0, every)
    assert len(readers) == 1 and readers[0].width == 2 * writer.width, \
        f"{writer.path}: readers {[r.path for r in readers]} do not fit width {writer.width}"
    fused, n = readers[0], writer.width
    idx = torch.arange(2 * n)
    splits = {"halves, gate first": idx[n:], "halves, up first": idx[:n], "interleaved, gate even": idx[1::2],
              "interleaved, up even": idx[0::2]}
    split = _pick_linear({k: _curvature(*args, fused.canon, rows) for k, rows in splits.items()})
    assert split is not None, f"{fused.path}: fused gate/up split not identified"
    up_rows = splits[split]
    return Slot(fused.canon, 0, up_rows), Slot(fused.canon, 0, idx[~torch.isin(idx, up_rows)])


def layer_units(model: torch.nn.Module, calls: dict[str, Call], prefix: str, index: int, layer: torch.nn.Module,
                d: int) -> list[Unit]:
    def call(path: str) -> Call:
        assert f"{prefix}.{path}" in calls, f"layer {index}: {path} did not run in the forward pass"
        return calls[f"{prefix}.{path}"]

    # The layer's norms over d_model that ran in the forward pass.
    norms = [p for p, m in layer.named_modules() if p and _is_norm(m) and f"{prefix}.{p}" in calls
             and calls[f"{prefix}.{p}"].y is not None and calls[f"{prefix}.{p}"].y.shape[-1] == d]
    found = [(w, r, *_roles(layer, calls, prefix, w, r)) for w, r in _pair(_projections(layer, model.config, d))]
    routed_blocks = {_top(layer, w.path) for w, *_ in found if w.experts > 1}
    n_plain = sum(1 for w, *_ in found if w.experts == 1)
    wiring = []
    for w_out, readers, up, gate in found:
        block = _top(layer, readers[0].path)
        in_block = block == _top(layer, w_out.path) and block != readers[0].path
        # In an MLP module the block's input and output are the MLP's. Otherwise (fc1/fc2 directly on the layer,
        # BERT's intermediate/output pair) the MLP reads its reader's block input and writes the writer's output.
        x_in = call(block).x
        y_out = call(block).y if in_block else call(w_out.owner).y
        pre = [p for p in norms if _same(calls[f"{prefix}.{p}"].y, x_in)]
        post = [p for p in norms if _same(calls[f"{prefix}.{p}"].x, y_out)]
        if not post and in_block:
            # A norm inside the block that produces its output normalises the MLP's output (A.X-K1's MoE block)...
            post = [p for p in norms if p.startswith(block + ".") and _same(calls[f"{prefix}.{p}"].y, y_out)]
            # ...unless it normalises residual + output (XLNet's post-LN feed-forward), which every post-LN block does.
            post = [p for p in post if not torch.allclose(calls[f"{prefix}.{p}"].x - x_in, call(w_out.owner).y,
                                                          atol=1e-5, rtol=1e-5)]
        assert len(pre) <= 1 and len(post) <= 1, f"layer {index} {block}: ambiguous norms {pre} {post}"
        wiring.append((w_out, up, gate, block, pre, post, calls[f"{prefix}.{post[0]}"].y if post else y_out))
    # A norm over the sum of every MLP branch's (normalised) output scales every neuron's write once more: Gemma 4's
    # post_feedforward_layernorm after post_feedforward_layernorm_1 (dense MLP) + _2 (experts).
    branches = {w[3]: w[6] for w in wiring}
    used = {p for w in wiring for p in w[4] + w[5]}
    outer = []
    if branches:
        total = sum(branches.values())
        outer = [p for p in norms if p not in used and calls[f"{prefix}.{p}"].x is not None
                 and calls[f"{prefix}.{p}"].x.shape == total.shape
                 and torch.allclose(calls[f"{prefix}.{p}"].x, total, rtol=1e-6, atol=1e-6 * float(total.abs().max()))]
    units: list[Unit] = []
    for w_out, up, gate, block, pre, post, _ in wiring:
        pre_n = _norm(layer, pre[0], d) if pre else None
        post_n = tuple(_norm(layer, p, d) for p in post + outer)
        for e in range(w_out.experts):
            # The registry's labels for the expert column: the routed expert's index; "shared" for the shared expert
            # of an MoE layer ("shared0" when it is stored like 3-D experts); the module path when a layer has
            # several non-routed MLPs beside its experts (LongCat); None for a dense MLP (Gemma 4's runs beside the
            # MoE block).
            if w_out.experts > 1:
                label: Any = e
            elif not routed_blocks:
                label = None
            elif w_out.is_3d:
                label = f"shared{e}"
            elif n_plain > 1:
                label = w_out.owner.rsplit(".", 1)[0]
            elif block in routed_blocks or "shared" in w_out.path:
                label = "shared"
            else:
                label = None
            units.append(Unit(index, label, Slot(up.canon, e, up.rows), Slot(w_out.canon, e, torch.arange(w_out.width)),
                              None if gate is None else Slot(gate.canon, e, gate.rows), pre_n, post_n))
    return units


def find_units(model: torch.nn.Module, seed: int = 0) -> list[Unit]:
    """Every MLP (dense, routed expert, shared expert) of every layer, with its norms, in layer order."""
    prefix, layers = _layers(model)
    emb = model.get_input_embeddings()
    d = int(getattr(model.config, "hidden_size", None) or emb.embedding_dim)  # ELECTRA/RemBERT project embeddings
    ids = torch.randint(5, min(emb.num_embeddings, 500), (1, 9), generator=torch.Generator().manual_seed(seed))
    trace = Trace()
    trace.record(model, ids)
    return [u for i, layer in enumerate(layers) for u in layer_units(model, trace.calls, f"{prefix}.{i}", i, layer, d)]


# -- the convention, in plain torch ----------------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def _centre(w: torch.Tensor) -> torch.Tensor:
    return w - w.mean(dim=1, keepdim=True)


def folded(unit: Unit) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(read, write, gate) rows [n, d] in the folded convention.

    read r_j = C(g_pre * up_j), write o_j = C'(g_post * out_j), gate likewise with g_pre; C centres when the pre-MLP
    norm is a LayerNorm, C' when any of the MLP's norms is (every reader of the residual then removes the mean).
    g_post is the product of the gains of every norm on the output: each also divides by a positive scalar only.
    """
    w_in, w_out = unit.up.read(), unit.out.read()
    w_gate = None if unit.gate is None else unit.gate.read()
    pre, post = unit.pre, unit.post
    if pre is not None and pre.gain is not None:
        w_in = w_in * pre.gain
        w_gate = None if w_gate is None else w_gate * pre.gain
    if pre is not None and pre.centres:
        w_in = _centre(w_in)
        w_gate = None if w_gate is None else _centre(w_gate)
    for norm in post:
        if norm.gain is not None:
            w_out = w_out * norm.gain
    if any(n is not None and n.centres for n in (pre, *post)):
        w_out = _centre(w_out)
    return w_in, w_out, w_gate


def unit_cosines(unit: Unit, raw: bool) -> dict[str, torch.Tensor]:
    """cos, cos_gate_out, cos_gate_in per neuron ([n] float64; the gate ones NaN for non-gated MLPs)."""
    if raw:
        w_in, w_out = unit.up.read(), unit.out.read()
        w_gate = None if unit.gate is None else unit.gate.read()
    else:
        w_in, w_out, w_gate = folded(unit)
    cos = _cos(w_in, w_out)
    if w_gate is None:
        nan = torch.full_like(cos, float("nan"))
        return {"cos": cos, "cos_gate_out": nan, "cos_gate_in": nan}
    gate_in, gate_out = _cos(w_gate, w_in), _cos(w_gate, w_out)
    if not raw:
        # Flipping up_j and out_j together leaves the MLP unchanged: take the sign that makes cos(gate, up) >= 0.
        sign = torch.where(gate_in < 0, -1.0, 1.0).double()
        gate_in, gate_out = gate_in * sign, gate_out * sign
    return {"cos": cos, "cos_gate_out": gate_out, "cos_gate_in": gate_in}


def reference_rows(units: list[Unit], raw: bool) -> Iterator[tuple[tuple[int, Any, int], dict[str, float]]]:
    """((layer, expert, neuron), {cos, cos_gate_out, cos_gate_in}) for every neuron."""
    for u in units:
        stats = unit_cosines(u, raw)
        for j in range(u.n):
            yield (u.layer, u.expert, j), {k: float(v[j]) for k, v in stats.items()}
