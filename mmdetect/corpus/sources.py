"""Corpora for the corpus pass: where the text comes from, checked before a model is loaded, and read lazily.

:func:`resolve_source` turns the command line's ``--text`` / ``--dataset`` / ``--field`` / ``--split`` into a
:class:`CorpusSource`. Everything that can be checked without reading the documents is checked there (the path exists
and is a regular file or a saved dataset folder, a Parquet footer and its column types, a dataset's split), so a bad
corpus is one line before any weight is read. :meth:`CorpusSource.parts` then reads the corpus from its start, each
time it is called, one :data:`Part` at a time:

* a ``str``: one whole text document;
* a :class:`Piece` (a ``str`` subclass): a piece of a document that goes on in the next part; a huge document (a 2 GB
  file with one line) arrives as pieces of at most ``PIECE_CHARS`` characters, the last of them a plain ``str``, so
  that reading it takes bounded memory and stops when the caller stops;
* a 1-D ``np.ndarray`` of int64: one pre-tokenised row (an ``ids`` record).

Sources (``--dataset`` by suffix):

* ``--text FILE``: one plain-text document;
* ``.txt`` / ``.text`` / ``.md``: documents separated by blank lines (a line that holds only whitespace); lines end at
  ``\\n`` (a ``\\r`` before it is dropped), and a document's lines are joined with ``\\n``;
* ``.jsonl`` / ``.ndjson`` / ``.json``: one JSON value per line: an object with the text field (``--field``, default
  ``text``), an object with an ``ids`` list of ints, or a bare string; blank lines are skipped; a line is at most
  ``MAX_RECORD_BYTES``;
* ``.parquet`` / ``.pq``: a string column named by ``--field``, else a ``list<int>`` column ``ids``, read a batch of
  rows at a time;
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with ``--split``, default
  ``train``), with the same columns;
* ``hf:NAME[:CONFIG]``: a Hugging Face dataset through
  ``datasets.load_dataset(NAME, CONFIG, split=..., streaming=True)`` (with ``HF_HUB_OFFLINE=1``, from the local
  ``datasets`` cache);
* nothing: mmdetect's default corpus, ``mmdetect/data/corpus.txt``, read as paragraphs.

Hostile input: a FIFO, device or socket is refused from its ``stat`` and never opened for reading; a file with a NUL
byte (binary) is refused; invalid UTF-8 inside text is replaced with U+FFFD, with one warning per reading; an empty
file, a JSONL line without the text field, an over-long line, a non-Parquet ``.parquet`` file, a column of the wrong
type and a missing split are each one line (a :class:`~mmdetect.errors.MMDetectError`). A null text value (Parquet,
datasets) is an empty document, left out.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np

from mmdetect.corpus.vocab import DEFAULT
from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError, one_line, quoted, warn
from mmdetect.io.paths import kind, open_regular

CHUNK_BYTES = 1 << 20          # a text file is read this many bytes at a time
PIECE_CHARS = 1 << 20          # a document longer than this arrives in pieces
MAX_RECORD_BYTES = 64 << 20    # one JSONL record (a line) at most
HASH_CONTENT_BYTES = 64 << 20  # files up to this size are identified by their bytes, bigger ones by their stat
SNIFF_BYTES = 64 << 10         # what resolve_source reads of a text file to tell text from binary
BATCH_ROWS = 64                # rows per Parquet / datasets batch (text rows may be large)
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


class Piece(str):
    """A piece of a text document that goes on in the next part (the document's last piece is a plain ``str``)."""


Part = Union[str, np.ndarray]


@dataclass
class CorpusSource:
    """One corpus: ``name`` (a path or ``hf:NAME``), ``description`` (for provenance), ``digest`` (its identity for a
    resumed run: it changes when the corpus does), and ``parts()``, which reads it from the start on every call."""

    name: str
    description: str
    digest: str
    reader: Callable[[], Iterator[Part]] = field(repr=False)

    def parts(self) -> Iterator[Part]:
        return self.reader()


def resolve_source(text: str | None = None, dataset: str | None = None, field_name: str = "text",
                   split: str | None = None) -> CorpusSource:
    """The corpus for ``--text FILE`` or ``--dataset SRC`` (at most one), else the default corpus; checked as far as
    it can be without reading documents."""
    if text and dataset:
        raise UnsupportedError("give either --text or --dataset, not both")
    if not field_name:
        raise UnsupportedError("--field needs a column name")
    if text:
        path = _regular(Path(text).expanduser(), "--text", "a plain-text file")
        _sniff(path, "--text")
        return CorpusSource(str(path), f"text file {path.name} ({_size(path)})", _file_digest(path, "text"),
                            lambda: _whole_file(path, "--text"))
    if dataset is None:
        return _default_source()
    if dataset.startswith("hf:"):
        return _hub_source(dataset, field_name, split or "train")
    path = Path(dataset).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotFoundError(f"--dataset {dataset} does not exist: give a .txt, .jsonl or .parquet file, a folder "
                            f"written by datasets' save_to_disk, or hf:NAME[:CONFIG]") from None
    except OSError as exc:
        raise NotFoundError(f"--dataset {dataset}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        return _saved_source(path, field_name, split)
    path = _regular(path, "--dataset", "a .txt, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        _sniff(path, "--dataset")
        return CorpusSource(str(path), f"text file {path.name} ({_size(path)}; documents separated by blank lines)",
                            _file_digest(path, "paragraphs"), lambda: _paragraphs(path, "--dataset"))
    if suffix in JSONL_SUFFIXES:
        _sniff(path, "--dataset")
        return CorpusSource(str(path), f"JSONL file {path.name} ({_size(path)}; text field {field_name!r} or 'ids')",
                            _file_digest(path, f"jsonl:{field_name}"), lambda: _jsonl(path, field_name))
    if suffix in PARQUET_SUFFIXES:
        return _parquet_source(path, field_name)
    raise UnsupportedError(f"--dataset {path}: give a .txt, .jsonl or .parquet file, a folder written by datasets' "
                           f"save_to_disk, or hf:NAME[:CONFIG]")


# -- files -------------------------------------------------------------------------------------------------------

def _regular(path: Path, option: str, what: str) -> Path:
    """``path`` when it is a regular file (after symlinks); a FIFO or device is refused from its stat, unopened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise NotFoundError(f"{option} {path} does not exist: give {what}") from None
    except OSError as exc:
        raise NotFoundError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise UnsupportedError(f"{option} {path} is a {kind(mode)}, not a regular file: give {what}")
    if os.stat(path).st_size == 0:
        raise CorruptInputError(f"{option} {path} is empty: give a file with text in it")
    return path


def _size(path: Path) -> str:
    size = float(os.stat(path).st_size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return ""  # not reached


def _file_digest(path: Path, how: str) -> str:
    """A file's identity: the sha256 of its bytes when it is small enough to hash in a moment, else of its size,
    mtime_ns and ctime_ns (ctime moves on any write or rename, even one that keeps the size and the mtime)."""
    st = os.stat(path)
    digest = hashlib.sha256(f"{how}\0{os.path.realpath(path)}\0".encode())
    if st.st_size <= HASH_CONTENT_BYTES:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
                digest.update(block)
    else:
        digest.update(f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode())
    return digest.hexdigest()


def _sniff(path: Path, option: str) -> None:
    """Refuse a binary file before any model is loaded: a NUL byte in its first ``SNIFF_BYTES`` (UTF-8 text never
    has one; UTF-16 and every binary format do), or a start that is mostly not UTF-8."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    _refuse_nul(head, path, option, 0)
    decoded = head.decode("utf-8", errors="replace")
    if decoded.count("\ufffd") > max(8, len(decoded) // 10):
        raise CorruptInputError(f"{option} {path} is not UTF-8 text (most of its first bytes are not UTF-8): give a "
                                f"UTF-8 text file")


def _refuse_nul(block: bytes, path: Path, option: str, offset: int) -> None:
    at = block.find(b"\0")
    if at >= 0:
        raise CorruptInputError(f"{option} {path} is a binary file (a NUL byte at offset {offset + at:,}), not "
                                f"text: give a UTF-8 text file")


class _Utf8:
    """Bytes -> text for one reading of a file: invalid UTF-8 becomes U+FFFD, with one warning the first time."""

    def __init__(self, path: Path, option: str) -> None:
        self.path, self.option = path, option
        self.bad_at: int | None = None
        self.offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")

    def decode(self, block: bytes, final: bool = False) -> str:
        _refuse_nul(block, self.path, self.option, self.offset)
        try:
            text = self._decoder.decode(block, final)
        except UnicodeDecodeError as exc:
            pending = self._decoder.getstate()[0]
            if self.bad_at is None:
                self.bad_at = self.offset + exc.start - len(pending)
                warn(f"{self.option} {self.path} has invalid UTF-8 (first at byte {max(0, self.bad_at):,}): it is "
                     f"read with U+FFFD in its place")
            # The strict decoder stops at the first bad byte: decode this block again with replacement; a
            # multi-byte character cut by the block's end is kept for the next block.
            data = pending + block
            keep = 0 if final else _incomplete_tail(data)
            text = data[:len(data) - keep].decode("utf-8", errors="replace")
            self._decoder.reset()
            if keep:
                self._decoder.decode(data[len(data) - keep:], False)
        self.offset += len(block)
        return text


def _incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not finished yet (0 to 3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII)
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0


def _text_blocks(path: Path, option: str) -> Iterator[str]:
    """A text file's text, ``CHUNK_BYTES`` at a time (opened as a regular file only; never a FIFO)."""
    utf8 = _Utf8(path, option)
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK_BYTES), b""):
            text = utf8.decode(block)
            if text:
                yield text
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail


def _whole_file(path: Path, option: str) -> Iterator[Part]:
    """--text: the file as one document, in pieces of at most ``PIECE_CHARS``."""
    held = ""
    for block in _text_blocks(path, option):
        held += block
        while len(held) > PIECE_CHARS:
            yield Piece(held[:PIECE_CHARS])
            held = held[PIECE_CHARS:]
    yield held


def _paragraphs(path: Path, option: str) -> Iterator[Part]:
    """Documents separated by blank lines, read in blocks; a document (or a line) longer than ``PIECE_CHARS`` is
    given in pieces, so a one-line 2 GB file reads in bounded memory. A partial line of more than ``PIECE_CHARS``
    whitespace characters counts as text (it cannot be held to see whether the line stays blank)."""
    return _paragraphs_of(_text_blocks(path, option))


def _paragraphs_of(blocks: Iterator[str]) -> Iterator[Part]:
    doc: list[str] = []   # the current document's text not given yet
    held = 0              # its length
    open_doc = False      # the current document has text (given in pieces, or held)
    mid_line = False      # a huge line was given in part: the rest of it is text, joined without "\n"
    line = ""             # the current line, not ended yet
    for block in blocks:
        lines = (line + block).split("\n")
        line = lines.pop()
        for full in lines:
            full = full[:-1] if full.endswith("\r") else full
            if mid_line or full.strip():
                text = full if mid_line or not open_doc else "\n" + full
                doc.append(text)
                held += len(text)
                open_doc, mid_line = True, False
            elif open_doc:
                yield "".join(doc)
                doc, held, open_doc = [], 0, False
            if held > PIECE_CHARS:
                yield Piece("".join(doc))
                doc, held = [], 0
        if len(line) > PIECE_CHARS:  # a huge line: what is read of it so far is text of the current document
            doc.append(line if mid_line or not open_doc else "\n" + line)
            yield Piece("".join(doc))
            doc, held, line, open_doc, mid_line = [], 0, "", True, True
    line = line[:-1] if line.endswith("\r") else line
    if mid_line or line.strip():
        doc.append(line if mid_line or not open_doc else "\n" + line)
        open_doc = True
    if open_doc:
        yield "".join(doc)


def _default_source() -> CorpusSource:
    data = DEFAULT.read_bytes()
    return CorpusSource("default", "mmdetect's default corpus (short English texts written for mmdetect: stories, "
                                   "dialogue, lists, prose and Python)",
                        hashlib.sha256(b"default\0" + data).hexdigest(),
                        lambda: _paragraphs_of(iter([DEFAULT.read_text(encoding="utf-8")])))


# -- JSONL -------------------------------------------------------------------------------------------------------

def _jsonl(path: Path, field_name: str) -> Iterator[Part]:
    utf8 = _Utf8(path, "--dataset")
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        for n, raw in enumerate(iter(lambda: fh.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if len(raw) > MAX_RECORD_BYTES:
                raise CorruptInputError(f"--dataset {path} line {n} is longer than {MAX_RECORD_BYTES:,} bytes: one "
                                        f"record per line")
            line = utf8.decode(raw)
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise CorruptInputError(f"--dataset {path} line {n} is not JSON ({getattr(exc, 'msg', exc)}): one "
                                        f"JSON value per line") from None
            yield _record(rec, field_name, f"--dataset {path} line {n}")


def _record(rec: Any, field_name: str, where: str) -> Part:
    """One JSON / datasets record as a part: its text field, a bare string, or its ``ids`` list."""
    if isinstance(rec, dict) and isinstance(rec.get(field_name), str):
        return str(rec[field_name])
    if isinstance(rec, str):
        return rec
    if isinstance(rec, dict) and isinstance(rec.get("ids"), list):
        return _ids_row(rec["ids"], where)
    if isinstance(rec, dict) and field_name in rec and rec[field_name] is None:
        return ""
    keys = ", ".join(quoted(k, 30) for k in list(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
    raise CorruptInputError(f"{where} has no {field_name!r} string or 'ids' list (it has {keys}): use --field NAME "
                            f"for another text field")


def _ids_row(values: list[Any], where: str) -> np.ndarray:
    if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in values):
        raise CorruptInputError(f"{where}: its 'ids' list holds something other than integers: token ids are "
                                f"integers")
    try:
        return np.asarray(values, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise CorruptInputError(f"{where}: a token id in its 'ids' list is too large for any vocabulary") from None


# -- Parquet and datasets tables ---------------------------------------------------------------------------------

def _column(schema: Any, field_name: str, where: str) -> tuple[str, bool]:
    """(column, whether it holds ids) of a pyarrow schema: ``field_name`` as strings, else ``ids`` as lists of
    integers."""
    import pyarrow as pa

    names = list(schema.names)
    if field_name in names:
        typ = schema.field(field_name).type
        if pa.types.is_string(typ) or pa.types.is_large_string(typ) or getattr(pa.types, "is_string_view",
                                                                                 lambda _t: False)(typ):
            return field_name, False
        if field_name != "ids":
            raise CorruptInputError(f"{where}: column {field_name!r} is {typ}, not strings: give --field NAME of a "
                                    f"string column, or an 'ids' column of integer lists")
    if "ids" in names:
        typ = schema.field("ids").type
        if (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and pa.types.is_integer(typ.value_type):
            return "ids", True
        raise CorruptInputError(f"{where}: column 'ids' is {typ}, not a list of integers: token ids are lists of "
                                f"integers")
    shown = ", ".join(quoted(n, 30) for n in names[:12])
    raise CorruptInputError(f"{where} has no {field_name!r} column (it has {shown}): use --field NAME for the text "
                            f"column")


def _table_parts(batches: Iterator[Any], column: str, ids: bool, where: str, start: int = 0) -> Iterator[Part]:
    """The rows of pyarrow record batches (or tables) of one column, as parts; ``start`` numbers the first row."""
    row = start
    for batch in batches:
        col = batch.column(column) if hasattr(batch, "column") else batch[column]
        for value in col.to_pylist() if not ids else _list_rows(col):
            row += 1
            if ids:
                if value is None:
                    raise CorruptInputError(f"{where} row {row}: its 'ids' value is null or holds a null: token "
                                            f"ids are integers")
                yield value
            else:
                yield "" if value is None else value


def _list_rows(col: Any) -> Iterator[np.ndarray | None]:
    """A list<int> column's rows as int64 arrays, without a Python int per token; None for a null (or a null
    inside)."""
    import pyarrow as pa

    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    for chunk in chunks:
        if chunk.null_count or chunk.values.null_count:  # rare: row by row, to tell which rows hold nulls
            for item in chunk:
                ok = item.is_valid and not item.values.null_count
                yield item.values.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1) if ok else None
            continue
        # offsets index chunk.values (they already account for a sliced chunk)
        values = chunk.values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)
        for a, b in zip(offsets[:-1], offsets[1:]):
            yield values[a:b]


def _parquet_source(path: Path, field_name: str) -> CorpusSource:
    pq = _need("pyarrow", "pyarrow.parquet")
    where = f"--dataset {path}"
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as fh:
        try:
            meta = pq.ParquetFile(fh)
            schema, rows = meta.schema_arrow, meta.metadata.num_rows
        except Exception as exc:  # pyarrow.ArrowInvalid and friends: not Parquet, or a broken footer
            raise CorruptInputError(f"{where} is not a readable Parquet file ({one_line(exc)[:200]}): give a "
                                    f"Parquet file") from None
    column, ids = _column(schema, field_name, where)

    def read() -> Iterator[Part]:
        fd = open_regular(path)
        with os.fdopen(fd, "rb") as fh:
            try:
                batches = pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS, columns=[column])
                yield from _table_parts(batches, column, ids, where)
            except MMDetectError:
                raise
            except Exception as exc:  # a page that does not decode
                raise CorruptInputError(f"{where} is damaged ({one_line(exc)[:200]}): re-create it") from None

    return CorpusSource(str(path), f"Parquet file {path.name} ({rows:,} rows, column {column!r})",
                        _file_digest(path, f"parquet:{column}"), read)


def _need(package: str, module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        extra = "pip install 'mmdetect[corpus]'" if package == "datasets" else f"pip install {package}"
        raise UnsupportedError(f"reading this corpus needs the {package} package: {extra}") from None


def _saved_source(path: Path, field_name: str, split: str | None) -> CorpusSource:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    where = f"--dataset {path}"
    if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
        raise UnsupportedError(f"{where} is a directory but not a dataset saved with datasets' save_to_disk: give a "
                               f"file, or such a folder")
    datasets = _need("datasets", "datasets")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise CorruptInputError(f"{where} is not a readable saved dataset ({one_line(exc)[:200]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise NotFoundError(f"{where} has no split {split!r} (its splits: {', '.join(map(repr, loaded))}): "
                                f"give --split NAME")
        ds = loaded[split]
    else:
        ds = loaded
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise NotFoundError(f"{where} holds only the split {str(ds.split)!r}: give --split {ds.split} or leave "
                                f"--split out")
        split = str(ds.split) if ds.split is not None else None
    column, ids = _column(ds.data.schema, field_name, where)
    fingerprint = str(getattr(ds, "_fingerprint", ""))

    def read() -> Iterator[Part]:
        again = datasets.load_from_disk(str(path))
        table = again[split] if isinstance(again, datasets.DatasetDict) else again
        yield from _table_parts(table.with_format("arrow").iter(batch_size=BATCH_ROWS), column, ids, where)

    digest = hashlib.sha256(f"saved\0{os.path.realpath(path)}\0{split}\0{column}\0{fingerprint}".encode())
    what = f", split {split!r}" if split else ""
    return CorpusSource(str(path), f"saved dataset {path.name}{what} ({len(ds):,} rows, column {column!r})",
                        digest.hexdigest(), read)


# -- Hugging Face datasets ---------------------------------------------------------------------------------------

def _hub_source(spec: str, field_name: str, split: str) -> CorpusSource:
    """``hf:NAME[:CONFIG]``: checked through the dataset's builder (offline from the local cache with
    ``HF_HUB_OFFLINE=1``), read with ``load_dataset(..., streaming=True)``."""
    name, _, config = spec[3:].partition(":")
    where = f"--dataset {spec}"
    if not name:
        raise UnsupportedError(f"{where}: give hf:NAME or hf:NAME:CONFIG")
    datasets = _need("datasets", "datasets")
    _quiet(datasets)
    try:
        builder = datasets.load_dataset_builder(name, config or None)
    except Exception as exc:  # not on the hub, not in the cache offline, a config that does not exist
        raise NotFoundError(f"{where} cannot be loaded ({one_line(exc)[:300]}): check the name and config, or "
                            f"download it once without HF_HUB_OFFLINE") from None
    splits = builder.info.splits
    if splits and split not in splits:
        raise NotFoundError(f"{where} has no split {split!r} (its splits: {', '.join(map(repr, splits))}): give "
                            f"--split NAME")
    fingerprint = str(getattr(builder, "hash", "") or "")
    if splits and split in splits:
        fingerprint += f":{splits[split].num_examples}:{splits[split].num_bytes}"
    digest = hashlib.sha256(f"hf\0{name}\0{config}\0{split}\0{field_name}\0{fingerprint}".encode()).hexdigest()

    def read() -> Iterator[Part]:
        try:
            stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        except Exception as exc:
            raise NotFoundError(f"{where} cannot be streamed ({one_line(exc)[:300]})") from None
        for n, rec in enumerate(stream, 1):
            yield _record(rec, field_name, f"{where} row {n}")

    what = f", config {config!r}" if config else ""
    return CorpusSource(spec, f"Hugging Face dataset {name}{what}, split {split!r} (streamed)", digest, read)


def _quiet(datasets: Any) -> None:
    """datasets logs "using the latest cached version" and progress bars on every load; mmdetect's own progress
    is on stderr already."""
    try:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except AttributeError:
        pass
