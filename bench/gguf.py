"""A generated Llama/Qwen2 checkpoint as a llama.cpp-style GGUF file, quantised as llama.cpp's Q4 files are.

Issue 13 measured the analysis commands on a real Qwen2-1.5B in GGUF (Q4_K_M), where reading a weight means
dequantising it. This writes the same weights as ``bench.generate`` made them, with llama.cpp's tensor names: the 2-D
attention and MLP weights in Q4_0 (the ``gguf`` package quantises Q4_0 but not Q4_K; both dequantise blockwise along
the rows), the token embedding in Q8_0, norms and biases in F32. No tokenizer: token labels fall back to ids.

    python -m bench.gguf FOLDER OUT.gguf       # bench/run.py calls it in a child process
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a Hugging Face Llama/Qwen2 tensor name."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)                 # model.layers.{i}.{module}.{weight|bias}
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{NAMES[module]}.{kind}"


def write_gguf(folder: Path, out: Path, weights: str = "Q4_0", embedding: str = "Q8_0") -> Path:
    """``folder`` (config.json and safetensors written by ``bench.generate``) as one GGUF file at ``out``.

    Tensors are read, quantised and written one at a time (the writer keeps the quantised bytes until the end:
    about 0.6 bytes per parameter)."""
    import gguf
    import torch
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg.get("model_type", "llama")
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(folder.name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_vocab_size(cfg["vocab_size"])
    qw, qe = gguf.GGMLQuantizationType[weights], gguf.GGMLQuantizationType[embedding]
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf in f:
                t = f.get_tensor(hf).to(torch.float32).numpy()
                name = gguf_name(hf)
                qtype = qe if name == "token_embd.weight" else qw if t.ndim == 2 else None
                if qtype is None:
                    writer.add_tensor(name, np.ascontiguousarray(t))
                else:
                    writer.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


if __name__ == "__main__":
    write_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
