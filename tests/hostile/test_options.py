"""Hostile options: a --layers range of a hundred billion layers, thresholds that are not numbers in [-1, 1], and a
300 MB --text file for a 256-token run. Each finishes at once in bounded memory, or is one line and exit 2."""
from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from builders import Tiny
from harness import api_error, assert_user_error, cli, run_limited, tiny_llama, unchanged

import mmdetect
from mmdetect.corpus.sources import resolve_source
from mmdetect.corpus.vocab import Vocab
from mmdetect.corpus.windows import windows
from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError, UsageError
from mmdetect.scanner import parse_layers


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("model") / "m", layers=2)


# -- --layers ---------------------------------------------------------------------------------------------------

def test_a_hundred_billion_layers_are_two_numbers() -> None:
    tracemalloc.start()
    try:
        spec = parse_layers("0-99999999999,5-7,200000000000-300000000000")
        assert spec is not None
        assert 99_999_999_999 in spec and 250_000_000_000 in spec and 150_000_000_000 not in spec
        assert {1, 99_999_999_999, 100_000_000_000} & spec == {1, 99_999_999_999}
        assert spec.select(range(12)) == set(range(12))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # bytes, where a set of the layers would take terabytes
    assert spec.ranges == ((0, 99_999_999_999), (200_000_000_000, 300_000_000_000))


def test_layers_past_the_last_one_are_skipped_with_a_warning(model: Path) -> None:
    full = mmdetect.scan(str(model))
    result = cli("scan", str(model), "--layers", "0-99999999999", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert result.stderr == ("warning: --layers 0-99999999999 reaches past this model's last layer (1); those "
                             "layers are skipped\n")
    assert len(result.stdout.splitlines()) == len(full) + 1
    df = mmdetect.scan(str(model), layers="1-99999999999")
    assert sorted(set(df["layer"])) == [1] and len(df) == len(full) // 2


@pytest.mark.parametrize("spec", ["99999999999-999999999999", "2", "5-7"])
def test_layers_that_select_nothing_are_one_line(model: Path, spec: str) -> None:
    with unchanged(model.parent):
        assert_user_error(cli("scan", str(model), "--layers", spec), "--layers selects none of this model's layers "
                                                                     "(0-1)")
        api_error(lambda: mmdetect.scan(str(model), layers=spec), NotFoundError, "selects none")
    api_error(lambda: mmdetect.scan(str(model), layers=[7, 9]), NotFoundError, "selects none")


@pytest.mark.parametrize("spec", ["1" * 31, "0--5", "5-3", "-1", "0-1,", "x"])
def test_malformed_layers_are_one_line_before_the_model_is_opened(tmp_path: Path, spec: str) -> None:
    assert_user_error(cli("scan", str(tmp_path / "absent"), "--layers", spec), "is not a list of layers")
    api_error(lambda: parse_layers(spec), CorruptInputError, "is not a list of layers")


# -- thresholds -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, option", [("scan", "--threshold"), ("heads", "--threshold"),
                                             ("chains", "--threshold"), ("chains", "--head-threshold")])
@pytest.mark.parametrize("value", ["nan", "1.5", "-1.01", "inf"])
def test_thresholds_outside_minus_one_to_one_are_refused_everywhere(tmp_path: Path, command: str, option: str,
                                                                    value: str) -> None:
    """Checked when the options are parsed, like scan's: the (absent) model is never opened."""
    line = assert_user_error(cli(command, str(tmp_path / "absent"), option, value), f"{option} ",
                             "is outside [-1, 1]")
    assert "does not exist" not in line


@pytest.mark.parametrize("value", [float("nan"), 1.5, -1.01, float("inf")])
def test_the_python_api_refuses_the_same_thresholds_before_opening_the_model(tmp_path: Path, value: float) -> None:
    from mmdetect.analysis.chains import find_chains
    from mmdetect.analysis.heads import scan_heads

    absent = str(tmp_path / "absent")
    api_error(lambda: mmdetect.scan(absent, threshold=value), UsageError,
              f"--threshold {value} is outside [-1, 1]: cosines lie in [-1, 1]")
    api_error(lambda: scan_heads(absent, threshold=value), UsageError,
              f"--threshold {value} is outside [-1, 1]: copying scores lie in [-1, 1]")
    api_error(lambda: find_chains(absent, threshold=value), UsageError,
              f"--threshold {value} is outside [-1, 1]: cosines lie in [-1, 1]")
    api_error(lambda: find_chains(absent, head_threshold=value), UsageError,
              f"--head-threshold {value} is outside [-1, 1]: copying scores lie in [-1, 1]")




@pytest.mark.parametrize("value", [1.5, "x", True])
def test_a_track_and_a_sweep_config_refuse_a_bad_threshold_with_the_same_check(tmp_path: Path, value: object) -> None:
    from mmdetect.sweep.config import Invalid, ScanOptions, _threshold
    from mmdetect.track import track

    # The same check (errors.check_unit); a config keeps its own words for it.
    with pytest.raises(Invalid, match=r"^threshold must be a number in \[-1, 1\], got "):
        _threshold(value)
    assert ScanOptions().threshold == -0.5
    if isinstance(value, float):
        api_error(lambda: track([str(tmp_path / "absent")], output_dir=tmp_path / "out", threshold=value),
                  UsageError, f"--threshold {value} is outside [-1, 1]: cosines lie in [-1, 1]")


# -- --text and --dataset ---------------------------------------------------------------------------------------

def _big_text(path: Path, size: int = 300 << 20) -> Path:
    """``size`` bytes: 8 MB of prose, then (sparse) zero bytes, which a reader that went that far would refuse as
    binary: reading only what the tokens need never gets there."""
    with open(path, "wb") as fh:
        fh.write(("Once upon a time a tiny model read a very long book. " * 160_000).encode())
        fh.truncate(size)
    return path


def _windows(**source: str) -> list[Any]:
    return list(windows(resolve_source(**source), Vocab(256), 64, 256))


def test_a_300_mb_text_is_read_only_as_far_as_the_tokens_need(tmp_path: Path) -> None:
    big = _big_text(tmp_path / "big.txt")
    got = _windows(text=str(big))
    assert sum(len(w.ids) for w in got) == 256
    assert bytes(got[0].ids.tolist()).decode().startswith("Once upon a time")
    small = tmp_path / "small.txt"
    small.write_text("Short and complete.\n")
    assert bytes(_windows(text=str(small))[0].ids.tolist()) == b"Short and complete.\n"


def test_explain_on_a_300_mb_text_runs_in_bounded_memory(llama: Tiny, tmp_path: Path) -> None:
    """The whole command under a 4 GB address-space cap: reading the file whole (and tokenising it into a
    300-million-entry list) would need several times that."""
    big = _big_text(tmp_path / "big.txt")
    out = tmp_path / "n7.json"
    proc = run_limited(["explain", str(llama.path), "-l", "1", "-n", "7", "--text", str(big), "--max-tokens", "256",
                        "--format", "json", "-o", str(out)], 4 << 30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    evidence = json.loads(out.read_text())["activations"]
    assert evidence["source"].startswith("text file big.txt") and evidence["rows"] * evidence["seq_len"] >= 256


def test_a_jsonl_dataset_is_read_only_as_far_as_the_tokens_need(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    with open(data, "w") as fh:
        for k in range(20_000):
            fh.write(f'{{"text": "record {k} of a long dataset"}}\n')
    got = _windows(dataset=str(data))
    assert bytes(got[0].ids[:26].tolist()) == b"record 0 of a long dataset"
    assert sum(len(w.ids) for w in got) == 256


@pytest.mark.parametrize("option", ["text", "dataset"])
def test_a_fifo_as_text_is_one_line(tmp_path: Path, option: str) -> None:
    fifo = tmp_path / "text.txt"
    os.mkfifo(fifo)
    api_error(lambda: _windows(**{option: str(fifo)}), MMDetectError, f"--{option} ")


def test_a_dataset_line_longer_than_a_record_can_be(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    with open(data, "wb") as fh:
        fh.write(b'{"text": "')
        fh.truncate(100 << 20)  # one 100 MB line of NULs, sparse
    api_error(lambda: _windows(dataset=str(data)), CorruptInputError, "is a binary file (a NUL byte at offset 10)")
    (tmp_path / "d.csv").write_text("a,b\n")
    api_error(lambda: _windows(dataset=str(tmp_path / "d.csv")), UnsupportedError, "--dataset")
