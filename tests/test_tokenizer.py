"""Tokenizer: agrees with tiktoken (what Kimi's own tokenizer runs) id for id, streams whole characters,
and names the file at fault when a tokenizer file is broken."""

import base64
import json

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_engine.errors import CheckpointError
from kimi_engine.chat.tokenizer import KIMI_PATTERN, Tokenizer, load_tokenizer

from .conftest import DATA, FIXTURES, data_file
from .tokenizer_helpers import (EXTRA_TEXT, KIMI_PATTERN_REFERENCE, KIMI_SPECIALS, SHAKESPEARE_TAIL,  # noqa: F401
                               kimi_dir, kimi_vocab, tiktoken_reference, write_kimi_dir)

SPECIAL_NAMES = sorted(set(KIMI_SPECIALS.values()))
# Text pieces that stress the split pattern, special-token matching and UTF-8 boundaries.
TRICKY = [*SPECIAL_NAMES, "<|im_end", "<think", "|>", "<|", "[EOS", "'s", "'LL", " \n", "\r\n", "\u00a0", "\u3000",
          "你好", "北京", "😀", "👍🏽", "🇫🇷", "é", "e\u0301", "ǅ", "123456", "½", " ", "  ", "\t", "x"]
tricky_text = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8)), max_size=25).map("".join)


@pytest.fixture(scope="module")
def tok(kimi_dir):
    return Tokenizer.from_pretrained(kimi_dir)


@pytest.fixture(scope="module")
def ref(kimi_vocab):
    return tiktoken_reference(kimi_vocab)


def test_pattern_is_kimis_verbatim():
    assert KIMI_PATTERN == KIMI_PATTERN_REFERENCE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("aZ 0'sSlLdDtTmMrRvV\n\r\t.,!(") + ["\u00a0", "\u3000", "\u2009", "\u0085",
                "\u2028", "\u200b", "你", "É", "é", "ǅ", "ʰ", "\u0301", "Ⅻ", "½", "٣", "👍", "🏽", "ſ", "K", "İ"]),
                min_size=1, max_size=30).map("".join))
def test_pattern_splits_agree_across_regex_engines(text):
    """Oniguruma (`tokenizers`) and fancy-regex (tiktoken) both take `&&` as intersection: same pieces.

    `regex` (V1 mode) is the arbiter: `tokenizers` must split exactly like it, and tiktoken, given a
    vocabulary holding each of those pieces whole, must return one id per piece.
    """
    import tiktoken
    from tokenizers import Regex, pre_tokenizers

    pieces = [m.group() for m in regex.finditer("(?V1)" + KIMI_PATTERN, text)]
    assert "".join(pieces) == text
    split = pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str(text)] == pieces
    ranks = {bytes([b]): b for b in range(256)}
    for p in pieces:
        ranks.setdefault(p.encode(), len(ranks))
    enc = tiktoken.Encoding("splits", pat_str=KIMI_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert enc.encode_ordinary(text) == [ranks[p.encode()] for p in pieces]


def test_matches_tiktoken_on_a_corpus(tok, ref, kimi_vocab):
    n = len(kimi_vocab)
    shakespeare = data_file(SHAKESPEARE_TAIL).read_text(encoding="utf-8")  # not trained on
    chat = (f"<|im_system|>system<|im_middle|>You are Kimi.<|im_end|><|im_user|>user<|im_middle|>天气？<|im_end|>"
            f"<|im_assistant|>assistant<|im_middle|><think>hmm</think>ok<|tool_calls_section_begin|><|tool_call_begin|>"
            f"functions.f:0<|tool_call_argument_begin|>{{\"a\": 1}}<|tool_call_end|><|tool_calls_section_end|>[EOS]"
            f"glued<|im_end|>text <|reserved_token_{n + 5}|> <|reserved_token_{n + 255}|>x<|im_end <think")
    for text in (shakespeare, EXTRA_TEXT, chat, "", " ", "\n\n\n", "a" * 3000, "😀" * 50):
        ids = tok.encode(text)
        assert ids == ref.encode(text, allowed_special="all")
        assert tok.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.one_of(tricky_text, st.text()))
def test_matches_tiktoken_on_any_text(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_special_tokens(tok, kimi_vocab):
    n = len(kimi_vocab)
    assert tok.vocab_size == n + 256
    assert (tok.bos_token_id, tok.eos_token_id) == (n, n + 2)          # [BOS]; eos is <|im_end|> per the config
    for offset, name in KIMI_SPECIALS.items():
        assert tok.token_to_id(name) == n + offset and tok.id_to_token(n + offset) == name
        assert tok.encode(f"a{name}b") == [*tok.encode("a"), n + offset, *tok.encode("b")]
    assert tok.id_to_token(n + 5) == f"<|reserved_token_{n + 5}|>"   # unnamed ids are reserved tokens
    assert tok.encode(f"<|reserved_token_{n + 5}|>") == [n + 5]
    assert tok.id_to_token(tok.vocab_size) is None and tok.token_to_id("<|nope|>") is None
    ids = tok.encode("<think>hi</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([tok.vocab_size])


def test_incremental_decoder_emits_whole_characters(tok):
    text = "天气 😀👍🏽 naïve 🇫🇷<|im_end|>中文"
    ids = tok.encode(text)
    # Meaningful only if some token ends inside a character.
    assert any(not _valid_utf8(tok.token_bytes[i]) for i in ids if i < tok.vocab_size - 256)
    stream = tok.incremental_decoder()
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_incremental_decoder_equals_decode(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    stream = tok.incremental_decoder(skip_special_tokens=skip)
    out = "".join(stream.add(i) for i in ids) + stream.flush()
    assert out == tok.decode(ids, skip_special_tokens=skip)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- bad files: one clear CheckpointError naming the file ---

def _lines(tokens):
    return [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]


BYTES = [bytes([b]) for b in range(256)]
BAD_VOCABS = {
    "not base64": [*_lines(BYTES), "@@@ 256"],
    "three fields": [*_lines(BYTES), "YWI= 256 7"],
    "rank not int": [*_lines(BYTES), "YWI= x"],
    "duplicate rank": [*_lines(BYTES), "YWI= 255"],
    "gap in ranks": [*_lines(BYTES), "YWI= 300"],
    "missing byte": _lines(BYTES[:-1]),
}


@pytest.mark.parametrize("case", sorted(BAD_VOCABS))
def test_bad_tiktoken_model(tmp_path, case):
    write_kimi_dir(tmp_path, BYTES)
    (tmp_path / "tiktoken.model").write_text("\n".join(BAD_VOCABS[case]) + "\n")
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("change", ["invalid json", "not an object", "id inside base vocab", "bad entry",
                                    "eos not special", "duplicate name"])
def test_bad_tokenizer_config(tmp_path, change):
    write_kimi_dir(tmp_path, BYTES)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if change == "invalid json":
        path.write_text("{")
    elif change == "not an object":
        path.write_text("[]")
    else:
        if change == "id inside base vocab":
            config["added_tokens_decoder"]["7"] = {"content": "<x>"}
        elif change == "bad entry":
            config["added_tokens_decoder"]["300"] = {"content": 5}
        elif change == "eos not special":
            config["eos_token"] = "<|nope|>"
        else:
            config["added_tokens_decoder"]["300"] = {"content": "[BOS]"}
        path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("missing", ["tiktoken.model", "tokenizer_config.json"])
def test_missing_file(tmp_path, missing):
    write_kimi_dir(tmp_path, BYTES)
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=missing):
        Tokenizer.from_pretrained(tmp_path)


def test_load_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None                     # no tokenizer files: the engine has no tokenizer
    tok = load_tokenizer(write_kimi_dir(tmp_path, BYTES))
    assert tok.encode("hi") == [ord("h"), ord("i")] and tok.eos_token_id == 258


def test_vocab_without_config_tokens_gets_kimi_defaults(tmp_path):
    write_kimi_dir(tmp_path, BYTES)
    path = tmp_path / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["bos_token"], config["eos_token"]
    path.write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token, tok.eos_token) == ("[BOS]", "[EOS]")   # tokenization_kimi.py's defaults


def test_shipped_test_data_is_there_and_a_missing_file_fails():
    """The suites read only what ships under tests/ (each file named in its folder's SOURCES.md); a
    missing file fails the test that needs it instead of skipping it."""
    for folder in (DATA, FIXTURES / "kimi-k2-thinking"):
        sources = data_file(folder / "SOURCES.md").read_text(encoding="utf-8")
        files = [f.name for f in folder.iterdir() if f.name != "SOURCES.md"]
        assert files and all(f"`{name}`" in sources for name in files), (folder, files)
    with pytest.raises(pytest.fail.Exception, match="nowhere.txt is missing: it ships with the repository"):
        data_file(DATA / "nowhere.txt")
