"""The corpus pass's GGUF loading (``corpus.model.gguf_loading``): one parse of the file, a plain-view reader and
``io.dequant`` for the blocks, giving exactly what transformers gives without them: the same reader fields and
tensors, the same weights bit for bit, the same tokenizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from builders import SHARED_MODELS

from mmdetect.corpus import model as corpus_model
from mmdetect.corpus.model import forget_gguf_reader, gguf_loading, gguf_tokenizer, load_model
from mmdetect.io.checkpoint import open_checkpoint

TEXT = "Once upon a time, a little girl named Lily found a shiny red ball in the park."


@pytest.fixture(scope="module")
def stories_q8(tmp_path_factory: pytest.TempPathFactory, transformers: Any) -> Path:
    """The shared stories260K as a GGUF with Q8_0 attention and gate/up weights (F32 where rows are not whole blocks),
    a BPE vocabulary and merges: both the dequantising and the tokenizer routes of transformers' loader."""
    if not (SHARED_MODELS / "stories260K").exists():
        pytest.skip("the shared stories260K checkpoint is not present (it is not distributed with mmdetect)")
    pytest.importorskip("accelerate")
    from builders import write_gguf_from_llama

    return write_gguf_from_llama(SHARED_MODELS / "stories260K", tmp_path_factory.mktemp("gguf") / "stories-q8.gguf",
                                 qtype="Q8_0")


def _fields_and_tensors(reader: Any) -> tuple[list[Any], list[Any]]:
    fields = [(f.name, f.offset, list(f.types), list(f.data), [(p.dtype.str, p.shape, p.tobytes()) for p in f.parts])
              for f in reader.fields.values()]
    tensors = [(t.name, t.tensor_type, list(t.shape), int(t.n_elements), int(t.n_bytes), int(t.data_offset),
                t.data.dtype.str, t.data.shape, t.data.tobytes()) for t in reader.tensors]
    return fields, tensors


def _assert_reader_matches(path: Path) -> None:
    import gguf

    plain = gguf.GGUFReader(str(path))
    fast = corpus_model._fast_reader_class(gguf.GGUFReader)(str(path))
    assert isinstance(fast, gguf.GGUFReader)
    (plain_fields, plain_tensors), (fast_fields, fast_tensors) = _fields_and_tensors(plain), _fields_and_tensors(fast)
    assert len(fast_fields) == len(plain_fields) > 5 and len(fast_tensors) == len(plain_tensors) > 0
    assert fast_fields == plain_fields
    assert fast_tensors == plain_tensors


def test_fast_reader_reads_the_fields_and_tensors_gguf_py_reads(stories_q8: Path) -> None:
    _assert_reader_matches(stories_q8)


@pytest.mark.slow
def test_fast_reader_on_gemma3_270m(gemma3_270m: Path) -> None:
    _assert_reader_matches(gemma3_270m)


def test_model_and_tokenizer_equal_transformers_own_loading(stories_q8: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    originals = gguf.GGUFReader, gguf.dequantize, hf_gguf.load_gguf_checkpoint
    folder, name = str(stories_q8.parent), stories_q8.name
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    reference_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    ckpt = open_checkpoint(stories_q8)
    try:
        ours = load_model(ckpt).state_dict()
        tok = gguf_tokenizer(ckpt)
        assert corpus_model._READERS  # the parse is kept for the tokenizer, until the run lets go of it
    finally:
        forget_gguf_reader()
        ckpt.close()
    assert not corpus_model._READERS
    assert (gguf.GGUFReader, gguf.dequantize, hf_gguf.load_gguf_checkpoint) == originals  # nothing stays patched

    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    quantised = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(reference[quantised], ours["model.layers.0.mlp.down_proj.weight"].T)  # sanity: real data
    assert tok.get_vocab() == reference_tok.get_vocab()
    assert tok(TEXT)["input_ids"] == reference_tok(TEXT)["input_ids"] and len(tok(TEXT)["input_ids"]) > 10


def test_dequantize_inside_the_context_gives_gguf_py_bits() -> None:
    """Random blocks (any scale, any quant) of the types transformers meets in real files, in the [rows, bytes] shape
    its loader passes: the same float32 bits as gguf-py's numpy, NaN and infinity patterns included."""
    import gguf

    from mmdetect.io import dequant

    rng = np.random.default_rng(0)
    for name in ("Q8_0", "Q4_0", "Q5_1", "Q2_K", "Q4_K", "Q6_K", "F16", "BF16"):
        qtype = gguf.GGMLQuantizationType[name]
        block, size = dequant.SIZES[name]
        blocks = rng.integers(0, 256, (6, 4 * size), dtype=np.uint8)
        expected = gguf.dequantize(blocks, qtype)
        with gguf_loading():
            got = gguf.dequantize(blocks, qtype)
        assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape == (6, 4 * block), name
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), name


def test_cached_metadata_is_a_copy_each_time(stories_q8: Path) -> None:
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    try:
        with gguf_loading():
            first = hf_gguf.load_gguf_checkpoint(str(stories_q8), return_tensors=False)
            first["config"].clear()  # transformers pops keys from what it gets
            second = hf_gguf.load_gguf_checkpoint(str(stories_q8), return_tensors=False)
        assert second["config"]["model_type"] == "llama" and second["config"]["num_hidden_layers"] == 5
    finally:
        forget_gguf_reader()
