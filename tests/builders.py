"""The one place the tests get their checkpoints from: tiny real models, GGUF files, the shared trained models, and
reference cosines computed without mmdetect.

Session-scoped fixtures in ``conftest.py`` build each of these once (``llama``, ``gpt2``, ``llama_sharded``,
``planted_chain``, ``gguf_llama``, ``gguf_gemma3``, ``families``); a test that needs a variant calls the builder
itself. ``tiny.py`` builds one random model per transformers model type for the family tests.

Each model is a transformers model built from its config class with random weights and saved with
``save_pretrained``; some neurons are then planted with known answers:

* Llama (hidden 64, 2 layers, intermediate 128, RMSNorm gains drawn in [0.5, 2]): layer 1 neuron 7 has
  gate = up and down[:, 7] = -(g * up[7]), so its folded cos is exactly -1 (cos_gate_out -1, cos_gate_in +1).
* GPT-2 (n_embd 64, 2 layers, 256 neurons, Conv1D, LayerNorm gains in [0.5, 2]): layer 0 neuron 3 has
  c_proj[3, :] = -(g * c_fc[:, 3]), so after folding and centring its cos is exactly -1.

* The planted chain (``build_planted_chain``, for explain, heads and chains): a writer neuron, a deleter neuron that
  removes what it writes, and a head whose OV circuit is -c I on a 16-dimensional subspace.

``reference_*`` recompute the expected cosines in float64 from the saved file (read with the safetensors library or
the ``gguf`` package's own reader and dequantiser, not mmdetect's readers), straight from the conventions in
../shared/research/README.md.

The trained checkpoints in ``../shared/models`` are optional: a clone without ``../shared`` skips the tests that need
them (``needs_shared``). ``MMDETECT_SHARED`` points the lookup at another folder (or at a missing one, to check that
the suite passes without it).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

LLAMA_PLANT = (1, 7)   # (layer, neuron)
GPT2_PLANT = (0, 3)
D_MODEL = 64

ROOT = Path(__file__).resolve().parents[1]


# -- ../shared ------------------------------------------------------------------------------------------------------

def shared_root() -> Path:
    """The ``shared`` folder beside the clone (trained checkpoints in models/, research notes in research/), or
    ``$MMDETECT_SHARED`` when set."""
    env = os.environ.get("MMDETECT_SHARED")
    return Path(env).expanduser().resolve() if env else ROOT.parent / "shared"


SHARED = shared_root()
SHARED_MODELS = SHARED / "models"
REAL_LLAMAS = ("stories260K", "aidreams260K", "babyllama-tok105")   # trained Llamas in ../shared/models


def have_shared(*names: str) -> bool:
    """Whether every named checkpoint of ../shared/models is present (with its config.json)."""
    return all((SHARED_MODELS / name / "config.json").is_file() for name in names)


def needs_shared(*names: str) -> pytest.MarkDecorator:
    """Skip a test, with the reason, when a checkpoint it reads from ../shared/models is absent."""
    missing = [name for name in names if not have_shared(name)]
    return pytest.mark.skipif(bool(missing), reason=f"{SHARED_MODELS / (missing or [''])[0]} is not present "
                                                     f"(a clone without ../shared; MMDETECT_SHARED points elsewhere)")


@dataclass
class Tiny:
    """A saved checkpoint folder and the layer/neuron planted at cos = -1."""

    path: Path
    kind: str            # "llama" | "gpt2"
    plant: tuple[int, int]
    n_layers: int = 2

    @property
    def n_neurons(self) -> int:
        return 128 if self.kind == "llama" else 256

    def state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / "model.safetensors"))


def llama_config(**overrides: object) -> object:
    from transformers import LlamaConfig

    kw: dict[str, object] = {
        "hidden_size": D_MODEL, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "bos_token_id": 1,
        "eos_token_id": 2}
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_llama(path: Path, *, seed: int = 0, plant: tuple[int, int] | None = LLAMA_PLANT,
                nan_neuron: tuple[int, int] | None = None, zero_neuron: tuple[int, int] | None = None,
                **save_kwargs: object) -> Path:
    """Save a tiny random Llama to ``path``. nan_neuron gets a NaN up row; zero_neuron an all-zero down column."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
        if plant is not None:
            i, j = plant
            mlp = model.model.layers[i].mlp
            g = model.model.layers[i].post_attention_layernorm.weight
            mlp.gate_proj.weight[j] = mlp.up_proj.weight[j]
            mlp.down_proj.weight[:, j] = -(g * mlp.up_proj.weight[j])
        if nan_neuron is not None:
            i, j = nan_neuron
            model.model.layers[i].mlp.up_proj.weight[j] = float("nan")
        if zero_neuron is not None:
            i, j = zero_neuron
            model.model.layers[i].mlp.down_proj.weight[:, j] = 0.0
    model.save_pretrained(str(path), **save_kwargs)
    return path


def build_gpt2(path: Path, *, seed: int = 0, plant: tuple[int, int] | None = GPT2_PLANT) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_embd=D_MODEL, n_layer=2, n_head=4, vocab_size=128, n_positions=32,
                                       bos_token_id=1, eos_token_id=2))
    with torch.no_grad():
        for block in model.transformer.h:
            block.ln_2.weight.uniform_(0.5, 2.0)
            block.ln_2.bias.uniform_(-0.5, 0.5)
        if plant is not None:
            i, j = plant
            block = model.transformer.h[i]
            # Conv1D: c_fc.weight is [d, I] (neuron j = column j), c_proj.weight is [I, d] (neuron j = row j).
            block.mlp.c_proj.weight[j] = -(block.ln_2.weight * block.mlp.c_fc.weight[:, j])
    model.save_pretrained(str(path))
    return path


# The planted chain: layer-0 neuron CHAIN_WRITER writes v on every token, layer-1 neuron CHAIN_DELETER reads v and
# writes -0.05 v, and head CHAIN_HEAD (layer, head) has the OV circuit -c I on a 16-dimensional subspace.
CHAIN_WRITER, CHAIN_DELETER, CHAIN_HEAD, CHAIN_HEAD_DIM = 5, 17, (1, 2), 16


def build_planted_chain(path: Path, c: float = 1.0) -> Path:
    """A Llama (d_model 64, 2 layers, GQA 4 heads / 2 kv heads, vocab 256, no tokenizer) with known answers for
    explain, heads and chains.

    * every token embedding carries a shared direction u, and layer-0 neuron A = CHAIN_WRITER reads u (gate = up = u),
      so it fires on every token of any text and writes 0.05 * v (v orthogonal to u): the residual entering layer 1
      carries ~3 v;
    * layer-1 neuron B = CHAIN_DELETER reads v (gate = up = v) and writes -0.05 * v: it fires on that v and removes
      most of it;
    * layer-1 head 2 has W_V rows Q (16 orthonormal directions orthogonal to u and v) and W_O = -c Q^T, so its OV
      circuit is -c I on span(Q).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    d, dh = D_MODEL, CHAIN_HEAD_DIM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=dh, vocab_size=256, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
    u, v, q = basis[:, 0], basis[:, 1], basis[:, 2:2 + dh].T
    a, b = CHAIN_WRITER, CHAIN_DELETER
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(u)
        m0, m1 = model.model.layers[0].mlp, model.model.layers[1].mlp
        m0.gate_proj.weight[a] = u
        m0.up_proj.weight[a] = u
        m0.down_proj.weight[:, a] = 0.05 * v
        m1.gate_proj.weight[b] = v
        m1.up_proj.weight[b] = v
        m1.down_proj.weight[:, b] = -0.05 * v
        layer, h = CHAIN_HEAD
        attn = model.model.layers[layer].self_attn
        kv = h // 2
        attn.v_proj.weight[kv * dh:(kv + 1) * dh] = q
        attn.o_proj.weight[:, h * dh:(h + 1) * dh] = -c * q.T
    model.save_pretrained(path)
    return path


def write_bin(src: Path, dst: Path, shards: int = 1) -> Path:
    """Copy ``src`` (a safetensors folder) to ``dst`` as pytorch_model.bin, or ``shards`` files plus an index."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(str(src / "model.safetensors"))
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[s::shards]}
        torch.save(part, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


# -- independent reference cosines (float64) ------------------------------------------------------------------------

def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reference_llama(state: dict[str, torch.Tensor], layer: int, raw: bool = False) -> dict[str, np.ndarray]:
    """cos, cos_gate_out, cos_gate_in of one Llama layer, [n] each."""
    p = f"model.layers.{layer}."
    up = state[p + "mlp.up_proj.weight"].double().numpy()          # [I, d]
    gate = state[p + "mlp.gate_proj.weight"].double().numpy()      # [I, d]
    out = state[p + "mlp.down_proj.weight"].double().numpy().T     # [d, I] -> [I, d]
    if not raw:
        g = state[p + "post_attention_layernorm.weight"].double().numpy()
        up, gate = up * g, gate * g
    cos, gate_out, gate_in = _cos_rows(up, out), _cos_rows(gate, out), _cos_rows(gate, up)
    if not raw:
        sign = np.where(gate_in < 0, -1.0, 1.0)
        gate_out, gate_in = gate_out * sign, gate_in * sign
    return {"cos": cos, "cos_gate_out": gate_out, "cos_gate_in": gate_in}


def reference_gpt2(state: dict[str, torch.Tensor], layer: int, raw: bool = False) -> dict[str, np.ndarray]:
    p = f"transformer.h.{layer}."
    w_in = state[p + "mlp.c_fc.weight"].double().numpy().T         # Conv1D [d, I] -> [I, d]
    w_out = state[p + "mlp.c_proj.weight"].double().numpy()        # [I, d]
    if not raw:
        w_in = w_in * state[p + "ln_2.weight"].double().numpy()
        w_in = w_in - w_in.mean(1, keepdims=True)
        w_out = w_out - w_out.mean(1, keepdims=True)
    return {"cos": _cos_rows(w_in, w_out)}


def reference(model: Tiny, raw: bool = False) -> object:
    """A DataFrame (layer, neuron, cos[, cos_gate_out, cos_gate_in]) of every neuron, unranked."""
    import pandas as pd

    state = model.state()
    fn = reference_llama if model.kind == "llama" else reference_gpt2
    frames = []
    for layer in range(model.n_layers):
        cols = fn(state, layer, raw=raw)
        frames.append(pd.DataFrame({"layer": layer, "neuron": np.arange(model.n_neurons), **cols}))
    return pd.concat(frames, ignore_index=True)


def write_hub_cache(cache: Path, repo_id: str, src: Path, sha: str, files: tuple[str, ...] | None = None,
                    ref: str | None = "main") -> Path:
    """Lay out ``src``'s files as huggingface_hub caches a downloaded repo; returns the snapshot folder.

    <cache>/models--<owner>--<name>/{blobs/<hash>, snapshots/<sha>/<file> -> ../../blobs/<hash>, refs/<ref> = sha}
    """
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in files or tuple(sorted(p.name for p in src.iterdir() if p.is_file())):
        data = (src / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot


# -- GGUF -----------------------------------------------------------------------------------------------------------

GGUF_PLANT = (1, 5)


@dataclass
class GGUFModel:
    """A GGUF file and its MLP tensors as numpy float32 arrays, dequantised as a reader should see them.

    ``up``/``gate`` are [I, d] and ``down`` [d, I] (numpy order; ggml's ne is the reverse), per layer.
    """

    path: Path
    arch: str
    up: list[np.ndarray]
    gate: list[np.ndarray]
    down: list[np.ndarray]
    pre: list[np.ndarray]
    post: list[np.ndarray] | None


def _pow2_gains(rng: np.random.Generator, d: int) -> np.ndarray:
    """Gains in {1/4, ..., 4}: multiplying or dividing by them is exact in float32, so a planted -1 stays exact."""
    return (2.0 ** rng.integers(-2, 3, d)).astype(np.float32)


def write_gguf(path: Path, arch: str = "llama", *, d: int = 64, n_mlp: int = 96, n_layers: int = 2,
               seed: int = 0, name: str | None = None) -> GGUFModel:
    """A small GGUF with gated MLPs and RMSNorm gains; ``gemma3`` adds post_ffw_norm after the MLP. ``name``: its
    ``general.name``.

    Layer 0 is all F32. In layer 1, up is Q8_0 and gate F16, so the planted neuron (GGUF_PLANT) runs through the
    dequantiser: its down column is -(g_pre * deq(up_j)) / g_post, so its folded cos is exactly -1.
    """
    import gguf
    from gguf.quants import dequantize, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(n_mlp)
    writer.add_context_length(64)
    writer.add_head_count(4)
    model = GGUFModel(path, arch, [], [], [], [], [] if arch == "gemma3" else None)
    writer.add_tensor("token_embd.weight", rng.normal(0, 0.02, (128, d)).astype(np.float32))
    for i in range(n_layers):
        up = rng.normal(0, 0.02, (n_mlp, d)).astype(np.float32)
        gate = rng.normal(0, 0.02, (n_mlp, d)).astype(np.float32)
        down = rng.normal(0, 0.02, (d, n_mlp)).astype(np.float32)
        pre = _pow2_gains(rng, d)
        post = _pow2_gains(rng, d) if arch == "gemma3" else np.ones(d, dtype=np.float32)
        quantised = i == 1
        if quantised:
            up_q = quantize(up, q8)
            up = dequantize(up_q, q8).astype(np.float32)
            gate = gate.astype(np.float16).astype(np.float32)
            j = GGUF_PLANT[1]
            down[:, j] = -(pre * up[j]) / post
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", pre)
        if arch == "gemma3":
            writer.add_tensor(f"blk.{i}.post_ffw_norm.weight", post)
            model.post.append(post)
        if quantised:
            writer.add_tensor(f"blk.{i}.ffn_up.weight", up_q, raw_dtype=q8)
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", gate.astype(np.float16))
        else:
            writer.add_tensor(f"blk.{i}.ffn_up.weight", up)
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", gate)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", down)
        model.up.append(up)
        model.gate.append(gate)
        model.down.append(down)
        model.pre.append(pre)
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def reference_gguf(model: GGUFModel, layer: int, raw: bool = False) -> dict[str, np.ndarray]:
    up = model.up[layer].astype(np.float64)
    gate = model.gate[layer].astype(np.float64)
    out = model.down[layer].astype(np.float64).T
    if not raw:
        up, gate = up * model.pre[layer], gate * model.pre[layer]
        if model.post is not None:
            out = out * model.post[layer]
    cos, gate_out, gate_in = _cos_rows(up, out), _cos_rows(gate, out), _cos_rows(gate, up)
    if not raw:
        sign = np.where(gate_in < 0, -1.0, 1.0)
        gate_out, gate_in = gate_out * sign, gate_in * sign
    return {"cos": cos, "cos_gate_out": gate_out, "cos_gate_in": gate_in}


# -- peer checkpoints (TransformerLens comparison) -------------------------------------------------------------------

# Model types whose norms scale by 1 + w (Gemma style): their stored w is drawn so that 1 + w lies in [0.3, 3].
OFFSET_NORM_TYPES = {"gemma", "gemma2", "gemma3_text", "nemotron"}
PEER_EXTRA: dict[str, dict] = {"opt": {"word_embed_proj_dim": D_MODEL}}


def build_peer(model_type: str, path: Path, *, seed: int = 0, vocab: int = 128, extra: dict | None = None) -> Path:
    """A tiny random ``model_type`` checkpoint in which folding and centring change every cosine.

    d_model 64, 2 layers (``tiny.tiny_config``). Matrices (each matrix of a stacked 3-D tensor) are N(0, 1/fan_in)
    plus a random offset per row and per column, so every read and write vector has a nonzero mean, which centring
    removes; 1-D ``*.weight`` tensors (norm gains) are uniform in [0.3, 3] (the stored w in [-0.7, 2] for 1 + w
    norms); biases N(0, 0.5). ``extra``: config overrides.
    """
    import warnings

    from tiny import build_model  # (importing tiny sets HF_HUB_OFFLINE)

    extra = {"vocab_size": vocab, **PEER_EXTRA.get(model_type, {}), **(extra or {})}
    model = build_model(model_type, extra, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    offset = 1.0 if model_type in OFFSET_NORM_TYPES else 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                std = p.shape[-1] ** -0.5
                *lead, rows, cols = p.shape
                w = rand(*p.shape) + rand(*lead, rows, 1) + rand(*lead, 1, cols)
                p.copy_(w * std)
            elif name.endswith("bias"):
                p.copy_(rand(*p.shape) * 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=gen) * 2.7 + 0.3 - offset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
    write_tokenizer(path, vocab)
    return path


def write_tokenizer(path: Path, vocab: int, prefix: str = "t") -> None:
    """A word-level ``tokenizer.json`` of ``vocab`` tokens (``<pad> <s> </s> <unk>``, then ``{prefix}0``, ...), so that
    loaders that insist on a tokenizer (TransformerLens loads one from the model folder; for some model types
    transformers has no fallback) find one offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"{prefix}{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))


def plant_orthogonal_gate(path: Path, layer: int, neuron: int) -> Path:
    """In a Llama-layout checkpoint, give one neuron a gate and an up row with disjoint supports (gate on the first
    half of d_model, up on the second), so that gate . up is exactly 0 before and after an RMSNorm gain is folded in."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(str(file))
    p = f"model.layers.{layer}.mlp."
    half = state[p + "gate_proj.weight"].shape[1] // 2
    state[p + "gate_proj.weight"][neuron, half:] = 0.0
    state[p + "up_proj.weight"][neuron, :half] = 0.0
    save_file(state, str(file), metadata={"format": "pt"})
    return path


def write_gguf_from_llama(src: Path, path: Path, qtype: str | None = None) -> Path:
    """The Llama checkpoint in folder ``src`` as one F32 GGUF file with llama.cpp's tensor names and q/k row order
    (``convert_hf_to_gguf.py``'s permutation, which transformers' GGUF loader undoes): the same weights, for checking
    the GGUF route against the safetensors route. A SentencePiece-style BPE ``tokenizer.json`` (the shared
    stories260K) goes in as a ``llama`` vocabulary with its merges, so transformers can build the tokenizer too.
    With ``qtype`` (``"Q8_0"``, ...), the layers' weight matrices whose rows are whole blocks of it are stored
    quantised, through gguf-py's own quantiser."""
    import gguf
    from gguf.quants import quantize
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(str(src / "model.safetensors")).items()}
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    d = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or d // n_head

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(src.name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(d)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_vocab_size(cfg["vocab_size"])
    tok_file = src / "tokenizer.json"
    if tok_file.exists():
        tok = json.loads(tok_file.read_text())
        vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
        special = {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
        types = [gguf.TokenType.CONTROL if piece in special else
                 gguf.TokenType.BYTE if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6 else
                 gguf.TokenType.NORMAL for piece, _id in vocab]
        writer.add_tokenizer_model("llama")
        writer.add_token_list([piece for piece, _id in vocab])
        writer.add_token_scores([0.0] * len(vocab))
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])])
        writer.add_bos_token_id(cfg.get("bos_token_id", 1))
        writer.add_eos_token_id(cfg.get("eos_token_id", 2))
        writer.add_unk_token_id(0)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, name in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if name == "attn_q":
                w = permute(w, n_head)
            elif name == "attn_k":
                w = permute(w, n_kv)
            w = np.ascontiguousarray(w)
            q = gguf.GGMLQuantizationType[qtype] if qtype else None
            if q is not None and w.ndim == 2 and w.shape[1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
                writer.add_tensor(f"blk.{i}.{name}.weight", quantize(w, q), raw_dtype=q)
            else:
                writer.add_tensor(f"blk.{i}.{name}.weight", w)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if "lm_head.weight" in state:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str) -> Any:
    """One ``gguf.GGUFReader`` per file and session: opening one parses the whole vocabulary (seconds for a real
    model)."""
    import gguf

    return gguf.GGUFReader(path)


def gguf_file_cosines(path: Path | str, raw: bool = False) -> list[np.ndarray]:
    """cos(up_j, down_j) of every neuron of every layer of a llama.cpp GGUF with a gated MLP: one [n_mlp] float64
    array per layer.

    Read and dequantised by the ``gguf`` package (``GGUFReader``, ``gguf.quants.dequantize``), not by mmdetect.
    Folded: up rows times ``ffn_norm`` and down columns times ``post_ffw_norm`` where the file has one. llama.cpp's
    converter stores Gemma's effective gains (1 + w) in the file already, so the gains are used as stored.
    """
    from gguf.quants import dequantize

    tensors = {t.name: t for t in _gguf_reader(str(path)).tensors}

    def read(layer: int, name: str) -> np.ndarray | None:
        t = tensors.get(f"blk.{layer}.{name}.weight")
        return None if t is None else dequantize(t.data, t.tensor_type).astype(np.float64)

    out = []
    layer = 0
    while f"blk.{layer}.ffn_up.weight" in tensors:
        up = read(layer, "ffn_up")                    # numpy [n_mlp, d] (ggml ne = [d, n_mlp])
        down = read(layer, "ffn_down").T              # [d, n_mlp] -> [n_mlp, d]
        if not raw:
            up = up * read(layer, "ffn_norm")
            post = read(layer, "post_ffw_norm")
            if post is not None:
                down = down * post
        out.append(_cos_rows(up, down))
        layer += 1
    return out
