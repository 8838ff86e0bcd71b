"""A checkpoint's vocabulary: token ids <-> text, for the corpus pass and for weight views.

The corpora themselves are read by ``corpus.sources`` and cut into windows by ``corpus.windows``. A :class:`Vocab`
turns text into ids with the checkpoint's own tokenizer (transformers', else its ``tokenizer.json`` through the
``tokenizers`` package), or, when there is none, with the text's UTF-8 bytes as ids (modulo the vocabulary
size when it is smaller than 256). Token ids read as the tokenizer means them (``mmdetect.corpus.tokens``:
byte-level BPE, SentencePiece ``▁`` and ``<0x0A>`` byte tokens, a GGUF's own token list); with no vocabulary at all they
are shown as ``#id`` in weight views, and contexts are shown as the bytes they were fed as.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mmdetect.corpus import tokens as tok_text
from mmdetect.errors import NotFoundError, UnsupportedError, warn
from mmdetect.io import hub

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")


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
