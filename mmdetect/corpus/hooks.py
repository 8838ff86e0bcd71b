"""Hooks on transformers' own modules, placed from the registry, that feed every MLP neuron's activations into its
:class:`~mmdetect.corpus.stats.Moments` while the model runs.

Per MLP (one registry ``MLPSpec`` at one layer), the modules are named by the spec's tensor keys
(``corpus.model.find_module``):

* the activation function's input: the output of the gate projection (``gate``, or the first half / even rows of a
  fused ``gate_up``), or of the input projection of a non-gated MLP (``in``);
* a gated MLP's linear input: the output of ``up`` (or the other part of ``gate_up``);
* the post-activation: the input of the output projection (``out``), whose output gives the post-norm's 1/rms;
* the residual stream at the MLP's input: the input of its pre-norm (of the MLP module without one), for the
  deletion score's component.

The statistics of a layer are taken inside its output projection's hook, so only one layer's activations are alive
at a time. Routed experts (transformers' fused experts modules: ``gate_up_proj [E, 2n, d]`` and ``act_fn``) are
hooked at the experts module's input (hidden states, chosen experts): each expert's gate and linear inputs are
computed from the module's own weights with the module's own gating (``_apply_gate`` where it has one) for the
tokens routed to it. That is the one place where a product is computed again rather than read, and it costs one
more gate_up projection of the routed tokens.

Values are taken in the scan's orientation: the linear input and the post-activation are multiplied by the
neuron's canonical sign (``convention.fold_mlp``), so a neuron whose up and out rows are negated in the checkpoint
reports the same cases in the folded convention and swapped ``_ip`` / ``_in`` cases under ``--convention raw``.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mmdetect.corpus import fused
from mmdetect.corpus.model import find_module
from mmdetect.corpus.stats import Moments
from mmdetect.errors import UnsupportedError
from mmdetect.registry import MLPSpec, tensor_key


@dataclass
class Site:
    """One MLP (or one routed expert) whose neurons are measured. ``sign`` [n], ``rhat`` [n, d] (unit read
    directions) and ``w_along`` [n] (actual write along the read direction) come from the weights, folded as the scan
    folds them; ``moments`` collects the corpus statistics."""

    layer: int
    expert: Any              # scan's `expert` column: None, a routed expert index, or a shared expert's label
    index: int | None        # routed expert index in the experts module, None for a dense MLP or shared expert
    spec: MLPSpec = field(repr=False)
    sign: torch.Tensor = field(repr=False)
    rhat: torch.Tensor | None = field(repr=False)     # None: not held, read again when needed (``reread``)
    w_along: torch.Tensor = field(repr=False)
    moments: Moments = field(repr=False)
    reread: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    def read_directions(self) -> torch.Tensor:
        """rhat [n, d]: the one held, or read again from the checkpoint (the same values, not kept)."""
        if self.rhat is not None:
            return self.rhat
        if self.reread is None:
            raise RuntimeError(f"layer {self.layer}'s read directions are neither held nor readable")
        return self.reread()

    @property
    def gated(self) -> bool:
        return self.spec.gated

    @property
    def routed(self) -> bool:
        return self.spec.experts != "none"


@dataclass
class Tokens:
    """The batch being run: every position's global key [B*T] and the rows that count (BOS positions left out)."""

    keys: torch.Tensor
    keep: torch.Tensor        # [N] int64 row indices into the flattened batch
    keep_mask: torch.Tensor   # [B*T] bool


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1])


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs[name]


class Hooks:
    """The hooks of every site on one model; ``tokens`` must be set before each forward pass."""

    def __init__(self, model: Any, sites: list[Site], renames: dict[str, str] | None = None) -> None:
        self.tokens: Tokens | None = None
        self.handles: list[Any] = []
        self.modules = dict(model.named_modules())
        self.renames = renames
        groups: dict[tuple[int, str], list[Site]] = {}
        for site in sites:
            groups.setdefault((site.layer, site.spec.name), []).append(site)
        try:
            for group in groups.values():
                self._place(group)
        except BaseException:
            self.remove()
            raise

    def _find(self, key: str, layer: int, what: str) -> Any:
        module = find_module(self.modules, tensor_key(key, layer, None), self.renames)
        if module is None:
            raise UnsupportedError(f"no module of the transformers model holds {tensor_key(key, layer, None)} ({what}) "
                                   f"so its activations cannot be hooked; the registry's names and transformers' "
                                   f"disagree for this architecture")
        return module

    def _place(self, group: list[Site]) -> None:
        spec, layer = group[0].spec, group[0].layer
        captured: dict[str, torch.Tensor] = {}
        self._residual(spec, layer, captured)
        if group[0].routed:
            self._experts(spec, layer, group, captured)
            return
        (site,) = group
        if spec.gate_up is not None:
            split = spec.gate_up.split or "halves"
            self._capture(self._find(spec.gate_up.key, layer, "gate_up"), captured, split)
        elif spec.gate is not None:
            self._capture(self._find(spec.gate.key, layer, "gate"), captured, "pre")
            assert spec.up is not None
            self._capture(self._find(spec.up.key, layer, "up"), captured, "up")
        else:
            assert spec.in_ is not None
            self._capture(self._find(spec.in_.key, layer, "in"), captured, "pre")
        down = self._find(spec.out.key, layer, "out")
        post_norm = spec.post_norm is not None

        def on_down(_mod: Any, args: tuple, kwargs: dict, out: Any) -> None:
            post = _flat(_arg(args, kwargs, 0, "input"))
            y = _flat(out[0] if isinstance(out, tuple) else out)
            scale = 1.0 / y.float().pow(2).mean(dim=1).add(1e-6).sqrt() if post_norm else None
            self._feed(site, captured.pop("pre"), captured.pop("up", None), post, scale, captured.pop("x", None))

        self.handles.append(down.register_forward_hook(on_down, with_kwargs=True))

    def _residual(self, spec: MLPSpec, layer: int, captured: dict[str, torch.Tensor]) -> None:
        """Keep the residual stream at the MLP's input for the deletion score (none when the pre-norm has no
        parameters to name it by: the score is then NaN)."""
        if spec.pre_norm is None:
            module = find_module(self.modules, tensor_key(spec.out.key, layer, None).rsplit(".", 2)[0] + ".weight",
                                 self.renames)
        elif spec.pre_norm.weight is None:
            return
        else:
            module = find_module(self.modules, tensor_key(spec.pre_norm.weights[0], layer, None), self.renames)
        if module is None:
            return

        def on_input(_mod: Any, args: tuple, kwargs: dict) -> None:
            captured["x"] = _flat(args[0] if args else next(iter(kwargs.values())))

        self.handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))

    def _capture(self, module: Any, captured: dict[str, torch.Tensor], role: str) -> None:
        def on_output(_mod: Any, _args: tuple, out: Any) -> None:
            y = _flat(out[0] if isinstance(out, tuple) else out)
            if role == "halves":
                captured["pre"], captured["up"] = y.chunk(2, dim=-1)
            elif role == "interleave":
                captured["pre"], captured["up"] = y[:, 0::2], y[:, 1::2]
            else:
                captured[role] = y

        self.handles.append(module.register_forward_hook(on_output))

    def _experts(self, spec: MLPSpec, layer: int, group: list[Site], captured: dict[str, torch.Tensor]) -> None:
        module = _experts_module(self.modules, tensor_key(spec.out.key, layer, 0).removesuffix(".weight"), layer,
                                 self.renames)
        if module is None:
            raise UnsupportedError(f"layer {layer}'s routed experts are not a transformers experts module with a "
                                   f"3-D gate_up_proj, so their activations cannot be hooked")
        by_index = {site.index: site for site in group if site.index is not None}

        def on_experts(mod: Any, args: tuple, kwargs: dict) -> None:
            hidden = _arg(args, kwargs, 0, "hidden_states")
            chosen = _arg(args, kwargs, 1, "top_k_index")
            keep = self._tokens().keep_mask.to(chosen.device)
            resid = captured.pop("x", None)       # this layer's: not kept alive into the next layers
            for index, site in by_index.items():
                rows = torch.nonzero((chosen == index).any(dim=-1) & keep).flatten()
                pre, up, post = _expert_activations(mod, index, hidden[rows])
                self._feed(site, pre, up, post, None, resid, rows=rows)

        self.handles.append(module.register_forward_pre_hook(on_experts, with_kwargs=True))

    def _tokens(self) -> Tokens:
        if self.tokens is None:
            raise RuntimeError("Hooks.tokens is not set for this forward pass")
        return self.tokens

    def _feed(self, site: Site, pre: torch.Tensor, up: torch.Tensor | None, post: torch.Tensor,
              scale: torch.Tensor | None, resid: torch.Tensor | None, rows: torch.Tensor | None = None) -> None:
        """One MLP's activations of this batch into its Moments. ``rows``: the batch rows they belong to (routed
        experts, already restricted to counted tokens); otherwise they are every position and BOS rows are dropped."""
        tokens = self._tokens()
        counted = None
        if rows is None:
            rows = counted = tokens.keep.to(pre.device)
        keys = tokens.keys.to(rows.device)[rows]
        scale = torch.ones(rows.shape[0]) if scale is None else scale[rows].cpu()
        site.moments.update(pre, up, post, keys, scale, _component(site, resid, rows), rows=counted, sign=site.sign)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _is_experts(module: Any) -> bool:
    w = getattr(module, "gate_up_proj", None)
    return isinstance(w, torch.nn.Parameter) and w.dim() == 3


def _experts_module(modules: dict[str, Any], name: str, layer: int, renames: dict[str, str] | None) -> Any:
    """The experts module holding the stored expert tensor ``name``: the longest prefix of its name (after
    ``renames``) that is one, else the one experts module of decoder layer ``layer`` (checkpoints written with
    older module names, e.g. Mixtral's ``block_sparse_moe.experts.{e}.w2``)."""
    name = renames.get(name, name) if renames else name
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        module = modules.get(".".join(parts[:k]))
        if module is not None and _is_experts(module):
            return module
    pattern = re.compile(rf"(^|\.)layers\.{layer}\.")
    hits = [m for n, m in modules.items() if pattern.search(n) and _is_experts(m)]
    return hits[0] if len(hits) == 1 else None


def _component(site: Site, resid: torch.Tensor | None, rows: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                      torch.Tensor]:
    """c = x . r̂_j at (token, neuron) pairs: float32 products summed in float64 (zeros without a residual: the score
    is then NaN), in blocks of pairs that stay in cache. Most pairs come in the first batch, when every neuron's
    deletion set fills at once; later batches bring only the tokens that enter a set."""
    read: list[torch.Tensor] = []          # the site's read directions, read once for this batch when needed

    def component(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if resid is None:
            return torch.zeros(t.shape[0], dtype=torch.float64)
        at = rows.to(resid.device)[t.to(resid.device)]
        jj = j.to(resid.device)
        if not read:
            read.append(site.read_directions().to(resid.device, torch.float32))
        rhat = read[0]
        if fused.available() and resid.device.type == "cpu" and t.shape[0]:
            x = resid if resid.dtype == torch.float32 else resid.float()
            return torch.from_numpy(fused.dots(x.numpy(), rhat.numpy(), at.numpy(), jj.numpy()))
        out = torch.empty(t.shape[0], dtype=torch.float64, device=resid.device)
        step = max(1, (4 << 20) // (4 * resid.shape[1]))  # 4 MB of gathered rows at a time
        for lo in range(0, t.shape[0], step):
            x = resid.index_select(0, at[lo:lo + step]).float()
            x.mul_(rhat.index_select(0, jj[lo:lo + step]))
            torch.sum(x, dim=-1, dtype=torch.float64, out=out[lo:lo + step])
        return out.cpu()
    return component


def _expert_activations(mod: Any, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate input, linear input, post-activation) [m, n] of routed expert ``index`` on its tokens x [m, d], from the
    experts module's own weights and gating (the layouts transformers' experts interface describes)."""
    w = mod.gate_up_proj[index]
    gu = x @ w if getattr(mod, "is_transposed", False) else x @ w.T
    bias = getattr(mod, "gate_up_proj_bias", None)
    if bias is not None and getattr(mod, "has_bias", True):
        gu = gu + bias[index]
    if getattr(mod, "is_concatenated", True):
        gate, up = gu.chunk(2, dim=-1)
    else:
        gate, up = gu[:, 0::2], gu[:, 1::2]
    apply = getattr(mod, "_apply_gate", None)
    post = apply(gu) if apply is not None else mod.act_fn(gate) * up
    return gate, up, post
