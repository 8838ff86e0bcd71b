"""Tiny random checkpoints for every registry family, built from transformers config classes.

The shrinking rules are adapted from the architecture survey (``shared/research/survey.py``), which built every
model type in the registry with them; they are copied here so the tests do not depend on the research notes.
Sizes are chosen so that every dimension is distinct and a transposed tensor can never pass for the right one:
d_model 64, dense d_mlp 160, MoE expert d_mlp 96, shared-expert d_mlp 112, 4 experts top-2, 2 layers (the first one
dense where the config supports ``first_k_dense_replace``; more when a hybrid model's ``layer_types`` pattern needs
them to show every kind of layer).
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

H, I_DENSE, I_MOE, I_SHARED, VOCAB, NLAYERS, NHEADS, NKV, HEADDIM, NEXP, TOPK = 64, 160, 96, 112, 512, 2, 4, 2, 16, 4, 2

# Config fields that set a size, whichever name a model type gives them.
SIZE_FIELDS: dict[str, Any] = {
    "hidden_size": H, "n_embd": H, "d_model": H, "emb_dim": H,
    "intermediate_size": I_DENSE, "n_inner": I_DENSE, "ffn_dim": I_DENSE, "ffn_hidden_size": I_DENSE,
    "decoder_ffn_dim": I_DENSE, "encoder_ffn_dim": I_DENSE, "d_inner": I_DENSE, "feed_forward_size": I_DENSE,
    "intermediate_size_mlp": I_DENSE, "dense_intermediate_size": I_DENSE, "d_ff": I_DENSE,
    "moe_intermediate_size": I_MOE, "expert_ffn_hidden_size": I_MOE, "moe_ffn_hidden_size": I_MOE,
    "expert_intermediate_size": I_MOE,
    "shared_expert_intermediate_size": I_SHARED, "moe_shared_expert_intermediate_size": I_SHARED,
    "shared_intermediate_size": I_SHARED, "shared_experts_intermediate_size": I_SHARED,
    "num_hidden_layers": NLAYERS, "n_layer": NLAYERS, "num_layers": NLAYERS, "n_layers": NLAYERS,
    "decoder_layers": NLAYERS, "encoder_layers": NLAYERS,
    "num_attention_heads": NHEADS, "n_head": NHEADS, "num_heads": NHEADS, "n_heads": NHEADS,
    "decoder_attention_heads": NHEADS, "encoder_attention_heads": NHEADS, "attention_heads": NHEADS,
    "num_key_value_heads": NKV, "head_dim": HEADDIM, "kv_channels": HEADDIM, "rotary_dim": 8,
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "max_target_positions": 256, "max_source_positions": 256,
    "num_experts": NEXP, "n_routed_experts": NEXP, "num_local_experts": NEXP, "moe_num_experts": NEXP,
    "num_experts_per_tok": TOPK, "moe_topk": TOPK, "moe_k": TOPK, "moe_top_k": TOPK, "num_experts_per_token": TOPK,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    # attention variants (MLA, sparse, linear, SSM): only to keep the model tiny
    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "mamba_d_state": 8, "ssm_state_size": 8, "state_size": 8, "mamba_n_heads": 8, "mamba_num_heads": 8,
    "mamba_head_dim": 16, "mamba_d_head": 16, "mamba_chunk_size": 16, "chunk_size": 16, "n_mamba_heads": 8,
    "sliding_window": 32, "attention_chunk_size": 32, "window_size": 32,
}
# Applied only when the default is set, so that e.g. q_lora_rank=None stays None.
SIZE_FIELDS_IF_SET = {"q_lora_rank": 32, "n_shared_experts": 1, "num_shared_experts": 1}
TOKEN_FIELDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
                "sep_token_id": 3, "cls_token_id": 4}
# Per-type overrides (most found necessary by the survey).
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma3n_text": {"num_kv_shared_layers": 0, "laurel_rank": 8, "altup_num_inputs": 2,
                     "activation_sparsity_pattern": [0.0, 0.0]},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "falcon": {"num_kv_heads": NKV},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2, "expert_layer_offset": 1},
    "dbrx": {"attn_config": {"kv_n_heads": NKV, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": I_MOE, "moe_num_experts": NEXP, "moe_top_k": TOPK}},
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    # mrope_section sums to head_dim / 2: transformers 5.20's default [22, 22, 20] does not fit head_dim 16.
    "cohere_compass_text": {"layer_types": ["full_attention", "full_attention"],
                            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [2, 2, 4]}}},
    "zaya": {"num_experts_per_tok": 1},
    "dots3_note_text": {"num_key_value_heads": NHEADS},
    "falcon_h1": {"mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16},
    # Attention sizes that are not under a common name: at their defaults these models were the slowest to build
    # and trace by far (Kimi's linear attention 32 x 128, Inkling's sliding-window attention 64 x 128, RoC-BERT's
    # 24858-row shape embedding, Dots3's layer-2 MLA with rank 1024).
    "inkling_text": {"swa_num_attention_heads": NHEADS, "swa_num_key_value_heads": NKV, "swa_head_dim": HEADDIM},
    "inkling2_text": {"unpadded_vocab_size": VOCAB, "swa_num_attention_heads": NHEADS,
                      "swa_num_key_value_heads": NKV, "swa_head_dim": HEADDIM},
    "inkling2_loop_text": {"unpadded_vocab_size": VOCAB, "swa_num_attention_heads": NHEADS,
                           "swa_num_key_value_heads": NKV, "swa_head_dim": HEADDIM},
    "kimi_linear": {"linear_num_heads": NHEADS, "linear_head_dim": HEADDIM},
    "roc_bert": {"pronunciation_embed_dim": 32, "pronunciation_vocab_size": 64, "shape_embed_dim": 32,
                 "shape_vocab_size": 64},
    "deepseek_v32": {"num_key_value_heads": NHEADS}, "glm_moe_dsa": {"num_key_value_heads": NHEADS},
    # Two zero-compute experts instead of 256, so that tokens reach the real ones.
    "longcat_flash": {"num_key_value_heads": NHEADS, "head_dim": 8, "zero_expert_num": 2},
    "ctrl": {"dff": I_DENSE},
    "prophetnet": {"num_encoder_layers": NLAYERS, "num_decoder_layers": NLAYERS},
}

# Keyword arguments that are not config fields (``__post_init__`` consumes them), passed as they are.
INIT_KWARGS: dict[str, dict[str, Any]] = {
    "dots3_note_text": {"swa_num_attention_heads": NHEADS, "swa_num_key_value_heads": NHEADS, "swa_q_lora_rank": 32,
                        "swa_kv_lora_rank": 16, "swa_head_dim": HEADDIM, "swa_qk_nope_head_dim": 8,
                        "swa_v_head_dim": HEADDIM},
}


# Configurations beyond each model type's defaults that change where it keeps MLP tensors or norms: test case id ->
# (model type, config overrides). The first ones are the registry's `variants`, as measured by the survey.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt_neox+use_parallel_residual=False": ("gpt_neox", {"use_parallel_residual": False}),
    "falcon+new_decoder_architecture=True": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": NKV}),
    "falcon+parallel_attn=False": ("falcon", {"parallel_attn": False}),
    "opt+do_layer_norm_before=False": ("opt", {"do_layer_norm_before": False}),
    "stablelm+use_parallel_residual=True": ("stablelm", {"use_parallel_residual": True}),
    "gemma4_text+enable_moe_block=True": ("gemma4_text", {"enable_moe_block": True, "num_experts": NEXP,
                                                          "top_k_experts": TOPK, "moe_intermediate_size": I_MOE}),
    "phi+qk_layernorm=True": ("phi", {"qk_layernorm": True}),
    # MoE model types whose configs can make layers dense (their defaults never do): Llama 4 Maverick interleaves
    # dense and MoE layers.
    "llama4_text+interleave_moe_layer_step=2": ("llama4_text", {"interleave_moe_layer_step": 2}),
    "qwen2_moe+mlp_only_layers=0": ("qwen2_moe", {"mlp_only_layers": [0]}),
    "qwen3_moe+mlp_only_layers=0": ("qwen3_moe", {"mlp_only_layers": [0]}),
    "qwen3_next+mlp_only_layers=0": ("qwen3_next", {"mlp_only_layers": [0]}),
    "cohere2_moe+dense_layer_0": ("cohere2_moe", {"mlp_layer_types": ["dense", "sparse"]}),
    "inkling_text+dense_layer_0": ("inkling_text", {"mlp_layer_types": ["dense", "sparse"]}),
    "mellum+dense_layer_0": ("mellum", {"mlp_layer_types": ["dense", "sparse"]}),
    "minimax_m3_vl_text+dense_layer_0": ("minimax_m3_vl_text", {"mlp_layer_types": ["dense", "sparse"],
                                                                "dense_intermediate_size": I_DENSE}),
}
SURVEYED = "5.24.0"   # the transformers version the registry's layouts were measured on
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    try:
        return {f.name: f for f in dataclasses.fields(cls)}
    except TypeError:
        return {}


def tiny_config(model_type: str, extra: dict[str, Any] | None = None) -> Any:
    """The model type's config class with every size field it has shrunk (and ``extra`` applied last)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = _fields(cls)
    kw: dict[str, Any] = {}
    for name, val in SIZE_FIELDS.items():
        if name not in fields:
            continue
        default = fields[name].default
        if isinstance(default, list) or fields[name].default_factory is not dataclasses.MISSING:
            continue  # per-layer lists keep their defaults
        if name in ("sliding_window", "attention_chunk_size", "window_size") and default is None:
            continue
        kw[name] = val
    for name, val in SIZE_FIELDS_IF_SET.items():
        if name in fields and fields[name].default not in (None, 0):
            kw[name] = val
    for name, val in TOKEN_FIELDS.items():
        if name in fields and fields[name].default is not None:
            kw[name] = [val] if isinstance(fields[name].default, list) else val
    kw.update(OVERRIDES.get(model_type, {}))
    kw.update(extra or {})
    if fields:
        kw = {k: v for k, v in kw.items() if k in fields}
    if "layer_types" in fields and "layer_types" not in kw:
        kw.update(_layers_for_every_type(cls, kw))
    return cls(**kw, **INIT_KWARGS.get(model_type, {}))


def _layers_for_every_type(cls: type, kw: dict[str, Any]) -> dict[str, int]:
    """Enough layers for the default ``layer_types`` pattern to contain every layer type (2 unless a hybrid model
    puts e.g. its full-attention layer only every 4th layer), as layer-count config fields."""
    from huggingface_hub.errors import StrictDataclassError

    def types(n: int) -> set[str] | None:
        try:
            return set(cls(**{**kw, **{k: n for k in LAYER_COUNT_FIELDS if k in kw}}).layer_types or [])
        except (ValueError, StrictDataclassError):  # a pattern that needs more layers than n, or a per-layer list
            return None

    every = types(8)
    n = next((n for n in range(NLAYERS, 9) if every is not None and types(n) == every), NLAYERS)
    return {k: n for k in LAYER_COUNT_FIELDS if k in kw}


def randomise(model: Any, seed: int) -> None:
    """Give every floating parameter distinct random values, 1-D norm gains included (so folding matters).

    Matrices get N(0, 1/fan_in) like a real init; 1-D tensors (norm gains and biases) get N(0, 1), gains of both
    signs and very different sizes, which is what makes the folded and raw conventions disagree.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            std = 1.0 if p.dim() < 2 else p.shape[-1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def build_model(model_type: str, extra: dict[str, Any] | None = None, seed: int = 0,
                init: Callable[[Any, int], None] | None = None) -> Any:
    """A tiny random float32 ``*ForCausalLM`` for ``model_type``; ``init(model, seed)`` fills the parameters
    (``randomise`` by default)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    model.eval()
    (init or randomise)(model, seed)
    return model


def require_model_type(model_type: str) -> None:
    """Skip when the installed transformers predates the model type (Python 3.10 gets transformers 5.20 at most;
    the registry was surveyed on 5.24). On 5.24 or later a missing model type is a failure, not a skip."""
    import transformers
    from packaging.version import Version
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and Version(transformers.__version__) < Version(SURVEYED):
        pytest.skip(f"transformers {transformers.__version__} has no model type {model_type!r} (added before "
                    f"{SURVEYED}, which the registry was surveyed on)")


def save(model: Any, dest: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(dest)
    return dest


def load(folder: Path) -> Any:
    """The slow path: the full transformers model, as a user of transformers would load it.

    MoE experts run transformers' eager loop (the reference implementation) rather than the default ``grouped_mm``,
    whose CPU fallback takes ~20 ms per tiny call and made the MoE families the slowest tests by far.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()


def case_spec(case: str) -> tuple[str, dict[str, Any] | None]:
    """A family test case id -> (model type, config overrides): a model type, or a key of ``VARIANTS``."""
    return VARIANTS.get(case, (case, None))


class Families:
    """Tiny random checkpoints per case (``case_spec``), each built and saved once per session.

    ``folder(case)``: the saved checkpoint. ``model(case)`` / ``units(case)``: the model transformers loads from that
    folder and the slow path's MLPs in it (``slowpath.find_units``; the units are views of the model's parameters).
    The last ``keep`` loaded models stay in memory (some are large, e.g. RoC-BERT's embeddings); conftest.py runs the
    family tests case by case, so each is loaded and traced once. A test that writes into a cached model must put
    the values back. ``init`` replaces ``randomise`` for callers that need another parameter fill.
    """

    def __init__(self, root: Path, keep: int = 4, init: Callable[[Any, int], None] | None = None) -> None:
        self.root, self.keep, self.init = root, keep, init
        self._folders: dict[str, Path] = {}
        self._loaded: OrderedDict[str, tuple[Any, list[Any]]] = OrderedDict()

    def folder(self, case: str) -> Path:
        if case not in self._folders:
            model_type, extra = case_spec(case)
            require_model_type(model_type)
            folder = self.root / re.sub(r"\W", "_", case)
            save(build_model(model_type, extra, init=self.init), folder)
            self._folders[case] = folder
        return self._folders[case]

    def _load(self, case: str) -> tuple[Any, list[Any]]:
        import slowpath

        if case in self._loaded:
            self._loaded.move_to_end(case)
        else:
            model = load(self.folder(case))
            self._loaded[case] = (model, slowpath.find_units(model))
            while len(self._loaded) > self.keep:
                self._loaded.popitem(last=False)
        return self._loaded[case]

    def model(self, case: str) -> Any:
        return self._load(case)[0]

    def units(self, case: str) -> list[Any]:
        return self._load(case)[1]
