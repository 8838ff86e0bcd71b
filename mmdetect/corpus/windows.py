"""A corpus as windows of token ids: the one packing rule of the corpus pass, deterministic, read as it is used.

Packing, for ``windows(source, vocab, seq_len, max_tokens, shard)``:

* Text documents are tokenised in corpus order with the checkpoint's tokenizer, without special tokens (with no
  tokenizer, a document's UTF-8 bytes are its ids). A document that gives no token is left out.
* Consecutive text documents are joined into one stream with EOS between each two (the tokenizer's EOS id; nothing
  when it has none, or with bytes as ids).
* The stream is cut into consecutive windows of ``seq_len - 1`` tokens, each preceded by BOS, when the tokenizer has
  a BOS; of ``seq_len`` tokens, without one, otherwise. A window may start with the EOS that ends the document
  before it. The last, partial window of a stream is kept when it holds at least one corpus token.
* A pre-tokenised row (an ``ids`` record) is one window on its own, cut at ``seq_len``, fed as it is: no BOS is
  added, and ``bos`` is False even when it starts with the BOS id. Its ids must be ``0 <= id < vocab.size``.
  An ids row ends the text stream before it: that stream's last partial window comes first, and the text after the
  row starts a new stream (no EOS across the row).
* ``max_tokens`` caps the ids fed, BOS included, over the whole corpus (before sharding): the window that reaches
  the cap is cut to fit it (and dropped when only its BOS would be left), and nothing is read after it.
* Windows are numbered 0, 1, 2, ... in that order (``Window.index``); ``shard=(i, n)`` keeps those with
  ``index % n == i``, so the n shards of one run partition its windows exactly.

Incremental tokenisation: a document is tokenised ``TOKENIZE_CHARS`` characters at a time, so the cost of a run is
proportional to the text it uses, and a 2 GB one-line file with a small ``max_tokens`` reads only its start. While
more than ``TOKENIZE_CHARS`` characters of a document are waiting, the first ``TOKENIZE_CHARS`` are cut just before
their last whitespace character that lies in their second half (at ``TOKENIZE_CHARS`` when there is none), that head
is tokenised, and the rest waits for more text; the end of the document tokenises whatever is left. The cuts depend
only on the document's text, never on how the source delivered it, so every run (and every shard) cuts alike. A
document shorter than ``TOKENIZE_CHARS`` is tokenised whole. Cutting before a whitespace keeps the tokens of
byte-level BPE tokenizers (GPT-2's pre-tokeniser splits before a space) and of bytes as ids; a SentencePiece
tokenizer that prefixes every call with ``▁`` may tokenise the one word after a cut differently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from mmdetect.corpus.sources import CorpusSource, Piece
from mmdetect.corpus.vocab import Vocab
from mmdetect.errors import CorruptInputError, UsageError

TOKENIZE_CHARS = 1 << 16  # characters tokenised at a time in a long document
MIN_SEQ_LEN = 2


@dataclass(frozen=True)
class Window:
    index: int          # position of this window in the whole corpus's window order (0-based), before sharding
    ids: np.ndarray     # int64 [len <= seq_len]
    bos: bool           # True when ids[0] is a BOS that windows() added (that position is not a corpus token)


def _check(seq_len: int, max_tokens: int | None, shard: tuple[int, int]) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < MIN_SEQ_LEN:
        raise UsageError(f"--seq-len {seq_len!r} is too short: use at least {MIN_SEQ_LEN}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer))
                                   or max_tokens < 1):
        raise UsageError(f"--max-tokens {max_tokens!r} must be a positive number of tokens")
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise UsageError(f"--shard {i}/{n}: give I/N with 0 <= I < N")


def _cut(text: str) -> int:
    """Where to cut a long document's waiting text: before the last whitespace of its first ``TOKENIZE_CHARS``
    characters that lies in their second half, else at ``TOKENIZE_CHARS``."""
    head = text[:TOKENIZE_CHARS]
    for at in range(len(head) - 1, len(head) // 2 - 1, -1):
        if head[at].isspace():
            return at if at > 0 else TOKENIZE_CHARS
    return TOKENIZE_CHARS


class _Packer:
    """The stream of one run: token ids waiting for a window, the cap, the window counter."""

    def __init__(self, source: CorpusSource, vocab: Vocab, seq_len: int, max_tokens: int | None) -> None:
        self.source, self.vocab = source, vocab
        self.bos, self.eos = vocab.bos_id, vocab.eos_id
        self.width = seq_len - (1 if self.bos is not None else 0)
        self.seq_len = seq_len
        self.left = max_tokens    # ids that may still be fed (None: no cap)
        self.index = 0
        self.waiting: list[int] = []
        self.joined = False       # the stream holds a document: the next one starts with EOS
        self.doc_started = False  # the current document has given a token
        self.record = 0           # records (documents and ids rows) read, for messages

    @property
    def full(self) -> bool:
        return self.left is not None and self.left <= 0

    def _emit(self, ids: np.ndarray, bos: bool) -> Window | None:
        """The next window of ``ids`` (BOS included), cut to the cap; None when nothing of the corpus would fit."""
        if self.left is not None:
            if len(ids) > self.left:
                ids = ids[:self.left]
            if len(ids) <= (1 if bos else 0):
                self.left = 0
                return None
            self.left -= len(ids)
        window = Window(self.index, ids, bos)
        self.index += 1
        return window

    def _stream_window(self, piece: list[int]) -> Window | None:
        body = np.asarray(piece, dtype=np.int64)
        self._in_vocab(body, "text")
        if self.bos is None:
            return self._emit(body, False)
        return self._emit(np.concatenate([np.asarray([self.bos], dtype=np.int64), body]), True)

    def add_tokens(self, ids: list[int]) -> Iterator[Window]:
        """Tokens of the current document: whole windows as soon as they fill."""
        if not ids:
            return
        if self.joined and self.eos is not None and not self.doc_started:
            self.waiting.append(self.eos)
        self.doc_started = True
        self.waiting.extend(ids)
        while len(self.waiting) >= self.width and not self.full:
            piece, self.waiting = self.waiting[:self.width], self.waiting[self.width:]
            window = self._stream_window(piece)
            if window is not None:
                yield window

    def flush(self) -> Iterator[Window]:
        """The stream's last partial window; the next text starts a new stream."""
        if self.waiting and not self.full:
            window = self._stream_window(self.waiting)
            if window is not None:
                yield window
        self.waiting, self.joined = [], False

    def document(self, parts: Iterator[Any], first: str) -> Iterator[Window]:
        """One text document (``first`` and, while it is a Piece, the parts after it), tokenised incrementally."""
        self.record += 1
        self.doc_started = False
        text, more = str(first), isinstance(first, Piece)
        while True:
            while len(text) > TOKENIZE_CHARS and not self.full:
                at = _cut(text)
                yield from self.add_tokens(self.vocab.encode(text[:at]))
                text = text[at:]
            if not more or self.full:
                break
            nxt = next(parts, "")
            if isinstance(nxt, np.ndarray):
                raise CorruptInputError(f"{self.source.name}: a document was cut short by an ids row (a reader "
                                        f"bug): report it")
            text, more = text + str(nxt), isinstance(nxt, Piece)
        if text and not self.full:
            yield from self.add_tokens(self.vocab.encode(text))
        if self.doc_started:
            self.joined = True

    def ids_row(self, row: np.ndarray) -> Iterator[Window]:
        self.record += 1
        yield from self.flush()
        row = np.array(np.asarray(row).reshape(-1)[:self.seq_len], dtype=np.int64)  # a copy: not a view of a batch
        self._in_vocab(row, "ids")
        if len(row) and not self.full:
            window = self._emit(row, False)
            if window is not None:
                yield window

    def _in_vocab(self, ids: np.ndarray, what: str) -> None:
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab.size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab.size)][0])
            origin = "its 'ids' row" if what == "ids" else "the tokenizer gave it"
            raise CorruptInputError(f"{self.source.name} record {self.record} ({origin}): token id {bad} is outside "
                                    f"this model's vocabulary of {self.vocab.size}: give ids made with this model's "
                                    f"tokenizer")


def _all_windows(source: CorpusSource, vocab: Vocab, seq_len: int, max_tokens: int | None) -> Iterator[Window]:
    packer = _Packer(source, vocab, seq_len, max_tokens)
    parts = iter(source.parts())
    try:
        for part in parts:
            if isinstance(part, np.ndarray):
                yield from packer.ids_row(part)
            else:
                yield from packer.document(parts, part)
            if packer.full:
                return
        yield from packer.flush()
    finally:
        close = getattr(parts, "close", None)
        if close is not None:  # a generator holding a file: close it now, not when it is collected
            close()
    if packer.index == 0:
        raise CorruptInputError(f"{source.name} holds no text: give a corpus with text in it")


def windows(source: CorpusSource, vocab: Vocab, seq_len: int = 512, max_tokens: int | None = None,
            shard: tuple[int, int] = (0, 1)) -> Iterator[Window]:
    """The corpus's windows in order (module docstring), those of shard ``(i, n)`` only: ``index % n == i``."""
    _check(seq_len, max_tokens, shard)
    i, n = shard
    for window in _all_windows(source, vocab, int(seq_len), None if max_tokens is None else int(max_tokens)):
        if window.index % n == i:
            yield window


def tokenizer_identity(vocab: Vocab) -> str:
    """What decides the ids a text becomes: the tokenizer's full definition (its ``tokenizer.json`` text, or its
    vocabulary), BOS and EOS, and the vocabulary size; ``bytes`` with no tokenizer."""
    tok = vocab.tokenizer
    digest = hashlib.sha256(f"size={vocab.size}\0bos={vocab.bos_id}\0eos={vocab.eos_id}\0".encode())
    if tok is None:
        digest.update(b"bytes")
        return digest.hexdigest()
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "backend", None)
    to_str = getattr(backend, "to_str", None)
    if callable(to_str):
        digest.update(str(to_str()).encode("utf-8", "replace"))
    else:  # a slow (Python) tokenizer: its class and vocabulary
        digest.update(type(tok).__name__.encode())
        get_vocab = getattr(tok, "get_vocab", None)
        if callable(get_vocab):
            for token, idx in sorted(get_vocab().items(), key=lambda kv: kv[1]):
                digest.update(f"{idx}\0{token}\0".encode("utf-8", "replace"))
    return digest.hexdigest()


def corpus_digest(source: CorpusSource, vocab: Vocab, seq_len: int, max_tokens: int | None) -> str:
    """The identity of one run's windows, which a resumed run must match: the corpus, the tokenizer, ``seq_len``
    and ``max_tokens`` (the packing rule itself is fixed; ``PACKING`` names its version)."""
    text = f"{PACKING}\0{source.digest}\0{tokenizer_identity(vocab)}\0{seq_len}\0{max_tokens}\0{TOKENIZE_CHARS}"
    return hashlib.sha256(text.encode()).hexdigest()


PACKING = "mmdetect-windows-1"  # bump when the packing rule changes, so no partial state of the old rule is resumed
