"""Bad input fails cleanly: one line saying what is wrong, exit code 2, no traceback, no output file touched.

Every error case runs twice: once with an --output that does not exist yet (it must not be created, and nothing else
may appear beside it), and once with an existing --output (it must be left byte-identical).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import IO, Callable

import numpy as np
import pandas as pd
import pytest
from builders import Tiny, build_llama, write_gguf
from click.testing import CliRunner, Result

import mmdetect
from mmdetect import report
from mmdetect.cli import main

PRECIOUS = b"layer,neuron,cos\n0,0,0.5\n"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(env=env).invoke(main, list(args))


def assert_clean_error(result: Result, phrase: str) -> str:
    """Exit code 2, one line on stderr that starts with 'error:' and holds ``phrase``, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert phrase in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.fixture(params=["new", "existing"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], None]:
    """An --output path, and a check that the failed run left it (and its folder) as it was."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / "result.csv"
    if request.param == "existing":
        path.write_bytes(PRECIOUS)

    def check() -> None:
        if request.param == "existing":
            assert path.read_bytes() == PRECIOUS
            assert [p.name for p in folder.iterdir()] == ["result.csv"]
        else:
            assert not path.exists()
            assert list(folder.iterdir()) == []

    check.path = str(path)  # type: ignore[attr-defined]
    return check


def scan_fails(model: str, phrase: str, output: Callable[[], None], *extra: str) -> str:
    line = assert_clean_error(run("scan", model, "-o", output.path, *extra), phrase)  # type: ignore[attr-defined]
    output()
    return line


# -- model references -------------------------------------------------------------------------------------------

def test_missing_path(tmp_path: Path, output: Callable[[], None]) -> None:
    line = scan_fails(str(tmp_path / "no-such-model"), "does not exist", output)
    assert str(tmp_path / "no-such-model") in line


def test_empty_folder(tmp_path: Path, output: Callable[[], None]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    line = scan_fails(str(empty), "has no config.json", output)
    assert str(empty) in line


def test_folder_without_config(llama_copy: Path, output: Callable[[], None]) -> None:
    (llama_copy / "config.json").unlink()
    scan_fails(str(llama_copy), "has no config.json", output)


def test_folder_without_weights(llama_copy: Path, output: Callable[[], None]) -> None:
    (llama_copy / "model.safetensors").unlink()
    scan_fails(str(llama_copy), "has no weights", output)


def test_broken_config_json(llama_copy: Path, output: Callable[[], None]) -> None:
    (llama_copy / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    line = scan_fails(str(llama_copy), "is not valid JSON", output)
    assert "config.json" in line


def test_config_json_not_an_object(llama_copy: Path, output: Callable[[], None]) -> None:
    (llama_copy / "config.json").write_text("[1, 2, 3]")
    scan_fails(str(llama_copy), "must hold a JSON object", output)


def test_truncated_safetensors(llama_copy: Path, output: Callable[[], None]) -> None:
    weights = llama_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    line = scan_fails(str(llama_copy), "truncated", output)
    assert "model.safetensors" in line and "download it again" in line


def test_safetensors_shorter_than_its_header_length(llama_copy: Path, output: Callable[[], None]) -> None:
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00")
    scan_fails(str(llama_copy), "truncated or not a safetensors file", output)


def test_garbage_safetensors(llama_copy: Path, output: Callable[[], None]) -> None:
    weights = llama_copy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    scan_fails(str(llama_copy), "is corrupt or truncated", output)


def test_corrupt_safetensors_header(llama_copy: Path, output: Callable[[], None]) -> None:
    weights = llama_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"\xff\xfe garbage " * (length // 11) + b"!" * (length % 11)
    weights.write_bytes(bytes(data))
    scan_fails(str(llama_copy), "corrupt safetensors header", output)


def test_missing_mlp_tensor_fails_during_the_scan(llama_copy: Path, output: Callable[[], None]) -> None:
    from safetensors.torch import load_file, save_file

    weights = llama_copy / "model.safetensors"
    state = load_file(str(weights))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    scan_fails(str(llama_copy), "'model.layers.1.mlp.up_proj.weight' is missing", output)


def test_missing_shard(llama_sharded_copy: Path, output: Callable[[], None]) -> None:
    sharded = llama_sharded_copy
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    line = scan_fails(str(sharded), "which is missing", output)
    assert shards[1].name in line


def test_a_file_that_is_not_gguf(tmp_path: Path, output: Callable[[], None]) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    scan_fails(str(path), "is a file but not a .gguf file", output)


def test_corrupt_gguf(tmp_path: Path, output: Callable[[], None]) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    scan_fails(str(path), "is not a readable GGUF file", output)


def test_truncated_gguf(tmp_path: Path, output: Callable[[], None]) -> None:
    path = write_gguf(tmp_path / "cut.gguf").path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    line = scan_fails(str(path), "cut.gguf is truncated", output)
    assert "download it again" in line


@pytest.mark.parametrize("seed", range(12))
def test_garbage_after_the_gguf_magic(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + rng.integers(0, 256, 16 + seed * 40, dtype=np.uint8).tobytes())
    assert_clean_error(run("scan", str(path)), "garbage.gguf")


def test_a_gguf_vocabulary_is_stepped_over_to_the_keys_after_it(tmp_path: Path) -> None:
    """String arrays (the tokenizer's vocabulary) are skipped by their lengths without decoding: the keys after one
    still parse, and a string that runs past the end of the file is a truncated header."""
    import gguf

    from mmdetect.io.gguf import read_index

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(["<s>", "", "é" * 300, "\xff"] + [f"t{k}" for k in range(1000)])
    writer.add_name("After The Vocabulary")
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config, tensors, _ = read_index(path)
    assert config["gguf_metadata"]["general.name"] == "After The Vocabulary" and config["num_hidden_layers"] == 1
    assert list(tensors) == ["output_norm.weight"]
    data = path.read_bytes()
    start = data.index(b"tokenizer.ggml.tokens")
    short = "vocab.gguf is not a readable GGUF file \\(header runs past the end of the file\\)"
    path.write_bytes(data[:start + 10_000])                     # cut inside the vocabulary's strings
    with pytest.raises(mmdetect.MMDetectError, match=short):
        read_index(path)
    big = bytearray(data)
    at = start + len("tokenizer.ggml.tokens") + 4 + 4 + 8       # value type, item type, count: the first length
    assert struct.unpack_from("<Q", big, at)[0] == 3           # "<s>"
    big[at:at + 8] = struct.pack("<Q", 1 << 40)
    path.write_bytes(bytes(big))
    with pytest.raises(mmdetect.MMDetectError, match=short):
        read_index(path)


def test_missing_gguf(tmp_path: Path, output: Callable[[], None]) -> None:
    scan_fails(str(tmp_path / "absent.gguf"), "does not exist", output)


# -- architectures and quantisation -----------------------------------------------------------------------------

def test_unknown_architecture_without_a_recognisable_mlp(tmp_path: Path, output: Callable[[], None]) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "weirdformer", "hidden_size": 16}))
    save_file({f"encoder.blocks.{i}.mixer.weight": torch.ones(16, 16) for i in range(2)},
              str(folder / "model.safetensors"))
    line = scan_fails(str(folder), "'weirdformer' is not in the registry and its tensor names show no MLP", output)
    assert "mmdetect archs" in line


def test_unknown_model_type_with_llama_tensors_uses_the_heuristic(llama: Tiny, llama_copy: Path,
                                                                   tmp_path: Path) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["model_type"] = "mystery_llama"
    config.pop("architectures", None)
    (llama_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "heuristic.csv"
    result = CliRunner().invoke(main, ["scan", str(llama_copy), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "heuristic" in result.stderr
    assert "'mystery_llama' is not in the registry" in result.stderr
    assert "post_attention_layernorm" in result.stderr  # the guessed pre-norm is named
    got = pd.read_csv(out)
    registered = mmdetect.scan(str(llama.path))
    assert len(got) == len(registered) == 256
    for col in ("layer", "neuron", "rank", "flagged", "class"):
        assert got[col].tolist() == registered[col].tolist()
    for col in ("cos", "cos_gate_out", "cos_gate_in", "norm_in", "norm_out"):
        np.testing.assert_allclose(got[col], registered[col], atol=1e-6, rtol=0)
    df = mmdetect.scan(str(llama_copy))
    assert df.attrs["provenance"]["heuristic"] is True
    assert df.attrs["provenance"]["family"] == "heuristic"


@pytest.mark.parametrize("method, name", [("gptq", "GPTQ"), ("awq", "AWQ"), ("bitsandbytes", "bitsandbytes"),
                                          ("mxfp4", "MXFP4")])
def test_quantised_config_names_the_quantisation(llama_copy: Path, output: Callable[[], None], method: str,
                                                 name: str) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (llama_copy / "config.json").write_text(json.dumps(config))
    line = scan_fails(str(llama_copy), f"is quantised with {name}", output)
    assert "unquantised" in line


def test_fp8_without_block_size_is_refused(llama_copy: Path, output: Callable[[], None]) -> None:
    config = json.loads((llama_copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8"}
    (llama_copy / "config.json").write_text(json.dumps(config))
    scan_fails(str(llama_copy), "is quantised with fp8", output)


def test_quantised_tensor_names_without_config(llama_copy: Path, output: Callable[[], None]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = llama_copy / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.0.mlp.up_proj.qweight"] = torch.zeros(8, 128, dtype=torch.int32)
    save_file(state, str(weights), metadata={"format": "pt"})
    scan_fails(str(llama_copy), "is quantised with GPTQ/AWQ", output)


# -- the hub ----------------------------------------------------------------------------------------------------

def test_hub_id_not_cached_while_offline(hub_cache: Path, output: Callable[[], None]) -> None:
    line = scan_fails("someone/not-cached-model", "is not in the local HF cache and HF_HUB_OFFLINE=1 is set", output)
    assert "someone/not-cached-model" in line
    assert list(hub_cache.glob("models--*/snapshots/*/*")) == []


def test_invalid_hub_id(hub_cache: Path, output: Callable[[], None]) -> None:
    scan_fails("bad name!", "is neither an existing path nor a valid hub id", output)


# -- options ----------------------------------------------------------------------------------------------------

def test_output_in_a_missing_folder(llama: Tiny, tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "out.csv"
    line = assert_clean_error(run("scan", str(llama.path), "-o", str(target)), "does not exist")
    assert "no-such-dir" in line
    assert not (tmp_path / "no-such-dir").exists()


def test_output_is_a_directory(llama: Tiny, tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    assert_clean_error(run("scan", str(llama.path), "-o", str(target)), "is a directory")
    assert list(target.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_output_in_a_read_only_folder(llama: Tiny, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert_clean_error(run("scan", str(llama.path), "-o", str(folder / "x.csv")), "permission denied")
    finally:
        folder.chmod(0o700)


def test_output_extension_unknown(llama: Tiny, output: Callable[[], None], tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.xyz"
    assert_clean_error(run("scan", str(llama.path), "-o", str(target)), "cannot tell the format")
    assert not target.exists()
    output()


def test_parquet_to_stdout_is_refused(llama: Tiny) -> None:
    assert_clean_error(run("scan", str(llama.path), "--format", "parquet"), "is binary: give --output")


@pytest.mark.parametrize("spec", ["a-b", "3-1", "1,,2", "-1", "0-"])
def test_bad_layers(llama: Tiny, output: Callable[[], None], spec: str) -> None:
    line = scan_fails(str(llama.path), "is not a list of layers", output, "--layers", spec)
    assert repr(spec) in line


def test_layers_outside_the_model(llama: Tiny, output: Callable[[], None]) -> None:
    scan_fails(str(llama.path), "--layers selects none of this model's layers (0-1)", output, "--layers", "5-7")


def test_bad_layers_is_rejected_before_opening_the_model(tmp_path: Path) -> None:
    result = run("scan", str(tmp_path / "missing"), "--layers", "x")
    assert_clean_error(result, "is not a list of layers")


@pytest.mark.parametrize("value", ["1.5", "-1.01", "nan"])
def test_threshold_out_of_range(llama: Tiny, output: Callable[[], None], value: str) -> None:
    scan_fails(str(llama.path), "is outside [-1, 1]", output, "--threshold", value)


def test_unknown_device(llama: Tiny, output: Callable[[], None]) -> None:
    scan_fails(str(llama.path), "is not one of cpu, cuda, cuda:N, mps", output, "--device", "tpu")


def test_a_failure_while_writing_leaves_no_partial_file(llama: Tiny, output: Callable[[], None],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer fails half-way: the temporary file is removed and the target is untouched (exit 1, one line)."""
    def half_then_fail(df: pd.DataFrame, fh: IO[bytes]) -> None:
        fh.write(b"rank,layer\n1,0\n")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report.formats, "_writers", lambda: {"csv": (True, half_then_fail)})
    result = run("scan", str(llama.path), "-o", output.path)  # type: ignore[attr-defined]
    assert result.exit_code == 1
    assert result.stderr.startswith("error: internal error (RuntimeError: disk full)")
    assert len(result.stderr.splitlines()) == 1
    output()


# -- tracebacks only with --debug -------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mmdetect.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = _cli("scan", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"error: {tmp_path / 'missing'} does not exist: check the path, or pass a hub id such as " \
                          f"gpt2\n"


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_shows_a_traceback(tmp_path: Path, where: str) -> None:
    args = ["scan", str(tmp_path / "missing")]
    proc = _cli(*(args + ["--debug"] if where == "after" else ["--debug"] + args))
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "NotFoundError" in proc.stderr and "does not exist" in proc.stderr


def test_debug_in_the_runner_reraises(tmp_path: Path) -> None:
    result = run("scan", str(tmp_path / "missing"), "--debug")
    assert isinstance(result.exception, mmdetect.MMDetectError)
    assert "does not exist" in str(result.exception)


# -- dead neurons -----------------------------------------------------------------------------------------------

def test_nan_and_zero_neurons_do_not_crash_and_are_never_flagged(tmp_path: Path) -> None:
    folder = build_llama(tmp_path / "dead", nan_neuron=(0, 3), zero_neuron=(0, 9))
    out = tmp_path / "dead.csv"
    result = CliRunner().invoke(main, ["scan", str(folder), "--threshold", "1.0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    assert len(df) == 256
    dead = df[(df["layer"] == 0) & df["neuron"].isin([3, 9])]
    assert len(dead) == 2
    assert dead["cos"].isna().all()
    assert not dead["flagged"].any()
    assert dead["class"].isna().all()       # empty cell
    assert dead["rank"].isna().all()        # ranked last, without a rank
    assert list(df.index[df["cos"].isna()]) == [254, 255]
    alive = df.dropna(subset=["cos"])
    assert alive["flagged"].all()           # threshold 1.0 flags every finite neuron
    assert alive["rank"].tolist() == list(range(1, 255))
    assert (alive.iloc[0]["layer"], alive.iloc[0]["neuron"]) == (1, 7)
    raw_lines = out.read_text().splitlines()
    dead_line = next(line for line in raw_lines if line.split(",")[1:4] == ["0", "", "3"])
    assert dead_line.split(",")[4] == ""    # cos is an empty cell, not "nan"
    summary = mmdetect.scan(str(folder)).attrs["layers"]
    assert [s["n_dead"] for s in summary] == [2, 0]


# -- the error hierarchy and how the command line maps it -------------------------------------------------------

def test_each_kind_of_user_error_is_its_own_class(llama_copy: Path, tmp_path: Path) -> None:
    from mmdetect.errors import CorruptInputError, NotFoundError, OutputError, UnsupportedError

    for kind in (NotFoundError, UnsupportedError, CorruptInputError, OutputError):
        assert issubclass(kind, mmdetect.MMDetectError)
    with pytest.raises(NotFoundError):
        mmdetect.scan(str(tmp_path / "absent"))
    with pytest.raises(CorruptInputError):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text("{")
        mmdetect.scan(str(tmp_path / "bad"))
    config = json.loads((llama_copy / "config.json").read_text())
    (llama_copy / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(UnsupportedError):
        mmdetect.scan(str(llama_copy))
    with pytest.raises(OutputError):
        report.check_writable(tmp_path)


@pytest.mark.parametrize("raised, code, phrase", [
    (OSError(28, "No space left on device"), 2, "error: no space left on the device"),
    (PermissionError(13, "Permission denied", "/some/file"), 2, "error: permission denied (/some/file)"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (ValueError("a bug"), 1, "error: internal error (ValueError: a bug); rerun with --debug for the traceback and "
                             "please report it"),
    (mmdetect.MMDetectError("two\nlines"), 2, "error: two lines"),
])
def test_the_command_line_maps_errors_to_one_line(llama: Tiny, monkeypatch: pytest.MonkeyPatch,
                                                  raised: BaseException, code: int, phrase: str) -> None:
    import mmdetect.scanner

    def scan(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(mmdetect.scanner, "scan", scan)
    result = run("scan", str(llama.path))
    assert result.exit_code == code, result.output
    assert result.stderr == phrase + "\n"
    assert result.stdout == ""
