"""The SAELens transcoder reader (mmdetect/io/transcoder.py): files written by hand in SAELens 6's exact format
(cfg.json keys and order, tensor names and shapes as SAELens' save_model writes them; checked against sae-lens 6.54.12
outside the shared venv, whose transformer-lens 4.3 it would downgrade)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmdetect.errors import CorruptInputError, NotFoundError, UnsupportedError
from mmdetect.io.transcoder import open_transcoders


def write_saelens(path: Path, d_in: int = 8, d_sae: int = 5, layer: int = 1, arch: str = "transcoder",
                  cfg_extra: dict | None = None, tensors: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(layer)
    state = {"W_dec": torch.randn(d_sae, d_in, generator=gen), "W_enc": torch.randn(d_in, d_sae, generator=gen),
             "b_dec": torch.zeros(d_in), "b_enc": torch.zeros(d_sae)}
    if "skip" in arch:
        state["W_skip"] = torch.randn(d_in, d_in, generator=gen)
    if arch.startswith("jumprelu"):
        state["threshold"] = torch.zeros(d_sae)
    state.update(tensors or {})
    save_file(state, str(path / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12", "model_name": "gpt2",
                        "hook_name": f"blocks.{layer}.ln2.hook_normalized",
                        "hook_name_out": f"blocks.{layer}.hook_mlp_out", "neuronpedia_id": f"gpt2-small/{layer}-tc"},
           "d_out": d_in, "architecture": arch, **(cfg_extra or {})}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def test_reads_one_and_a_set(tmp_path: Path) -> None:
    one = open_transcoders(write_saelens(tmp_path / "a", arch="jumprelu_skip_transcoder"))
    assert [(t.layer, t.architecture, t.skip, t.d_sae) for t in one] == [(1, "jumprelu_skip_transcoder", True, 5)]
    assert one[0].link(7) == "https://neuronpedia.org/gpt2-small/1-tc/7"
    assert one[0].weights is not None and one[0].weights.read("W_enc").shape == (8, 5)
    for layer in (3, 0):
        write_saelens(tmp_path / "set" / f"L{layer}", layer=layer)
    assert [t.layer for t in open_transcoders(tmp_path / "set")] == [0, 3]


@pytest.mark.parametrize("cfg, error, message", [
    ({"d_sae": 6}, CorruptInputError, "tensor 'W_enc' has shape [8, 5] but cfg.json says d_in 8, d_sae 6"),
    ({"d_sae": "5"}, CorruptInputError, "d_sae is '5', not a positive integer"),
    ({"metadata": {"hook_name": 3, "hook_name_out": "blocks.1.hook_mlp_out"}}, CorruptInputError,
     "hook_name is 3, not a hook name string"),
    ({"architecture": "standard"}, UnsupportedError, "architecture 'standard' is not a transcoder"),
    ({"metadata": {"hook_name": "blocks.1.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"}},
     CorruptInputError, "do not name one block"),
])
def test_hostile_config(tmp_path: Path, cfg: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        open_transcoders(write_saelens(tmp_path / "t", cfg_extra=cfg))


def test_not_json_and_missing(tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "t")
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CorruptInputError, match="cfg.json is not valid JSON"):
        open_transcoders(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="holds no cfg.json"):
        open_transcoders(tmp_path / "empty")


def test_truncated_weights(tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "t")
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[:-16])
    with pytest.raises(CorruptInputError, match="is truncated"):
        open_transcoders(folder)
