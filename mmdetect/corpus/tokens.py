"""Token strings as the tokenizer means them: a vocabulary entry -> its bytes -> text, and a visible form of that text.

Vocabularies spell their tokens in one of a few schemes:

* ``byte_level`` (GPT-2, Llama 3, Qwen, most modern BPE): every byte is written as one printable character of GPT-2's
  ``bytes_to_unicode`` alphabet (``Ġ`` is a space, ``ĉ`` a tab, ``Ð¸`` the two bytes of ``и``); the inverse map gives
  the token's bytes back, which need not be whole UTF-8 characters.
* ``sentencepiece`` (Llama 1/2, Gemma, T5, Mistral's older vocabularies): ``▁`` is a space, and byte-fallback tokens
  ``<0x0A>`` stand for one byte each.
* ``wordpiece`` (BERT-style): ``##`` marks a continuation piece.
* ``plain``: the token string is the text.

Added, special, control and user-defined tokens (``<s>``, ``<|endoftext|>``) are spelled as plain text in every scheme.
The scheme comes from ``tokenizer.json`` (decoder / pre-tokenizer / normalizer / model), from a GGUF's
``tokenizer.ggml.model`` (``gpt2`` is byte-level, ``llama`` / ``t5`` / ``gemma4`` SentencePiece), or from a
transformers tokenizer's backend.

:func:`show` makes a token's bytes readable: quoted like ``repr`` (so leading and trailing spaces stay visible),
control characters escaped (``\\t``, ``\\n``, ``\\r``, ``\\x0c``, other C0/C1 characters as ``\\xNN``), and bytes that
are not valid UTF-8 (a token holding part of a character) kept as ``\\xNN`` escapes rather than mojibake.
:class:`TokenText` is a token's text as a ``str`` whose ``repr()`` is :func:`show`, so code that prints ``repr(label)``
or ``f"{label!r}"`` gets the visible form, and JSON gets the text.

Without transformers, :func:`load_tokenizer_json` reads a ``tokenizer.json`` with the ``tokenizers`` package (no torch)
for both the vocabulary view and encoding text, and :func:`read_gguf_vocab` reads a GGUF's own token list (and
scheme) from the file header through ``io.gguf``, for the vocabulary view.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mmdetect.errors import MMDetectError
from mmdetect.io.gguf import read_fields

BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, PLAIN = "byte_level", "sentencepiece", "wordpiece", "plain"
SCHEMES = (BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, PLAIN)
SPACE_MARK = "\u2581"  # SentencePiece's '▁'
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# GGUF: tokenizer.ggml.model -> scheme, and tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
GGUF_SCHEMES = {"gpt2": BYTE_LEVEL, "llama": SENTENCEPIECE, "t5": SENTENCEPIECE, "gemma4": SENTENCEPIECE,
                "bert": WORDPIECE}
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6


# -- byte-level BPE ---------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE vocabularies spell it with."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`: alphabet character -> byte."""
    return {ch: b for b, ch in bytes_to_unicode().items()}


def byte_level_bytes(piece: str) -> bytes:
    """The bytes a byte-level BPE token stands for (``'ĠcommunautÃ©'`` -> ``b' communaut\\xc3\\xa9'``).

    A token with a character outside the byte alphabet (a plain-text added token holding a space, say) is taken whole
    as its UTF-8 bytes, as the ``tokenizers`` ByteLevel decoder does.
    """
    table = unicode_to_bytes()
    try:
        return bytes(table[ch] for ch in piece)
    except KeyError:
        return piece.encode("utf-8", "surrogatepass")


def byte_level_piece(data: bytes) -> str:
    """Bytes spelled in the byte-level alphabet (the forward map: ``b'\\t'`` -> ``'ĉ'``)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


# -- SentencePiece, WordPiece ---------------------------------------------------------------------------------------

def byte_token(piece: str) -> int | None:
    """The byte a SentencePiece byte-fallback token stands for (``'<0x0A>'`` -> 10), else None."""
    m = _BYTE_TOKEN.fullmatch(piece)
    return int(m.group(1), 16) if m else None


def sentencepiece_bytes(piece: str) -> bytes:
    """``'▁communauté'`` -> ``b' communaut\\xc3\\xa9'``; ``'<0xE5>'`` -> ``b'\\xe5'``."""
    b = byte_token(piece)
    if b is not None:
        return bytes([b])
    return piece.replace(SPACE_MARK, " ").encode("utf-8", "surrogatepass")


def wordpiece_bytes(piece: str) -> bytes:
    """``'##ing'`` -> ``b'ing'``; other pieces as they are."""
    return (piece[2:] if piece.startswith("##") and len(piece) > 2 else piece).encode("utf-8", "surrogatepass")


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes one vocabulary entry stands for under ``scheme`` (one of :data:`SCHEMES`)."""
    if scheme == BYTE_LEVEL:
        return byte_level_bytes(piece)
    if scheme == SENTENCEPIECE:
        return sentencepiece_bytes(piece)
    if scheme == WORDPIECE:
        return wordpiece_bytes(piece)
    return piece.encode("utf-8", "surrogatepass")


# -- which scheme -----------------------------------------------------------------------------------------------------

def _types(component: Any) -> list[dict[str, Any]]:
    """A tokenizer.json component and, for a Sequence, its members, flattened."""
    if not isinstance(component, dict):
        return []
    out = [component]
    for key in ("decoders", "pretokenizers", "pre_tokenizers", "normalizers"):
        for sub in component.get(key) or []:
            out += _types(sub)
    return out


def scheme_of_tokenizer_json(doc: dict[str, Any]) -> str:
    """The scheme of a parsed ``tokenizer.json`` (only ``decoder``, ``pre_tokenizer``, ``normalizer`` and ``model``'s
    ``type`` / ``byte_fallback`` are read).

    ByteLevel in the decoder or pre-tokenizer means byte-level; Metaspace, a ``▁`` -> space Replace, ByteFallback, a
    normalizer that writes ``▁``, or a byte-fallback / Unigram model means SentencePiece; a WordPiece decoder or model
    means WordPiece; anything else is plain.
    """
    decoder, pre, norm = _types(doc.get("decoder")), _types(doc.get("pre_tokenizer")), _types(doc.get("normalizer"))
    model: dict[str, Any] = doc["model"] if isinstance(doc.get("model"), dict) else {}
    kinds = {c.get("type") for c in decoder + pre}
    if "ByteLevel" in kinds:
        return BYTE_LEVEL

    def writes_mark(c: dict[str, Any]) -> bool:
        pattern = c.get("pattern")
        return c.get("type") in ("Replace", "Prepend") and SPACE_MARK in json.dumps(
            [pattern, c.get("content"), c.get("prepend")], ensure_ascii=False)

    if kinds & {"Metaspace", "ByteFallback"} or any(writes_mark(c) for c in decoder + norm) or \
            model.get("byte_fallback") or model.get("type") == "Unigram":
        return SENTENCEPIECE
    if "WordPiece" in kinds or model.get("type") == "WordPiece":
        return WORDPIECE
    return PLAIN


def scheme_of_gguf(model: str | None, pieces: Sequence[str | None] = ()) -> str:
    """The scheme for a GGUF's ``tokenizer.ggml.model`` (guessed from the pieces when the model is missing or
    unknown)."""
    if model in GGUF_SCHEMES:
        return GGUF_SCHEMES[model]
    return guess_scheme(pieces)


def guess_scheme(pieces: Sequence[str | None]) -> str:
    """A scheme from the token strings alone: many ``▁``-led pieces -> SentencePiece, many ``Ġ``-led -> byte-level."""
    mark = sum(1 for p in pieces if p and p.startswith(SPACE_MARK))
    g = sum(1 for p in pieces if p and p.startswith("\u0120"))
    if mark > g and mark:
        return SENTENCEPIECE
    if g:
        return BYTE_LEVEL
    return PLAIN


def _state(component: Any) -> Any:
    """A `tokenizers` component as its tokenizer.json dict (None when absent)."""
    if component is None:
        return None
    try:
        return json.loads(component.__getstate__())
    except Exception:
        return None


def scheme_of_backend(backend: Any) -> str:
    """The scheme of a ``tokenizers.Tokenizer`` (a transformers fast tokenizer's ``backend_tokenizer``)."""
    model = backend.model
    doc = {"decoder": _state(backend.decoder), "pre_tokenizer": _state(backend.pre_tokenizer),
           "normalizer": _state(backend.normalizer),
           "model": {"type": type(model).__name__, "byte_fallback": bool(getattr(model, "byte_fallback", False))}}
    return scheme_of_tokenizer_json(doc)


def scheme_of_transformers(tok: Any) -> str | None:
    """The scheme of a transformers tokenizer: from its fast backend, else from a slow tokenizer's byte encoder
    (byte-level) or SentencePiece model; None when it cannot be told (decode through the tokenizer then)."""
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decoder"):
        return scheme_of_backend(backend)
    if getattr(tok, "byte_encoder", None) is not None:
        return BYTE_LEVEL
    if getattr(tok, "sp_model", None) is not None:
        return SENTENCEPIECE
    return None


# -- display ----------------------------------------------------------------------------------------------------------

def decode_bytes(data: bytes) -> str:
    """UTF-8 text of ``data``, with each byte that is not part of a valid character written as the four characters
    ``\\xNN`` (so a partial character reads ``\\xe5\\xba``, not mojibake or U+FFFD)."""
    text = data.decode("utf-8", "surrogateescape")
    if not any(0xDC80 <= ord(ch) <= 0xDCFF for ch in text):
        return text
    return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in text)


def show(data: bytes | str, quote: bool = True) -> str:
    """A visible form of a token's bytes (or text): like ``repr`` (quotes keep leading spaces readable; ``\\t``,
    ``\\n``, ``\\r``, ``\\x0c``, other control and non-printable characters escaped), with bytes that are not valid
    UTF-8 as ``\\xNN`` escapes. ``quote=False`` leaves off the quotes (and does not escape quote characters)."""
    text = data.decode("utf-8", "surrogateescape") if isinstance(data, (bytes, bytearray)) else data
    q = '"' if ("'" in text and '"' not in text) else "'"
    parts = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            parts.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\" or (quote and ch == q):
            parts.append("\\" + ch)
        elif ch.isprintable():
            parts.append(ch)
        else:
            parts.append(repr(ch)[1:-1])  # \t \n \r \x0c \x85 \u200b ...
    body = "".join(parts)
    return f"{q}{body}{q}" if quote else body


class TokenText(str):
    """A token's text (:func:`decode_bytes` of its bytes) that remembers the bytes; ``repr()`` is :func:`show`."""

    data: bytes

    def __new__(cls, data: bytes) -> TokenText:
        obj = super().__new__(cls, decode_bytes(data))
        obj.data = bytes(data)
        return obj

    def __repr__(self) -> str:
        return show(self.data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (TokenText, (self.data,))


# -- a vocabulary -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenTable:
    """Token strings by id (None where an id has none), their scheme, and the ids spelled as plain text (added,
    special, control and user-defined tokens)."""

    pieces: Sequence[str | None]
    scheme: str
    raw: frozenset[int] = field(default_factory=frozenset)

    def __len__(self) -> int:
        return len(self.pieces)

    def piece(self, token_id: int) -> str | None:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None

    def bytes(self, token_id: int) -> bytes | None:
        """The bytes token ``token_id`` stands for; None for an id outside the vocabulary."""
        p = self.piece(int(token_id))
        if p is None:
            return None
        if int(token_id) in self.raw:
            return p.encode("utf-8", "surrogatepass")
        return piece_bytes(p, self.scheme)

    def label(self, token_id: int) -> TokenText | None:
        """Token ``token_id``'s text (leading space included) as a :class:`TokenText`; None outside the vocabulary."""
        data = self.bytes(token_id)
        return None if data is None else TokenText(data)

    def text(self, ids: Iterable[int]) -> str:
        """A run of ids as text: their bytes joined, then decoded (so multi-byte characters split across byte tokens
        come out whole); ids outside the vocabulary read ``#id``."""
        out = bytearray()
        for i in ids:
            data = self.bytes(int(i))
            out += data if data is not None else f"#{int(i)}".encode()
        return decode_bytes(bytes(out))


def table_from_tokenizer_json(doc: dict[str, Any]) -> TokenTable:
    """A :class:`TokenTable` from a parsed ``tokenizer.json`` (no packages needed)."""
    model = doc.get("model") or {}
    vocab = model.get("vocab")
    by_id: dict[int, str] = {}
    if isinstance(vocab, dict):
        by_id = {int(i): str(t) for t, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        by_id = {i: str(e[0] if isinstance(e, (list, tuple)) else e) for i, e in enumerate(vocab)}
    raw = set()
    for added in doc.get("added_tokens") or []:
        by_id[int(added["id"])] = str(added["content"])
        raw.add(int(added["id"]))
    n = max(by_id) + 1 if by_id else 0
    pieces = [by_id.get(i) for i in range(n)]
    return TokenTable(pieces, scheme_of_tokenizer_json(doc), frozenset(raw))


def table_from_backend(backend: Any) -> TokenTable:
    """A :class:`TokenTable` from a ``tokenizers.Tokenizer``."""
    n = backend.get_vocab_size(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    n = max([n] + [i + 1 for i in added])
    pieces = [backend.id_to_token(i) for i in range(n)]
    return TokenTable(pieces, scheme_of_backend(backend), frozenset(int(i) for i in added))


def table_from_transformers(tok: Any) -> TokenTable | None:
    """A :class:`TokenTable` from a transformers tokenizer (``convert_ids_to_tokens`` + its scheme); None when the
    scheme cannot be told, or the tokenizer cannot list its tokens."""
    scheme = scheme_of_transformers(tok)
    if scheme is None:
        return None
    try:
        n = len(tok)
        pieces = tok.convert_ids_to_tokens(list(range(n)))
        raw = {int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {})}
        raw |= {int(i) for i in (getattr(tok, "all_special_ids", None) or [])}
    except Exception:
        return None
    return TokenTable([p if isinstance(p, str) else None for p in pieces], scheme, frozenset(raw))


# -- tokenizer.json without transformers ---------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class JsonTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` package (no transformers, no torch), with the few methods
    mmdetect calls on a transformers tokenizer: ``encode(text, add_special_tokens=False) -> ids``, ``decode``,
    ``convert_ids_to_tokens``, ``bos_token_id``, ``all_special_ids``."""

    def __init__(self, backend: Any, bos_token: str | None = None) -> None:
        self.backend = backend
        self.bos_token = bos_token
        bos = backend.token_to_id(bos_token) if bos_token else None
        self.bos_token_id: int | None = int(bos) if bos is not None else None
        added = backend.get_added_tokens_decoder()
        self.all_special_ids = sorted(int(i) for i, t in added.items() if getattr(t, "special", False))
        self.table = table_from_backend(backend)

    def __len__(self) -> int:
        return len(self.table)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]


def load_tokenizer_json(folder: str | Path) -> JsonTokenizer | None:
    """The ``tokenizer.json`` in ``folder`` through the ``tokenizers`` package, its BOS token from
    ``tokenizer_config.json`` / ``special_tokens_map.json``; None when there is no such file, the package is missing,
    or the file does not load."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(path))
    except Exception:
        return None
    bos = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            bos = _token_content(json.loads((folder / name).read_text(encoding="utf-8")).get("bos_token"))
        except (OSError, ValueError, AttributeError):
            continue
        if bos is not None:
            break
    return JsonTokenizer(backend, bos)


# -- a GGUF's own token list ---------------------------------------------------------------------------------------

_WANTED = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type")


def read_gguf_tokenizer(path: str | Path) -> dict[str, Any]:
    """The tokenizer metadata of a GGUF file (``tokenizer.ggml.model``, ``.tokens``, ``.token_type``), read through
    ``io.gguf.read_fields``: the header's checks, no other array decoded. CorruptInputError or UnsupportedError (one
    line naming the file) on a file that is not GGUF or whose header breaks a rule."""
    return read_fields(Path(path), _WANTED)


def table_from_gguf(fields: dict[str, Any]) -> TokenTable | None:
    """A :class:`TokenTable` from GGUF tokenizer metadata (:func:`read_gguf_tokenizer`): the scheme from
    ``tokenizer.ggml.model``; control, user-defined, unknown and unused tokens spelled as plain text, BYTE tokens as
    their byte."""
    pieces = fields.get("tokenizer.ggml.tokens")
    if not pieces:
        return None
    scheme = scheme_of_gguf(fields.get("tokenizer.ggml.model"), pieces)
    types = fields.get("tokenizer.ggml.token_type") or []
    raw = frozenset(i for i, t in enumerate(types)
                    if t in (GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED))
    return TokenTable([str(p) for p in pieces], scheme, raw)


def read_gguf_vocab(path: str | Path) -> TokenTable | None:
    """A GGUF file's own vocabulary as a :class:`TokenTable`; None when it has no token list or cannot be read."""
    try:
        return table_from_gguf(read_gguf_tokenizer(path))
    except MMDetectError:  # not a GGUF, unreadable, or a header that breaks a rule: no token list from it
        return None
