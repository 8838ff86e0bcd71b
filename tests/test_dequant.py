"""io.dequant against gguf-py's numpy dequantiser, bit for bit (the float32 bits viewed as int32), on every type:
blocks gguf-py quantises, crafted block bytes with extreme scales (every type, the K types included, which gguf-py
cannot quantise), every tensor of the real Gemma 3 270M Q4_K_M file, and scans whose CSV must not change by a byte."""
from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmdetect.io import dequant
from mmdetect.io import gguf as io_gguf

ALL = list(dequant.SIZES)
QUANTISABLE = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]   # what gguf.quants.quantize writes
# byte offsets of each type's float16 scales in its block
HALVES = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82], "Q3_K": [108],
          "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# float16 bit patterns: ±65504, ±smallest and largest subnormal, ±0, ±inf, quiet and signalling NaNs of both signs
# with payloads, 1, the smallest normal, -2
EXTREME = [0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x83FF, 0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7C01,
           0xFC01, 0x7D55, 0x7FFF, 0x3C00, 0x0400, 0xC000]


def qtype(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name]


def reference(raw: np.ndarray, name: str) -> torch.Tensor:
    """gguf.quants.dequantize of ``raw`` (uint8 whole blocks), flattened to float32."""
    from gguf.quants import dequantize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # NaN and inf scales
        data = dequantize(np.ascontiguousarray(raw, dtype=np.uint8).reshape(1, -1), qtype(name))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(-1))


def ours(raw: np.ndarray, name: str, workers: int | None = None) -> torch.Tensor:
    return dequant.dequantize(torch.from_numpy(np.array(raw, dtype=np.uint8).reshape(-1)), name, workers)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    bits_got, bits_want = got.contiguous().view(torch.int32), want.contiguous().view(torch.int32)
    if not torch.equal(bits_got, bits_want):
        bad = (bits_got != bits_want).nonzero().flatten()
        i = int(bad[0])
        raise AssertionError(f"{len(bad)} of {got.numel()} values differ; first at {i}: "
                             f"{int(bits_got[i]) & 0xFFFFFFFF:#010x} against {int(bits_want[i]) & 0xFFFFFFFF:#010x}")


def weights(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Weights as a checkpoint has them, with rows of very different sizes, a zero row, a constant row and
    outliers."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * (10.0 ** rng.integers(-6, 4, (rows, 1)))
    w[0] = 0
    w[1] = 3.5
    w[2, ::7] = 60000.0
    return w.astype(np.float32)


@pytest.mark.parametrize("name", QUANTISABLE)
def test_blocks_gguf_quantises(name: str) -> None:
    from gguf.quants import quantize

    rng = np.random.default_rng(sum(map(ord, name)))
    w = weights(rng, 64, 512)
    q = quantize(w, qtype(name))
    raw = np.ascontiguousarray(q).view(np.uint8)
    assert raw.size == 64 * 512 // dequant.SIZES[name][0] * dequant.SIZES[name][1]
    want = reference(raw, name)
    assert_same_bits(ours(raw, name), want)
    if name == "F32":
        assert torch.equal(want, torch.from_numpy(w).reshape(-1))


def crafted(name: str, rng: np.random.Generator) -> np.ndarray:
    """Blocks whose float16 scales take every pair of EXTREME values (every value for a one-scale type), the other
    bytes random; then blocks of all 0x00 and all 0xFF bytes; then wholly random blocks (any scale, any quant)."""
    block, size = dequant.SIZES[name]
    at = HALVES[name]
    combos = list(itertools.product(EXTREME, repeat=len(at)))
    blocks = rng.integers(0, 256, (len(combos) + 2 + 4000, size), dtype=np.uint8)
    for k, values in enumerate(combos):
        for offset, value in zip(at, values):
            blocks[k, offset:offset + 2] = np.array([value], dtype=np.uint16).view(np.uint8)
    blocks[len(combos)] = 0
    blocks[len(combos) + 1] = 0xFF
    return blocks


@pytest.mark.parametrize("name", [n for n in ALL if n in HALVES])
def test_crafted_blocks_with_extreme_scales(name: str) -> None:
    rng = np.random.default_rng(sum(map(ord, name)) + 1)
    raw = crafted(name, rng)
    want = reference(raw, name)
    assert bool(torch.isnan(want).any()) and bool(torch.isinf(want).any())  # the extremes are in there
    assert_same_bits(ours(raw, name), want)


def test_every_float16_and_bfloat16_bit_pattern() -> None:
    every = np.arange(65536, dtype=np.uint16).view(np.uint8)
    for name in ("F16", "BF16"):
        assert_same_bits(ours(every, name), reference(every, name))
    # signalling NaNs keep their payload and sign (torch's own conversion quiets them)
    halves = torch.from_numpy(np.array([0x7C01, 0xFE01], dtype=np.uint16).view(np.int16)).view(torch.float16)
    want = torch.from_numpy(np.array([0x7F802000, 0xFFC02000], dtype=np.uint32).view(np.int32))
    assert torch.equal(dequant.half_to_float(halves).view(torch.int32), want)


def test_float32_bit_patterns() -> None:
    special = np.array([0, 0x80000000, 1, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF,
                        0x7F7FFFFF], dtype=np.uint32)
    raw = np.concatenate([special, np.random.default_rng(3).integers(0, 2**32, 5000, dtype=np.uint32)])
    got = ours(raw.view(np.uint8), "F32")
    assert_same_bits(got, reference(raw.view(np.uint8), "F32"))
    assert torch.equal(got.view(torch.int32), torch.from_numpy(raw.view(np.int32)))


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q3_K", "Q4_K", "Q6_K"])
def test_chunks_and_threads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks, the last one short, on one and on several threads: the same bits (scratch buffers are reused
    from a longer chunk to a shorter one)."""
    block, size = dequant.SIZES[name]
    monkeypatch.setattr(dequant, "CHUNK_VALUES", 7 * block)
    raw = crafted(name, np.random.default_rng(5))[:1003]
    want = reference(raw, name)
    for workers in (1, 3):
        assert_same_bits(ours(raw, name, workers), want)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no torch dequantiser for IQ2_XXS"):
        dequant.dequantize(torch.zeros(66, dtype=torch.uint8), "IQ2_XXS")
    with pytest.raises(ValueError, match="Q4_K bytes must be a 1-D uint8 tensor of whole 144-byte blocks"):
        dequant.dequantize(torch.zeros(145, dtype=torch.uint8), "Q4_K")
    assert dequant.dequantize(torch.zeros(0, dtype=torch.uint8), "Q6_K").shape == (0,)
    assert not dequant.supported("IQ4_NL") and dequant.supported("Q5_K")


def test_sizes_are_gguf_py_sizes() -> None:
    from gguf import GGML_QUANT_SIZES

    for name, sizes in dequant.SIZES.items():
        assert GGML_QUANT_SIZES[qtype(name)] == sizes


# --- through io.gguf -------------------------------------------------------------------------------------------

def numpy_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send every tensor through gguf.quants.dequantize, as before io.dequant."""
    monkeypatch.setattr(dequant, "supported", lambda name: False)


def read_all(path: Path, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    _, infos, entries = io_gguf.read_index(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return {key: io_gguf.read_tensor(fd, key, infos[key], entries[key], rows) for key in infos}
    finally:
        os.close(fd)


def write_every_type(path: Path, d: int = 256, n_mlp: int = 256) -> list[str]:
    """A llama GGUF whose layer i has its MLP in type TYPES[i]: quantised by gguf-py where it can, crafted blocks
    with ordinary scales for the K types. Returns the types in layer order."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(11)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(len(ALL))
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(n_mlp)
    writer.add_context_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", rng.normal(0, 0.02, (64, d)).astype(np.float32))
    for i, name in enumerate(ALL):
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        for tensor, shape in (("ffn_up", (n_mlp, d)), ("ffn_gate", (n_mlp, d)), ("ffn_down", (d, n_mlp))):
            w = rng.normal(0, 0.02, shape).astype(np.float32)
            if name == "F32":
                writer.add_tensor(f"blk.{i}.{tensor}.weight", w)
            elif name == "F16":
                writer.add_tensor(f"blk.{i}.{tensor}.weight", w.astype(np.float16))
            elif name in QUANTISABLE:
                writer.add_tensor(f"blk.{i}.{tensor}.weight", quantize(w, qtype(name)), raw_dtype=qtype(name))
            else:
                block, size = dequant.SIZES[name]
                raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
                for at in HALVES[name]:
                    scale = (np.abs(rng.standard_normal(raw.shape[:2])) * 1e-3).astype(np.float16)
                    raw[:, :, at:at + 2] = scale.view(np.uint8).reshape(*raw.shape[:2], 2)
                writer.add_tensor(f"blk.{i}.{tensor}.weight", raw.reshape(shape[0], -1), raw_dtype=qtype(name))
    writer.add_tensor("output_norm.weight", np.ones(d, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ALL


@pytest.fixture(scope="module")
def every_type(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("every-type") / "every-type.gguf"
    write_every_type(path)
    return path


def test_read_tensor_equals_the_numpy_route(every_type: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, infos, _ = io_gguf.read_index(every_type)
    assert {info.dtype for info in infos.values()} == set(ALL)
    fast = read_all(every_type)
    part = read_all(every_type, slice(37, 101))
    with monkeypatch.context() as m:
        numpy_route(m)
        slow = read_all(every_type)
    for key in fast:
        assert fast[key].shape == slow[key].shape == infos[key].shape
        assert_same_bits(fast[key], slow[key])
        assert_same_bits(part[key], slow[key][37:101])


def invoke(*args: str) -> None:
    from mmdetect.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def scan_csv(path: Path, out: Path) -> bytes:
    invoke("scan", str(path), "--format", "csv", "-o", str(out))
    return out.read_bytes()


def test_scan_csv_is_byte_identical(every_type: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = scan_csv(every_type, tmp_path / "fast.csv")
    with monkeypatch.context() as m:
        numpy_route(m)
        slow = scan_csv(every_type, tmp_path / "slow.csv")
    assert fast == slow
    assert fast.count(b"\n") == 1 + len(ALL) * 256


def test_every_tensor_of_gemma3_270m(gemma3_270m: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, infos, entries = io_gguf.read_index(gemma3_270m)
    types = {info.dtype for info in infos.values()}
    assert {"Q4_K", "Q6_K", "F32"} <= types
    fd = os.open(gemma3_270m, os.O_RDONLY)
    try:
        for key, info in infos.items():
            fast = io_gguf.read_tensor(fd, key, info, entries[key], slice(None))
            with monkeypatch.context() as m:
                numpy_route(m)
                slow = io_gguf.read_tensor(fd, key, info, entries[key], slice(None))
            assert fast.shape == info.shape, key
            assert_same_bits(fast, slow)
    finally:
        os.close(fd)


def test_gemma3_270m_scan_csv_is_byte_identical(gemma3_270m: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fast = scan_csv(gemma3_270m, tmp_path / "fast.csv")
    with monkeypatch.context() as m:
        numpy_route(m)
        slow = scan_csv(gemma3_270m, tmp_path / "slow.csv")
    assert fast == slow and fast.count(b"\n") > 1000
