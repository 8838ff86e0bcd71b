"""Synthetic checkpoints with real shapes and random weights, written tensor by tensor.

Generation streams: each tensor is created, written and dropped, so a 32 GB checkpoint is generated with a few
hundred MB of memory. The safetensors header is computed first from the shapes, then the data follows in order.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass
class Shape:
    """A Llama/Mixtral-style decoder: the tensors transformers expects, so the peer route can load it."""

    name: str
    hidden: int
    mlp: int
    layers: int
    vocab: int = 32000
    heads: int = 32
    kv_heads: int = 4
    experts: int = 0           # 0 = dense Llama; > 0 = Mixtral-style per-expert w1/w2/w3
    shard_bytes: int = 0       # 0 = one file
    extra: dict = field(default_factory=dict)
    arch: str = "llama"        # a dense model type with Llama's tensor names: "llama" or "qwen2"
    qkv_bias: bool = False     # q/k/v projections with biases (Qwen2)
    tied: bool = False         # no lm_head.weight: the unembedding is the token embedding
    plant: tuple[int, int] = (0, 0)  # (deleter neurons per layer, a deleter head every N-th layer; 0 = none)

    @property
    def model_type(self) -> str:
        return "mixtral" if self.experts else self.arch

    def config(self) -> dict:
        names = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        cfg = {
            "architectures": [names[self.model_type]],
            "model_type": self.model_type, "hidden_size": self.hidden, "intermediate_size": self.mlp,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096, "tie_word_embeddings": self.tied, "torch_dtype": "bfloat16",
            "hidden_act": "silu",
        }
        if self.experts:
            cfg.update(num_local_experts=self.experts, num_experts_per_tok=2)
        return {**cfg, **self.extra}

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        d, head_dim = self.hidden, self.hidden // self.heads
        yield "model.embed_tokens.weight", (self.vocab, d)
        for i in range(self.layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (d,)
            yield f"{p}.self_attn.q_proj.weight", (d, d)
            yield f"{p}.self_attn.k_proj.weight", (self.kv_heads * head_dim, d)
            yield f"{p}.self_attn.v_proj.weight", (self.kv_heads * head_dim, d)
            if self.qkv_bias:
                yield f"{p}.self_attn.q_proj.bias", (d,)
                yield f"{p}.self_attn.k_proj.bias", (self.kv_heads * head_dim,)
                yield f"{p}.self_attn.v_proj.bias", (self.kv_heads * head_dim,)
            yield f"{p}.self_attn.o_proj.weight", (d, d)
            yield f"{p}.post_attention_layernorm.weight", (d,)
            if self.experts:
                yield f"{p}.block_sparse_moe.gate.weight", (self.experts, d)
                for e in range(self.experts):
                    q = f"{p}.block_sparse_moe.experts.{e}"
                    yield f"{q}.w1.weight", (self.mlp, d)
                    yield f"{q}.w2.weight", (d, self.mlp)
                    yield f"{q}.w3.weight", (self.mlp, d)
            else:
                yield f"{p}.mlp.gate_proj.weight", (self.mlp, d)
                yield f"{p}.mlp.up_proj.weight", (self.mlp, d)
                yield f"{p}.mlp.down_proj.weight", (d, self.mlp)
        yield "model.norm.weight", (d,)
        if not self.tied:
            yield "lm_head.weight", (self.vocab, d)

    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if name.endswith(".bias"):
        return (0.1 * torch.randn(shape, generator=gen)).to(dtype)
    if len(shape) == 1:  # norm gains around 1
        return (1 + 0.1 * torch.randn(shape, generator=gen)).to(dtype)
    return (torch.randn(shape, generator=gen) * (1 / math.sqrt(shape[-1]))).to(dtype)


class Planter:
    """Deleters planted into random weights, so that chains and heads have work of a real model's kind.

    Random weights have no neuron with cos <= -0.5 and no head with copying <= -0.5; a real model has some. In every
    layer, ``plant[0]`` neurons get a down column at a chosen cosine in [-0.95, -0.5] with their folded read
    (gain * up row); in every ``plant[1]``-th layer one query head gets an output that writes back mostly the negative
    of its folded value rows (copying about -0.9). The rest of each tensor stays as drawn.
    """

    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape = shape
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.seen: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        n_neurons, every = self.shape.plant
        if not name.startswith("model.layers.") or not (n_neurons or every):
            return t
        layer, suffix = int(name.split(".")[2]), name.split(".", 3)[3]
        self.seen[suffix] = t.float()
        if suffix == "mlp.down_proj.weight" and n_neurons:
            r = self.seen["mlp.up_proj.weight"] * self.seen["post_attention_layernorm.weight"]   # [I, d]
            w = t.float().clone()                                                                 # [d, I]
            for j in torch.randperm(w.shape[1], generator=self.gen)[:n_neurons].tolist():
                c = -0.5 - 0.45 * float(torch.rand((), generator=self.gen))
                rhat = r[j] / r[j].norm()
                perp = w[:, j] - (w[:, j] @ rhat) * rhat
                w[:, j] = w[:, j].norm() * (c * rhat + math.sqrt(1 - c * c) * perp / perp.norm())
            return w
        if suffix == "self_attn.o_proj.weight" and every and layer % every == every - 1:
            s, dh = self.shape, self.shape.hidden // self.shape.heads
            h = layer % s.heads
            k = h // (s.heads // s.kv_heads)
            v = self.seen["self_attn.v_proj.weight"][k * dh:(k + 1) * dh] * self.seen["input_layernorm.weight"]
            w = t.float().clone()                                                                 # [d, H*dh]
            cols = w[:, h * dh:(h + 1) * dh]
            w[:, h * dh:(h + 1) * dh] = 0.3 * cols - 0.7 * v.T * (cols.norm() / v.norm())
            return w
        return t


def write_checkpoint(shape: Shape, folder: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write config.json and the weights (one file, or shards plus an index) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = math.prod(s) * itemsize
        if shape.shard_bytes and size and size + nbytes > shape.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    plant = Planter(shape, seed)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, tensors in zip(names, shards):
        header, offset = {}, 0
        for name, s in tensors:
            nbytes = math.prod(s) * itemsize
            header[name] = {"dtype": DTYPES[dtype], "shape": list(s), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, s in tensors:
                fh.write(plant(name, _random(name, s, gen, dtype)).to(dtype).view(torch.uint8).numpy().tobytes())
    if len(names) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=1))
    return folder


SHAPES = {
    # TinyLlama-1.1B: the reference point (2.2 GB bf16, one file).
    "tinyllama": Shape("tinyllama", hidden=2048, mlp=5632, layers=22, heads=32, kv_heads=4),
    # Llama-3-8B, two layers' worth (the per-layer cost is extrapolated to 32 layers in the report).
    "llama3-8b-2l": Shape("llama3-8b-2l", hidden=4096, mlp=14336, layers=2, vocab=8192, heads=32, kv_heads=8),
    # Mixtral-like MoE: 8 experts per layer, two layers.
    "mixtral-2l": Shape("mixtral-2l", hidden=4096, mlp=14336, layers=2, vocab=8192, heads=32, kv_heads=8,
                        experts=8, shard_bytes=4 << 30),
    # Qwen2-1.5B: the shape of issue 13's analysis benchmark (GQA 12/2 heads, a 151,936-token tied vocabulary,
    # q/k/v biases), 3.1 GB bf16 in one file, with 16 deleter neurons per layer and a deleter head in every other
    # layer planted (448 neurons, 14 heads) so that chains has deleters to explain.
    "qwen2-1.5b": Shape("qwen2-1.5b", hidden=1536, mlp=8960, layers=28, vocab=151936, heads=12, kv_heads=2,
                        arch="qwen2", qkv_bias=True, tied=True, plant=(16, 2),
                        extra={"rms_norm_eps": 1e-6, "rope_theta": 1e6}),
    # The corpus pass's benchmark shapes (bench/activations.py): Qwen2-0.5B and Llama-3.2-1B, tied vocabularies.
    "qwen2-0.5b": Shape("qwen2-0.5b", hidden=896, mlp=4864, layers=24, vocab=151936, heads=14, kv_heads=2,
                        arch="qwen2", qkv_bias=True, tied=True, extra={"rms_norm_eps": 1e-6, "rope_theta": 1e6}),
    "llama-1b": Shape("llama-1b", hidden=2048, mlp=8192, layers=16, vocab=128256, heads=32, kv_heads=8, tied=True,
                      extra={"rope_theta": 5e5}),
    # Bigger than this machine's 24 GiB of memory: ~16B parameters, 32 GB bf16 in 4 GB shards.
    "big-16b": Shape("big-16b", hidden=5120, mlp=17920, layers=46, vocab=32000, heads=40, kv_heads=8,
                     shard_bytes=4 << 30),
}


if __name__ == "__main__":  # python -m bench.generate NAME FOLDER (run.py calls it so its own RSS stays small)
    import sys

    write_checkpoint(SHAPES[sys.argv[1]], Path(sys.argv[2]))
