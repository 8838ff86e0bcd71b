"""The attention registry against transformers' own modelling code, one tiny random model per layout.

For every safetensors model type with an attention layout in the registry (``mmdetect/registry/families/*.yaml``, and
the config variants that change the layout):
build the model from its config class with random weights (norm gains and biases included), save it, and check

* the OV circuit: on one-token inputs (softmax = 1) the attention module's output difference equals
  sum_h W_O_h W_V_kv(h) (x1 - x2) rebuilt from the files on disk (q/k/v split, fused interleaving, GQA mapping and the
  head order of the output projection all have to be right);
* the pre-norm: the registered norm's output is exactly the attention module's input (or the layer input when the
  registry says there is none);
* the parallel flag: the MLP reads the layer input exactly when the registry says the block is parallel;
* the final norm: its output is exactly the unembedding's input; the embedding is [vocab, d].
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

from mmdetect.analysis.circuit import open_circuit
from mmdetect.registry import load_registry, tensor_key
from mmdetect.registry.resolve import registry_has_heads
from mmdetect.scanner.read import read_gain

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D, HEADS, KV, HEAD_DIM = 64, 4, 2, 16
SIZES = {
    "hidden_size": D, "n_embd": D, "d_model": D, "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2,
    "n_layers": 2, "num_attention_heads": HEADS, "n_head": HEADS, "num_heads": HEADS, "n_heads": HEADS,
    "attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM, "intermediate_size": 96,
    "n_inner": 96, "ffn_dim": 96, "ffn_hidden_size": 96, "vocab_size": 128, "max_position_embeddings": 64,
    "n_positions": 64, "n_ctx": 64, "max_seq_len": 64, "rotary_dim": 8, "num_experts": 4, "num_local_experts": 4,
    "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "first_k_dense_replace": 1,
    "shared_expert_intermediate_size": 48, "sliding_window": 32,
}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
OVERRIDES = {"gpt_neo": {"attention_types": [[["global", "local"], 1]]}, "falcon": {"num_kv_heads": KV},
             "dots1": {"n_shared_experts": 1}}
VARIANTS = [
    ("falcon", {"multi_query": False, "num_kv_heads": HEADS}), ("falcon", {"new_decoder_architecture": True}),
    ("falcon", {"parallel_attn": False}), ("gpt_bigcode", {"multi_query": False}),
    ("gpt_neox", {"use_parallel_residual": False}), ("stablelm", {"use_parallel_residual": True}),
    ("opt", {"do_layer_norm_before": False}),
]
WITH_HEADS = [t for t in load_registry().model_types("safetensors") if registry_has_heads(load_registry().lookup(t), t)]
CASES = [(t, {}) for t in WITH_HEADS] + VARIANTS


def build(model_type: str, extra: dict) -> torch.nn.Module:
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    cls = CONFIG_MAPPING[model_type]
    try:
        fields = {f.name for f in dataclasses.fields(cls)}
    except TypeError:
        fields = set(SIZES)
    kw = {k: v for k, v in {**SIZES, **OVERRIDES.get(model_type, {}), **extra}.items() if k in fields or k in extra}
    kw.update({k: v for k, v in TOKENS.items() if k in fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cls(**kw)).float().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if p.dim() == 1 and "bias" not in name else 0.2 * noise)
            if name.endswith("sinks"):  # attention sinks only rescale a head's output: switch them off here
                p.fill_(-1e4)
    return model


def _capture(module: torch.nn.Module, store: dict, name: str, output: bool = False) -> object:
    def hook(mod, args, kwargs, out=None):
        if output:
            store[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        else:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
            store[name] = x.detach().clone()
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
            if isinstance(residual, torch.Tensor):  # BLOOM's attention adds the residual itself
                store[name + "_residual"] = residual.detach().clone()
    if output:
        return module.register_forward_hook(lambda m, a, k, o: hook(m, a, k, o), with_kwargs=True)
    return module.register_forward_pre_hook(lambda m, a, k: hook(m, a, k), with_kwargs=True)


@pytest.mark.parametrize("model_type,extra", CASES, ids=[f"{t}{''.join(f'-{k}={v}' for k, v in e.items())}"
                                                         for t, e in CASES])
def test_attention_layout_matches_transformers(model_type: str, extra: dict, tmp_path, transformers) -> None:
    model = build(model_type, extra)
    model.save_pretrained(tmp_path)
    modules = dict(model.named_modules())
    with open_circuit(str(tmp_path), convention="raw") as circuit:
        lay = circuit.require_attention()
        heads = circuit.heads(0)
        with open_circuit(str(tmp_path)) as folded:
            folded.heads(0)  # the gains exist and fit
            norms = {name: (norm, read_gain(folded.ckpt, norm, 0, D)) for name, norm in
                     (("pre_norm", lay.pre_norm), ("post_norm", lay.post_norm), ("final_norm", lay.final_norm))
                     if norm is not None and norm.weight is not None}
        mlp_spec = circuit.located[min(circuit.located)][0][0]
        assert lay.embed in circuit.ckpt and circuit.ckpt.tensors[lay.embed].shape[-1] == D
    o_module = tensor_key(lay.o.key, 0).removesuffix(".weight")
    attn = o_module.rsplit(".", 1)[0]
    layer = lay.o.key.split("{i}")[0] + "0"
    store: dict = {}
    hooks = [_capture(modules[attn], store, "attn_in"), _capture(modules[attn], store, "attn_out", output=True),
             _capture(modules[layer], store, "layer_in")]
    for name, (norm, _) in norms.items():
        module = modules[tensor_key(str(norm.weight), 0).removesuffix(".weight")]
        hooks += [_capture(module, store, f"{name}_in"), _capture(module, store, f"{name}_out", output=True)]
    if mlp_spec.pre_norm is not None and mlp_spec.pre_norm.weight is not None:
        hooks.append(_capture(modules[tensor_key(mlp_spec.pre_norm.weight, 0).removesuffix(".weight")], store,
                              "mlp_in"))
    else:  # the layer's child that holds the MLP (``mlp`` also for experts: FlexOlmo's are fused in memory)
        mlp_module = f"{layer}.{tensor_key(mlp_spec.out.key, 0)[len(layer) + 1:].split('.')[0]}"
        hooks.append(_capture(modules[mlp_module], store, "mlp_in"))
    if "final_norm" in norms:
        unembed = next(k for k in (*lay.unembed, "lm_head.weight") if k.removesuffix(".weight") in modules)
        hooks.append(_capture(modules[unembed.removesuffix(".weight")], store, "unembed_in"))
    runs = []
    with torch.no_grad():
        for token in (5, 9):
            model(input_ids=torch.tensor([[token]]))
            runs.append(dict(store))
    for h in hooks:
        h.remove()

    dx = (runs[0]["attn_in"] - runs[1]["attn_in"]).reshape(-1).double()
    dy = (runs[0]["attn_out"] - runs[1]["attn_out"]).reshape(-1).double()
    if "attn_in_residual" in runs[0]:
        dy -= (runs[0]["attn_in_residual"] - runs[1]["attn_in_residual"]).reshape(-1).double()
    pred = torch.einsum("he,hed->d", torch.einsum("hed,d->he", heads.v.double(), dx), heads.o.double())
    assert torch.allclose(pred, dy, rtol=1e-4, atol=1e-4 * float(dy.abs().max())), \
        f"OV circuit rebuilt from disk does not match {attn}: max err {float((pred - dy).abs().max()):.3g}"
    for run in runs:
        if "pre_norm_out" in run:
            assert torch.equal(run["pre_norm_out"], run["attn_in"]), "pre_norm is not what feeds the attention"
        elif lay.pre_norm is None:
            assert torch.equal(run["layer_in"], run["attn_in"]), "attention does not read the raw residual"
        parallel = torch.equal(run["mlp_in"], run["layer_in"])
        assert parallel == lay.parallel, f"registry says parallel={lay.parallel}, transformers does the opposite"
        residual_mid = mlp_spec.pre_norm is None or mlp_spec.pre_norm.weight is not None  # mlp_in is the stream
        if residual_mid and not lay.parallel:  # what the heads add to it: their output, through post_norm if any
            write = run["post_norm_out"] if "post_norm_out" in run else run["attn_out"]
            if "attn_in_residual" in run:
                write = write - run["attn_in_residual"]
            added = (run["mlp_in"] - run["layer_in"]).reshape(-1).double()
            cos = torch.nn.functional.cosine_similarity(added, write.reshape(-1).double(), dim=0)
            assert cos > 1 - 1e-5, f"the residual stream does not gain the (post-normed) attention output ({cos:.6f})"
        if "final_norm_out" in run:
            assert torch.equal(run["final_norm_out"], run["unembed_in"]), "final_norm does not feed the unembedding"
        if "post_norm_in" in run:
            assert torch.equal(run["post_norm_in"], run["attn_out"]), "post_norm does not read the attention output"
        for name, (norm, gain) in norms.items():
            _check_norm_kind(modules[tensor_key(str(norm.weight), 0).removesuffix(".weight")], norm.kind, gain,
                             run[f"{name}_in"], run[f"{name}_out"], name)


def _check_norm_kind(module: torch.nn.Module, kind: str, gain: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     name: str) -> None:
    """The norm's output is (its input, centred for a LayerNorm) times the gain the registry's kind gives (w or
    1 + w, read from the file), up to one positive scale per token and the bias."""
    bias = getattr(module, "bias", None)
    z = (y.reshape(-1, D).double() - (bias.detach().double() if isinstance(bias, torch.Tensor) else 0.0))
    z = z / gain.double()
    ref = x.reshape(-1, D).double()
    if kind.startswith("layernorm"):
        ref = ref - ref.mean(dim=-1, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(z, ref, dim=-1)
    assert bool((cos > 1 - 1e-6).all()), f"{name} is not a {kind} norm with the stored gain (cos {cos.min():.6f})"


def test_unknown_attention_layout_is_a_clear_gap(tmp_path, transformers) -> None:
    model = build("llama", {})
    model.save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from mmdetect.analysis.heads import scan_heads
    from mmdetect.errors import MMDetectError

    with pytest.raises(MMDetectError, match="deepseek_v3.*not supported: multi-head latent attention"):
        scan_heads(str(tmp_path))
