"""Corpus sources and windows (mmdetect.corpus.sources / .windows): exact packing, shards, every kind of source giving
the same windows for the same documents, digests, and hostile corpora (each with its one-line message).

No model is needed: a tiny character tokenizer (ids = code points, BOS 1, EOS 2) gives windows that can be written
out by hand; bytes as ids (``Vocab(256)``) and a real ``tokenizers`` BPE check the other two kinds of vocabulary.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import tracemalloc
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from builders import SHARED_MODELS, needs_shared

from mmdetect.corpus import sources as src
from mmdetect.corpus import windows as win
from mmdetect.corpus.sources import CorpusSource, Piece, resolve_source
from mmdetect.corpus.vocab import Vocab
from mmdetect.corpus.windows import Window, corpus_digest, windows
from mmdetect.errors import CorruptInputError, NotFoundError, UnsupportedError, UsageError

DOCS = ["ab", "cde", "f"]


class CharTok:
    """ids = code points (all below 256 here), BOS 1, EOS 2: windows can be written by hand."""

    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def char_vocab() -> Vocab:
    return Vocab(256, tokenizer=CharTok())


def ids_of(ws: list[Window]) -> list[list[int]]:
    return [w.ids.tolist() for w in ws]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def memory_source(parts: list[Any] | Iterator[Any], name: str = "mem") -> CorpusSource:
    items = parts if isinstance(parts, list) else None
    return CorpusSource(name, name, name, (lambda: iter(items)) if items is not None else (lambda: parts))


# -- packing -------------------------------------------------------------------------------------------------------

def test_text_windows_bos_eos_and_cuts(tmp_path: Path) -> None:
    source = resolve_source(dataset=str(write_txt(tmp_path / "d.txt", DOCS)))
    # stream: a b EOS c d e EOS f; width seq_len - 1 = 3, each window after a BOS
    got = list(windows(source, char_vocab(), seq_len=4))
    assert ids_of(got) == [[1, 97, 98, 2], [1, 99, 100, 101], [1, 2, 102]]
    assert [w.index for w in got] == [0, 1, 2] and all(w.bos for w in got)
    assert all(w.ids.dtype == np.int64 for w in got)
    # max_tokens counts BOS: 6 ids = one whole window and [BOS, c]; 5 would leave only a BOS, which is dropped
    assert ids_of(list(windows(source, char_vocab(), 4, max_tokens=6))) == [[1, 97, 98, 2], [1, 99]]
    assert ids_of(list(windows(source, char_vocab(), 4, max_tokens=5))) == [[1, 97, 98, 2]]
    assert ids_of(list(windows(source, char_vocab(), 4, max_tokens=1))) == []


def test_bytes_as_ids_without_bos(tmp_path: Path) -> None:
    source = resolve_source(dataset=str(write_txt(tmp_path / "d.txt", ["ab", "cdé"])))
    got = list(windows(source, Vocab(256), seq_len=3))
    # no BOS, no EOS: bytes joined, windows of seq_len; é is two UTF-8 bytes
    assert ids_of(got) == [[97, 98, 99], [100, 0xC3, 0xA9]] and not any(w.bos for w in got)


def test_ids_rows_are_windows_of_their_own(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"ids": [1, 6, 7, 8, 9]}, {"text": "cd"}, "ef"])
    got = list(windows(resolve_source(dataset=str(data)), char_vocab(), seq_len=4))
    # the stream before the row is flushed; the row is cut at seq_len, bos False even though it starts with 1;
    # the text after the row starts a new stream (no EOS across the row)
    assert ids_of(got) == [[1, 97, 98], [1, 6, 7, 8], [1, 99, 100, 2], [1, 101, 102]]
    assert [w.bos for w in got] == [True, False, True, True]
    assert ids_of(list(windows(resolve_source(dataset=str(data)), char_vocab(), 4, max_tokens=5))) == \
        [[1, 97, 98], [1, 6]]


def test_long_document_is_tokenised_in_cuts_independent_of_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(win, "TOKENIZE_CHARS", 8)
    calls: list[str] = []

    class Recording(CharTok):
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            calls.append(text)
            return super().encode(text)

    text = "one two three four five six"
    whole = list(windows(memory_source([text]), Vocab(256, tokenizer=Recording()), seq_len=64))
    cuts = list(calls)
    calls.clear()
    pieces = [Piece(text[:3]), Piece(text[3:11]), Piece(text[11:12]), text[12:]]
    split = list(windows(memory_source(pieces), Vocab(256, tokenizer=Recording()), seq_len=64))
    assert ids_of(whole) == ids_of(split) == [[1] + [ord(c) for c in text]]
    # cut before the last whitespace in the second half of the first 8 characters
    assert cuts == calls == ["one two", " three", " four", " five", " six"]


def test_endless_document_stops_at_max_tokens() -> None:
    endless = (Piece("word " * 1000) for _ in itertools.count())
    got = list(windows(memory_source(endless), char_vocab(), seq_len=16, max_tokens=100))
    assert sum(len(w.ids) for w in got) == 100 and [len(w.ids) for w in got] == [16] * 6 + [4]


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_shards_partition_one_run(tmp_path: Path, n: int) -> None:
    docs = [f"document {i} " + "x" * (i % 7) for i in range(40)]
    source = resolve_source(dataset=str(write_txt(tmp_path / "d.txt", docs)))
    whole = list(windows(source, char_vocab(), seq_len=8, max_tokens=300))
    shards = [list(windows(source, char_vocab(), 8, 300, shard=(i, n))) for i in range(n)]
    assert all(w.index % n == i for i, shard in enumerate(shards) for w in shard)
    merged = sorted((w for shard in shards for w in shard), key=lambda w: w.index)
    assert [w.index for w in merged] == list(range(len(whole)))
    assert ids_of(merged) == ids_of(whole) and sum(len(w.ids) for w in whole) == 300


def test_parts_restart_and_are_lazy(tmp_path: Path) -> None:
    source = resolve_source(dataset=str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])))
    first = list(source.parts())
    assert first == list(source.parts()) == DOCS
    assert ids_of(list(windows(source, char_vocab(), 4))) == ids_of(list(windows(source, char_vocab(), 4)))


def test_bad_arguments() -> None:
    source = memory_source(DOCS)
    for kwargs, text in (({"seq_len": 1}, "--seq-len 1 is too short"), ({"max_tokens": 0}, "--max-tokens 0"),
                         ({"shard": (2, 2)}, "--shard 2/2")):
        with pytest.raises(UsageError, match=text):
            list(windows(source, char_vocab(), **kwargs))


# -- every kind of source -------------------------------------------------------------------------------------------

def _parquet(path: Path, columns: dict[str, Any]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def hub_cache(root: Path, name: str, records: dict[str, list[Any]], splits: tuple[str, ...] = ("train",)) -> Path:
    """A ``datasets`` cache holding ``name`` ("user/dataset") as a hub download leaves it
    (``user___dataset/default/0.0.0/<commit>/dataset-<split>.arrow`` and its ``dataset_info.json``), built from a
    local JSON file with datasets' own Json builder, so that ``load_dataset(name)`` finds it offline."""
    from datasets.packaged_modules.json.json import Json

    user, short = name.split("/")
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in splits:
        files[split] = str(write_jsonl(root / f"{split}.jsonl", [dict(zip(records, row))
                                                                 for row in zip(*records.values())]))
    built = root / "build"
    builder = Json(data_files=files, cache_dir=str(built), dataset_name=short, config_name="default", hash="c0ffee")
    builder.download_and_prepare()
    cache = root / "cache"
    target = cache / f"{user}___{short}" / "default" / "0.0.0" / "c0ffee"
    target.parent.mkdir(parents=True)
    os.rename(builder.cache_dir, target)  # .../<short>/default-<hash>/0.0.0/c0ffee -> the hub layout
    return cache


@pytest.fixture()
def offline_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    datasets = pytest.importorskip("datasets", reason="needs datasets: pip install 'mmdetect[corpus]'")
    import huggingface_hub.constants as hub_constants

    cache = hub_cache(tmp_path / "hub", "someone/tiny", {"text": DOCS}, ("train", "test"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_every_source_gives_the_same_windows(tmp_path: Path, offline_cache: Path) -> None:
    import datasets

    expected = [[1, 97, 98, 2], [1, 99, 100, 101], [1, 2, 102]]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(saved))
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS}),
                          "test": datasets.Dataset.from_dict({"body": ["zz"]})}).save_to_disk(str(saved_dict))
    cases = {
        "txt": resolve_source(dataset=str(write_txt(tmp_path / "d.txt", DOCS))),
        "md": resolve_source(dataset=str(write_txt(tmp_path / "d.md", DOCS))),
        "jsonl": resolve_source(dataset=str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS]))),
        "bare": resolve_source(dataset=str(write_jsonl(tmp_path / "b.ndjson", DOCS))),
        "field": resolve_source(dataset=str(write_jsonl(tmp_path / "f.jsonl", [{"body": t} for t in DOCS])),
                                field_name="body"),
        "parquet": resolve_source(dataset=str(_parquet(tmp_path / "d.parquet", {"text": DOCS}))),
        "saved": resolve_source(dataset=str(saved)),
        "saved_dict": resolve_source(dataset=str(saved_dict), field_name="body", split="train"),
        "hf": resolve_source(dataset="hf:someone/tiny"),
    }
    for name, source in cases.items():
        assert ids_of(list(windows(source, char_vocab(), 4))) == expected, name
    assert "split 'train'" in cases["hf"].description and "streamed" in cases["hf"].description
    other = resolve_source(dataset="hf:someone/tiny", split="test")
    assert ids_of(list(windows(other, char_vocab(), 4))) == expected and other.digest != cases["hf"].digest


def test_ids_columns(tmp_path: Path) -> None:
    import pyarrow as pa

    rows = [[5, 6, 7], [8, 9]]
    expected = [[5, 6, 7], [8, 9]]
    pq_path = _parquet(tmp_path / "ids.parquet", {"ids": pa.array(rows, type=pa.list_(pa.int32()))})
    source = resolve_source(dataset=str(pq_path))
    assert ids_of(list(windows(source, char_vocab(), 4))) == expected
    parts = list(source.parts())
    assert all(isinstance(p, np.ndarray) and p.dtype == np.int64 for p in parts)
    datasets = pytest.importorskip("datasets", reason="needs datasets: pip install 'mmdetect[corpus]'")
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(str(tmp_path / "saved"))
    assert ids_of(list(windows(resolve_source(dataset=str(tmp_path / "saved")), char_vocab(), 4))) == expected


def test_default_corpus_and_text_file(tmp_path: Path) -> None:
    source = resolve_source()
    assert source.name == "default"
    assert source.digest == hashlib.sha256(b"default\0" + src.DEFAULT.read_bytes()).hexdigest()
    docs = list(source.parts())
    assert len(docs) > 20 and all(isinstance(d, str) and d.strip() for d in docs)
    text = tmp_path / "t.txt"
    text.write_text("one\n\ntwo\n", encoding="utf-8")
    assert list(resolve_source(text=str(text)).parts()) == ["one\n\ntwo\n"]  # --text: one document, as it is


def test_real_bpe_tokenizer(tmp_path: Path) -> None:
    """A byte-level BPE tokenizer from the tokenizers package: windows hold exactly its ids for the documents."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mmdetect.corpus.tokens import JsonTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    docs = ["the cat sat on the mat", "the dog sat on the log"] * 3
    backend.train_from_iterator(docs, trainer)
    vocab = Vocab(backend.get_vocab_size(), tokenizer=JsonTokenizer(backend, "<s>"))
    assert vocab.bos_id == 0 and vocab.eos_id is None
    source = resolve_source(dataset=str(write_txt(tmp_path / "d.txt", docs)))
    stream = [i for d in docs for i in backend.encode(d).ids]  # no EOS: this tokenizer has none
    got = list(windows(source, vocab, seq_len=6))
    assert [i for w in got for i in w.ids[1:].tolist()] == stream
    assert all(w.ids[0] == 0 and w.bos and len(w.ids) <= 6 for w in got) and len(got[0].ids) == 6


@needs_shared("stories260K")
def test_real_tokenizer_from_shared_models(tmp_path: Path) -> None:
    folder = SHARED_MODELS / "stories260K"
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    vocab = Vocab(len(tok), tokenizer=tok)
    assert vocab.bos_id is not None and vocab.eos_id is not None
    docs = ["Once upon a time there was a cat.", "The cat liked to play."]
    got = list(windows(resolve_source(dataset=str(write_txt(tmp_path / "d.txt", docs))), vocab, seq_len=512))
    expected = [vocab.bos_id] + tok.encode(docs[0], add_special_tokens=False) + [vocab.eos_id] + \
        tok.encode(docs[1], add_special_tokens=False)
    assert ids_of(got) == [expected]


# -- digests ---------------------------------------------------------------------------------------------------------

def test_digest_follows_the_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_txt(tmp_path / "d.txt", DOCS)
    first = resolve_source(dataset=str(path)).digest
    assert resolve_source(dataset=str(path)).digest == first
    path.write_text(path.read_text().replace("cde", "cdx"), encoding="utf-8")  # same size
    assert resolve_source(dataset=str(path)).digest != first
    # a file too big to hash: its size, mtime_ns and ctime_ns; a same-size rewrite with the mtime put back still
    # moves the ctime
    monkeypatch.setattr(src, "HASH_CONTENT_BYTES", 0)
    st = os.stat(path)
    before = resolve_source(dataset=str(path)).digest
    path.write_text(path.read_text().replace("cdx", "cdy"), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
    assert resolve_source(dataset=str(path)).digest != before
    # the field read is part of it
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "body": "b"}])
    assert resolve_source(dataset=str(data)).digest != resolve_source(dataset=str(data), field_name="body").digest


def test_corpus_digest_covers_tokenizer_and_options() -> None:
    source = memory_source(DOCS)
    base = corpus_digest(source, char_vocab(), 512, None)
    assert base == corpus_digest(memory_source(DOCS), char_vocab(), 512, None)
    others = {corpus_digest(source, Vocab(256), 512, None), corpus_digest(source, char_vocab(), 256, None),
              corpus_digest(source, char_vocab(), 512, 1000), corpus_digest(memory_source(DOCS, "x"), char_vocab(),
                                                                            512, None)}
    assert base not in others and len(others) == 4


# -- hostile corpora -------------------------------------------------------------------------------------------------

def test_binary_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"text\x00\x01\x02binary")
    for kwargs in ({"text": str(path)}, {"dataset": str(path)}):
        with pytest.raises(CorruptInputError, match=r"is a binary file \(a NUL byte at offset 4\), not text"):
            resolve_source(**kwargs)
    late = tmp_path / "late.txt"  # a NUL past the first bytes resolve_source looks at: refused when read
    late.write_bytes(b"a" * (src.SNIFF_BYTES + 10) + b"\x00")
    with pytest.raises(CorruptInputError, match=f"NUL byte at offset {src.SNIFF_BYTES + 10:,}"):
        list(windows(resolve_source(text=str(late)), Vocab(256), 64))


def test_invalid_utf8_is_replaced_with_one_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(src, "CHUNK_BYTES", 4)  # bad bytes in several blocks, and a character cut by a block
    path = tmp_path / "d.txt"
    path.write_bytes(b"ab\xffcd\xc3\xa9\xfe\n\nxy\xff")
    source = resolve_source(dataset=str(path))
    assert list(source.parts()) == ["ab\ufffdcd\u00e9\ufffd", "xy\ufffd"]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "has invalid UTF-8 (first at byte 2)" in err


def test_empty_and_blank_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.txt"
    empty.write_bytes(b"")
    with pytest.raises(CorruptInputError, match="e.txt is empty"):
        resolve_source(dataset=str(empty))
    blank = tmp_path / "b.txt"
    blank.write_text("  \n\n \n", encoding="utf-8")
    with pytest.raises(CorruptInputError, match="holds no text"):
        list(windows(resolve_source(dataset=str(blank)), Vocab(256), 64))


def test_fifo_and_directory_refused_without_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("reading a FIFO blocked"))
    signal.alarm(10)
    try:
        for kwargs in ({"text": str(fifo)}, {"dataset": str(fifo)}):
            with pytest.raises(UnsupportedError, match=r"is a FIFO \(named pipe\), not a regular file"):
                resolve_source(**kwargs)
    finally:
        signal.alarm(0)
    with pytest.raises(UnsupportedError, match="is a directory, not a regular file"):
        resolve_source(text=str(tmp_path))
    with pytest.raises(UnsupportedError, match="not a dataset saved with datasets' save_to_disk"):
        resolve_source(dataset=str(tmp_path))
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_source(dataset=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UnsupportedError, match="give a .txt, .jsonl or .parquet file"):
        resolve_source(dataset=str(write_txt(tmp_path / "d.csv", DOCS)))
    with pytest.raises(UnsupportedError, match="either --text or --dataset"):
        resolve_source(text="a", dataset="b")


def test_bad_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "x", "n": 1}])
    with pytest.raises(CorruptInputError, match=r"d.jsonl line 2 has no 'text' string or 'ids' list \(it has "
                                                r"'body', 'n'\): use --field NAME"):
        list(resolve_source(dataset=str(data)).parts())
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n\n{"text": \n', encoding="utf-8")
    with pytest.raises(CorruptInputError, match="line 3 is not JSON"):
        list(resolve_source(dataset=str(broken)).parts())
    monkeypatch.setattr(src, "MAX_RECORD_BYTES", 32)
    long = write_jsonl(tmp_path / "l.jsonl", [{"text": "short"}, {"text": "x" * 100}])
    with pytest.raises(CorruptInputError, match="line 2 is longer than 32 bytes"):
        list(resolve_source(dataset=str(long)).parts())
    odd = write_jsonl(tmp_path / "o.jsonl", [{"ids": [1, "2"]}])
    with pytest.raises(CorruptInputError, match="line 1: its 'ids' list holds something other than integers"):
        list(resolve_source(dataset=str(odd)).parts())


def test_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ab"}, {"ids": [5, 300]}])
    with pytest.raises(CorruptInputError, match=r"d.jsonl record 2 \(its 'ids' row\): token id 300 is outside this "
                                                r"model's vocabulary of 256"):
        list(windows(resolve_source(dataset=str(data)), char_vocab(), 8))
    negative = write_jsonl(tmp_path / "n.jsonl", [{"ids": [-1]}])
    with pytest.raises(CorruptInputError, match="token id -1 is outside"):
        list(windows(resolve_source(dataset=str(negative)), char_vocab(), 8))
    with pytest.raises(CorruptInputError, match=r"record 1 \(the tokenizer gave it\): token id 97 is outside"):
        list(windows(memory_source(["a"]), Vocab(50, tokenizer=CharTok()), 8))


def test_bad_parquet(tmp_path: Path) -> None:
    fake = tmp_path / "d.parquet"
    fake.write_text("not parquet at all", encoding="utf-8")
    with pytest.raises(CorruptInputError, match="d.parquet is not a readable Parquet file"):
        resolve_source(dataset=str(fake))
    typed = _parquet(tmp_path / "t.parquet", {"text": [1, 2, 3]})
    with pytest.raises(CorruptInputError, match="column 'text' is int64, not strings: give --field NAME"):
        resolve_source(dataset=str(typed))
    other = _parquet(tmp_path / "o.parquet", {"body": ["a"]})
    with pytest.raises(CorruptInputError, match=r"has no 'text' column \(it has 'body'\): use --field NAME"):
        resolve_source(dataset=str(other))
    bad_ids = _parquet(tmp_path / "i.parquet", {"ids": [[1.5, 2.0]]})
    with pytest.raises(CorruptInputError, match="column 'ids' is list<element: double>, not a list of integers"):
        resolve_source(dataset=str(bad_ids))


def test_saved_dataset_without_the_split(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="needs datasets: pip install 'mmdetect[corpus]'")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(folder))
    with pytest.raises(NotFoundError, match=r"has no split 'validation' \(its splits: 'train', 'test'\): give "
                                            r"--split NAME"):
        resolve_source(dataset=str(folder), split="validation")
    assert list(resolve_source(dataset=str(folder), split="test").parts()) == ["b"]


def test_hub_dataset_errors(offline_cache: Path) -> None:
    with pytest.raises(NotFoundError, match=r"hf:someone/tiny has no split 'validation' \(its splits: 'train', "
                                            r"'test'\)"):
        resolve_source(dataset="hf:someone/tiny", split="validation")
    with pytest.raises(NotFoundError, match="hf:someone/absent cannot be loaded"):
        resolve_source(dataset="hf:someone/absent")
    with pytest.raises(NotFoundError, match="hf:someone/tiny:other cannot be loaded"):
        resolve_source(dataset="hf:someone/tiny:other")


def test_huge_one_line_file_reads_only_its_start(tmp_path: Path) -> None:
    """A 2 GB file with one line (sparse: 3 MB of text, then a hole) and a small max_tokens: windows() reads its
    first block and stops, in bounded memory; the hole (NUL bytes) is never reached."""
    path = tmp_path / "huge.txt"
    with open(path, "wb") as fh:
        fh.write(b"word " * (600 << 10))
        fh.truncate(2 << 30)
    source = resolve_source(dataset=str(path))
    tracemalloc.start()
    try:
        got = list(windows(source, Vocab(256), seq_len=64, max_tokens=256))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [len(w.ids) for w in got] == [64] * 4 and bytes(got[0].ids.tolist()) == b"word " * 12 + b"word"
    assert peak < 16 << 20
    # the same file read as --text: one document in pieces, also stopped early
    assert len(list(windows(resolve_source(text=str(path)), Vocab(256), 64, max_tokens=100))) == 2


def test_paragraph_pieces_keep_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents cut into pieces (a huge line, a long document) join back to exactly the text of the whole."""
    monkeypatch.setattr(src, "PIECE_CHARS", 5)
    text = "first line\r\nsecond\n\n\nabcdefghijklmnop qrs\nend\n  \nlast"
    blocks = [text[i:i + 3] for i in range(0, len(text), 3)]
    docs: list[str] = []
    held = ""
    for part in src._paragraphs_of(iter(blocks)):
        held += part
        if not isinstance(part, Piece):
            docs.append(held)
            held = ""
    assert docs == ["first line\nsecond", "abcdefghijklmnop qrs\nend", "last"]
