"""SAELens-format transcoders on disk: ``cfg.json`` + ``sae_weights.safetensors``, read with json and the safetensors
header checks only (no sae-lens import).

A transcoder folder holds ``cfg.json`` (SAELens 6 writes ``d_in``, ``d_sae``, ``d_out``, ``architecture`` and a
``metadata`` object with ``model_name``, ``hook_name``, ``hook_name_out``, ``neuronpedia_id``; older and converted
configs carry those keys at the top level) and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]`` and, for the skip and JumpReLU variants, ``W_skip
[d_out, d_in]`` and ``threshold [d_sae]``. A folder of such folders is a set, one transcoder per layer.
Every claim is checked before a weight is used; a violation is one line naming the file.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdetect.errors import CorruptInputError, NotFoundError, UnsupportedError, quoted
from mmdetect.io import hub
from mmdetect.io.checkpoint import Checkpoint
from mmdetect.io.paths import read_json
from mmdetect.io.safetensors import FLOATS, read_header

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
META_KEYS = ("model_name", "hook_name", "hook_name_out", "neuronpedia_id", "hf_hook_name", "hf_hook_name_out")
NEURONPEDIA = "https://neuronpedia.org/{id}/{feature}"  # a feature's page (a link only; nothing is fetched)
LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|h|layer)\.(\d{1,6})\.")


@dataclass
class Transcoder:
    """One transcoder: its folder, checked config facts, the layer its hooks name, and its weights' reader."""

    path: Path
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    hook_name: str
    hook_name_out: str
    layer: int
    model_name: str | None = None
    neuronpedia_id: str | None = None
    hf_hook_name: str | None = None
    hf_hook_name_out: str | None = None
    normalize_activations: str = "none"
    weights: Checkpoint | None = field(default=None, repr=False)
    apply_b_dec_to_input: bool = False   # the encoder reads x - b_dec (SAELens' flag; only where d_in == d_out)

    @property
    def skip(self) -> bool:
        return self.weights is not None and "W_skip" in self.weights

    def link(self, feature: int) -> str | None:
        """The feature's Neuronpedia page (a link only; nothing is fetched)."""
        return None if self.neuronpedia_id is None else NEURONPEDIA.format(id=self.neuronpedia_id, feature=feature)

    @property
    def link_template(self) -> str | None:
        """``link`` with ``{feature}`` left in: what a table stores once per layer instead of a link per row."""
        return None if self.neuronpedia_id is None else NEURONPEDIA.replace("{id}", self.neuronpedia_id)


def _int(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if type(value) is not int or value <= 0:
        raise CorruptInputError(f"{where}: {key} is {quoted(value)}, not a positive integer: fix or re-download it")
    return value


def _str(meta: dict[str, Any], key: str, where: Path, required: bool = False) -> str | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise CorruptInputError(f"{where}: {key} is {quoted(value)}, not a hook name string: fix or re-download it")
    return value


def layer_of(hook: str) -> int | None:
    """The block a TransformerLens (``blocks.3.hook_mlp_out``) or Hugging Face (``model.layers.3.mlp``) name is in."""
    m = LAYER.search(hook)
    return int(m.group(1)) if m else None


def read_transcoder(folder: Path) -> Transcoder:
    """One transcoder folder, config and safetensors header validated (no weight byte read)."""
    cfg_path = folder / CFG
    if not cfg_path.is_file():
        raise NotFoundError(f"{folder} has no {CFG}: a SAELens transcoder folder holds {CFG} and {WEIGHTS}")
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise CorruptInputError(f"{cfg_path} is a JSON {type(cfg).__name__}, not an object: fix or re-download it")
    meta = cfg.get("metadata", {})
    if not isinstance(meta, dict):
        raise CorruptInputError(f"{cfg_path}: metadata is not a JSON object: fix or re-download it")
    facts = {k: meta.get(k, cfg.get(k)) for k in META_KEYS}
    arch = cfg.get("architecture", "transcoder" if facts["hook_name_out"] is not None else None)
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise UnsupportedError(f"{cfg_path}: architecture {quoted(arch)} is not a transcoder "
                               f"({', '.join(ARCHITECTURES)}): an SAE reads and writes the same activation, so it "
                               f"has no read/write cosine")
    d_in, d_sae = _int(cfg, "d_in", cfg_path), _int(cfg, "d_sae", cfg_path)
    d_out = _int(cfg, "d_out", cfg_path) if "d_out" in cfg else d_in
    hook_in = _str(facts, "hook_name", cfg_path, required=True)
    hook_out = _str(facts, "hook_name_out", cfg_path, required=True)
    assert hook_in is not None and hook_out is not None
    for key in ("model_name", "neuronpedia_id", "hf_hook_name", "hf_hook_name_out"):
        _str(facts, key, cfg_path)
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"):
        raise UnsupportedError(f"{cfg_path}: normalize_activations {quoted(norm)} changes directions in a way "
                               f"mmdetect does not fold")
    b_dec_in = cfg.get("apply_b_dec_to_input", False)
    if not isinstance(b_dec_in, bool):
        raise CorruptInputError(f"{cfg_path}: apply_b_dec_to_input is {quoted(b_dec_in)}, not true or false: fix or "
                                f"re-download it")
    if cfg.get("reshape_activations", "none") != "none":
        raise UnsupportedError(f"{cfg_path}: reshape_activations {quoted(cfg.get('reshape_activations'))}: only MLP "
                               f"transcoders (no hook_z reshaping) are scanned")
    layer, layer_out = layer_of(hook_in), layer_of(hook_out)
    if layer is None or layer != layer_out:
        raise CorruptInputError(f"{cfg_path}: hooks {quoted(hook_in)} and {quoted(hook_out)} do not name one block "
                                f"(e.g. blocks.3.ln2.hook_normalized and blocks.3.hook_mlp_out)")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise NotFoundError(f"{folder} has no {WEIGHTS}")
    tensors = read_header(weights)
    want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if "W_skip" in tensors:
        want["W_skip"] = (d_out, d_in)
    if arch.startswith("jumprelu") or "threshold" in tensors:
        want["threshold"] = (d_sae,)
    for name, shape in want.items():
        info = tensors.get(name)
        if info is None:
            raise CorruptInputError(f"{weights}: tensor {name!r} is missing (a {arch} has "
                                    f"{', '.join(want)}): fix or re-download it")
        if info.dtype not in FLOATS:
            raise UnsupportedError(f"{weights}: tensor {name!r} has dtype {info.dtype}, not a float")
        if info.shape != shape:
            raise CorruptInputError(f"{weights}: tensor {name!r} has shape {list(info.shape)} but {CFG} says "
                                    f"d_in {d_in}, d_sae {d_sae}, d_out {d_out} ({list(shape)})")
    ckpt = Checkpoint(ref=str(folder), path=folder, format="safetensors", config={}, tensors=tensors,
                      files=[weights], inputs=[cfg_path, weights])
    return Transcoder(folder, arch, d_in, d_sae, d_out, hook_in, hook_out, layer, facts["model_name"],
                      facts["neuronpedia_id"], facts["hf_hook_name"], facts["hf_hook_name_out"], str(norm), ckpt,
                      apply_b_dec_to_input=b_dec_in)


def open_transcoders(path: str | Path) -> list[Transcoder]:
    """A transcoder folder, or a folder of per-layer transcoder folders: sorted by layer, one per layer. A ref that
    is no local path but reads ``owner/name[@revision][:subfolder]`` is fetched from the hub (or its cache)."""
    root = Path(path)
    if not root.exists() and isinstance(path, str) and (ref := hub.parse_transcoder_ref(path)) is not None:
        root = hub.transcoder(*ref)
    if not root.is_dir():
        raise NotFoundError(f"{path} is not a folder: --transcoder takes a SAELens transcoder folder ({CFG} + "
                            f"{WEIGHTS}), a folder of them, or a hub id owner/name[:subfolder]")
    if (root / CFG).exists():
        found = [read_transcoder(root)]
    else:
        found = [read_transcoder(sub) for sub in sorted(root.iterdir()) if sub.is_dir() and (sub / CFG).exists()]
    if not found:
        raise NotFoundError(f"{path} holds no {CFG}, nor any subfolder with one: not a SAELens transcoder folder")
    by_layer: dict[int, Transcoder] = {}
    for tc in found:
        if tc.layer in by_layer:
            raise CorruptInputError(f"{path}: {by_layer[tc.layer].path.name} and {tc.path.name} are both at layer "
                                    f"{tc.layer}: give one transcoder per layer")
        by_layer[tc.layer] = tc
    return [by_layer[k] for k in sorted(by_layer)]


@contextlib.contextmanager
def opened_transcoders(path: str | Path) -> Iterator[list[Transcoder]]:
    """``open_transcoders(path)``, their weight files closed when the block ends."""
    tcs = open_transcoders(path)
    try:
        yield tcs
    finally:
        for tc in tcs:
            if tc.weights is not None:
                tc.weights.close()
