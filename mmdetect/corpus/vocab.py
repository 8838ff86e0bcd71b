"""Text for activation evidence: where it comes from, and how it becomes rows of token ids.

Sources, in the order ``explain`` and ``scan --verify`` look for them:

* ``--text FILE``: one plain-text file, read as one document;
* ``--dataset PATH``: a local ``.jsonl`` (one JSON object per line with a text field, ``"text"`` unless
  ``--field`` says otherwise, or an ``"ids"`` list of token ids) or ``.txt`` (documents separated by blank lines);
* the default corpus shipped in ``mmdetect/data/corpus.txt``: about 7 KB of plain English written for mmdetect
  (short children's stories, dialogue, a letter, lists, encyclopedic and practical paragraphs, a few lines of
  Python). It is not a sample of any dataset; it exists so that evidence works offline, and is small, so
  numbers from it are a first look rather than a measurement.

A :class:`Vocab` turns text into ids with the checkpoint's own tokenizer (transformers', else its ``tokenizer.json``
through the ``tokenizers`` package), or, when there is none, with the text's UTF-8 bytes as ids (modulo the vocabulary
size when it is smaller than 256). Token ids read as the tokenizer means them (``mmdetect.corpus.tokens``:
byte-level BPE, SentencePiece ``▁`` and ``<0x0A>`` byte tokens, a GGUF's own token list); with no vocabulary at all they
are shown as ``#id`` in weight views, and contexts are shown as the bytes they were fed as.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdetect.corpus import tokens as tok_text
from mmdetect.errors import CorruptInputError, MMDetectError, NotFoundError, UnsupportedError, warn
from mmdetect.io import hub

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
CHARS_PER_TOKEN = 64             # more characters than any tokenizer's tokens average (see _budget)
MAX_RECORD_CHARS = 64 << 20      # one JSONL record (a line) at most
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


@dataclass
class Corpus:
    name: str
    description: str
    documents: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)  # pre-tokenised documents (JSONL "ids")


def _paragraphs(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def default_corpus() -> Corpus:
    docs = _paragraphs(DEFAULT.read_text(encoding="utf-8"))
    return Corpus("default", f"mmdetect's default corpus ({len(docs)} short English texts written for mmdetect, "
                             f"stories, dialogue, lists, prose and Python)", docs)


def _budget(max_tokens: int | None) -> int | None:
    """Characters of a source that can hold ``max_tokens`` tokens: no tokenizer's tokens average anywhere near
    ``CHARS_PER_TOKEN`` characters (bytes as ids take one each), so the first ``max_tokens`` ids are the same as
    from the whole file, and a 300 MB file with --max-tokens 256 costs 16 KB."""
    return None if max_tokens is None else max_tokens * CHARS_PER_TOKEN + 4096


def _read_prefix(path: Path, limit: int | None, option: str) -> tuple[str, bool]:
    """(A text file's first ``limit`` characters, cut back to a whitespace, whether the file goes on): all of it when
    ``limit`` is None."""
    from mmdetect.io.paths import open_regular

    try:
        fd = open_regular(path)
    except MMDetectError as exc:
        raise type(exc)(f"{option} {exc}") from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as fh:
        body = fh.read(-1 if limit is None else limit)
        more = limit is not None and len(body) == limit and fh.read(1) != ""
    if more:
        cut = max(body.rfind(" "), body.rfind("\n"))
        body = body[:cut] if cut > len(body) // 2 else body
    return body, more


def load_corpus(text: str | None = None, dataset: str | None = None, field_name: str = "text",
                max_tokens: int | None = None) -> Corpus:
    """The corpus for ``--text`` / ``--dataset`` (at most one), or the default corpus.

    With ``max_tokens`` only what can hold that many tokens is read (``_budget``): memory and time stay bounded
    whatever the file's size.
    """
    if text and dataset:
        raise CorruptInputError("give either --text or --dataset, not both")
    if text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise NotFoundError(f"--text {text} is not a file: give a plain-text file")
        body, _ = _read_prefix(path, _budget(max_tokens), "--text")
        if not body.strip():
            raise CorruptInputError(f"--text {text} is empty")
        return Corpus(str(path), f"text file {path.name}", [body])
    if dataset:
        return _dataset(Path(dataset).expanduser(), field_name, _budget(max_tokens))
    return default_corpus()


def _dataset(path: Path, field_name: str, budget: int | None = None) -> Corpus:
    """Documents of a .txt or .jsonl file, read until ``budget`` characters (or ids) are collected."""
    if not path.is_file():
        raise NotFoundError(f"--dataset {path} is not a file: give a local .jsonl or .txt file")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        body, more = _read_prefix(path, budget, "--dataset")
        paragraphs = _paragraphs(body)
        if not paragraphs:
            raise CorruptInputError(f"--dataset {path} holds no text")
        return Corpus(str(path), f"{path.name} ({'first ' if more else ''}{len(paragraphs)} documents)", paragraphs)
    if suffix not in (".jsonl", ".ndjson", ".json"):
        raise UnsupportedError(f"--dataset {path}: use a .jsonl file (one object per line with a {field_name!r} "
                               f"field) or a .txt file (documents separated by blank lines)")
    from mmdetect.io.paths import open_regular

    # Rows take every text record before any "ids" record (Vocab.rows), so reading stops once the text alone fills
    # the budget; ids records past the budget are parsed but not kept.
    docs: list[str] = []
    ids: list[list[int]] = []
    chars = n_ids = n_records = 0
    more = False
    longest = MAX_RECORD_CHARS if budget is None else max(budget, MAX_RECORD_CHARS)
    with os.fdopen(open_regular(path), encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(iter(lambda: fh.readline(longest + 1), ""), 1):
            if len(line) > longest:
                raise CorruptInputError(f"--dataset {path} line {n} is longer than {longest:,} characters: one "
                                        f"record per line")
            if not line.strip():
                continue
            try:
                rec: Any = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise CorruptInputError(f"--dataset {path} line {n} is not JSON ({getattr(exc, 'msg', exc)}): one "
                                        f"JSON object per line") from exc
            n_records += 1
            if isinstance(rec, dict) and isinstance(rec.get(field_name), str):
                rec = rec[field_name]
            if isinstance(rec, str):
                docs.append(rec)
                chars += len(rec)
            elif isinstance(rec, dict) and isinstance(rec.get("ids"), list) and \
                    all(isinstance(i, int) for i in rec["ids"]):
                if budget is None or n_ids * CHARS_PER_TOKEN < budget:
                    ids.append([int(i) for i in rec["ids"]])
                    n_ids += len(rec["ids"])
            else:
                raise CorruptInputError(f"--dataset {path} line {n} has no {field_name!r} string or 'ids' list: "
                                        f"use --field NAME for another text field")
            if budget is not None and chars >= budget:
                more = fh.read(1) != ""
                break
    if not docs and not ids:
        raise CorruptInputError(f"--dataset {path} holds no records")
    return Corpus(str(path), f"{path.name} ({'first ' if more else ''}{n_records} records)", docs, ids)


class Vocab:
    """Token ids <-> text for one checkpoint: its tokenizer, GGUF token strings, or bare ids."""

    def __init__(self, size: int, tokenizer: Any = None, tokens: tok_text.TokenTable | list[str] | None = None) -> None:
        self.size = size
        self.tokenizer = tokenizer
        if tokens is not None and not isinstance(tokens, tok_text.TokenTable):
            tokens = tok_text.TokenTable(list(tokens), tok_text.guess_scheme(tokens))
        self.table: tok_text.TokenTable | None = tokens if tokens else None
        self.tokens = list(tokens.pieces) if tokens else None
        self.kind = "tokenizer" if tokenizer is not None else ("gguf" if tokens else "ids")
        self.bytes = False  # set once text has been encoded as UTF-8 bytes (no tokenizer)
        self._labels: dict[int, str] = {}
        self._table_done = tokenizer is None

    @property
    def bos_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if isinstance(bos, int) else None

    @property
    def eos_id(self) -> int | None:
        """The tokenizer's end-of-sequence id (``corpus.windows`` puts it between documents), or None."""
        if self.tokenizer is None:
            return None
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return int(eos) if isinstance(eos, int) and not isinstance(eos, bool) else None

    def _token_table(self) -> tok_text.TokenTable | None:
        """The tokenizer's token strings and scheme, read once (None when its scheme cannot be told)."""
        if not self._table_done:
            self._table_done = True
            self.table = getattr(self.tokenizer, "table", None) or tok_text.table_from_transformers(self.tokenizer)
        return self.table

    def label(self, token_id: int) -> str:
        """What token ``token_id`` reads as, leading space included: its text (a
        :class:`mmdetect.corpus.tokens.TokenText`,
        whose ``repr`` shows control characters and partial UTF-8 as escapes), or ``#id``."""
        token_id = int(token_id)
        if token_id not in self._labels:
            table = self._token_table()
            text: str | None = table.label(token_id) if table is not None else None
            if text is None and self.tokenizer is not None and table is None:
                text = self._decode(token_id)
            self._labels[token_id] = text if text is not None else f"#{token_id}"
        return self._labels[token_id]

    def _decode(self, token_id: int) -> str:
        # Decoders strip a leading space from the first token (SentencePiece) or merge pieces, so decode the token
        # after a fixed anchor token and keep what it adds.
        tok = self.tokenizer
        try:
            if token_id in set(getattr(tok, "all_special_ids", []) or []):
                return str(tok.convert_ids_to_tokens(token_id))
            if not hasattr(self, "_anchor"):
                ids = tok.encode("x", add_special_tokens=False)
                self._anchor = ids[-1] if ids else None
                self._anchor_text = tok.decode([self._anchor]) if ids else ""
            if self._anchor is not None:
                both = tok.decode([self._anchor, token_id])
                if both.startswith(self._anchor_text) and len(both) > len(self._anchor_text):
                    return both[len(self._anchor_text):]
            text = tok.decode([token_id])
        except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
            return f"#{token_id}"
        return text if text else f"#{token_id}"

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        self.bytes = True
        raw = text.encode("utf-8")
        return list(raw) if self.size >= 256 else [b % self.size for b in raw]

    def text(self, ids: list[int]) -> str:
        """A run of corpus ids as readable text: the tokens' labels, or the bytes decoded when the corpus was fed
        as UTF-8 bytes."""
        if self.bytes and self.tokenizer is None and self.size >= 256:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        table = self._token_table()
        if table is not None:
            return table.text(ids)
        return "".join(self.label(i) for i in ids)

    def rows(self, corpus: Corpus, seq_len: int, max_tokens: int) -> list[list[int]]:
        """Rows of at most ``seq_len`` ids, each document cut into pieces that start with BOS (when the tokenizer
        has one), until ``max_tokens`` ids are collected."""
        bos = self.bos_id
        width = seq_len - (1 if bos is not None else 0)
        if width < 2:
            raise MMDetectError(f"--seq-len {seq_len} is too short: use at least 8")
        rows: list[list[int]] = []
        total = 0
        docs = [self.encode(d) for d in corpus.documents] + corpus.ids
        for ids in docs:
            bad = [i for i in ids if not 0 <= i < self.size]
            if bad:
                raise MMDetectError(f"token id {bad[0]} in {corpus.name} is outside this model's vocabulary of "
                                    f"{self.size}")
            for start in range(0, len(ids), width):
                piece = ids[start:start + width]
                if len(piece) < 2 and start:
                    continue
                row = ([bos] if bos is not None else []) + piece
                rows.append(row[: max(0, max_tokens - total)] if total + len(row) > max_tokens else row)
                total += len(rows[-1])
                if total >= max_tokens:
                    return [r for r in rows if r]
        return [r for r in rows if r]


def load_vocab(ckpt: Any, size: int, *, transformers: bool = True) -> Vocab:
    """The checkpoint's tokenizer when it ships one: transformers' ``AutoTokenizer``, else (or with
    ``transformers=False``) its ``tokenizer.json`` through the ``tokenizers`` package; a GGUF's own token list; else
    bare ids. For a hub id the tokenizer files of the weights' commit are fetched first (``io.hub.tokenizer``)."""
    if ckpt.format == "gguf":
        return Vocab(size, tokens=_gguf_tokens(ckpt.path))
    path = Path(ckpt.path)
    if getattr(ckpt, "from_hub", False):
        try:
            path = hub.tokenizer(ckpt.ref, ckpt.revision)
        except NotFoundError as exc:  # the weights are here: go on with what the snapshot has
            warn(f"the tokenizer of {ckpt.ref} could not be fetched ({exc})")
    _no_special_files(path)
    if transformers and any((path / name).exists() for name in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            return Vocab(size, tokenizer=AutoTokenizer.from_pretrained(str(path)))
        except Exception:  # no usable tokenizer there (or no transformers): try tokenizer.json, then ids
            pass
    json_tok = tok_text.load_tokenizer_json(path)
    if json_tok is not None:
        return Vocab(size, tokenizer=json_tok)
    return Vocab(size)


def _no_special_files(folder: Path) -> None:
    """transformers opens the tokenizer's files (and others) by name: a FIFO among them would block it forever."""
    import stat

    from mmdetect.io.paths import kind

    for entry in folder.iterdir():
        try:
            mode = entry.stat().st_mode
        except OSError:  # a dangling link: transformers reports it, or skips it
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UnsupportedError(f"{entry} is a {kind(mode)}, not a regular file: the tokenizer would block reading "
                                   f"it; remove it from the model folder")


def _gguf_tokens(path: Path) -> tok_text.TokenTable | None:
    """The GGUF's own token list and its scheme (``tokenizer.ggml.model``)."""
    return tok_text.read_gguf_vocab(path)
