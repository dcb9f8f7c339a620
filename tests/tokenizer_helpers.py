"""Shared pieces of the tokenizer and chat tests: the shipped test data, and a small vocabulary in Kimi's format.

The vocabulary is a byte-level BPE trained with `tokenizers` on tiny Shakespeare plus Chinese, code,
emoji and accented text, written as Kimi writes its own: tiktoken.model (base64 bytes + rank) and
tokenizer_config.json (added_tokens_decoder with Kimi's special tokens at Kimi's offsets after the
base vocabulary, the rest of the 256 reserved ids unnamed).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import DATA, FIXTURES, data_file

FIXTURE_TEMPLATE = FIXTURES / "kimi-k2-thinking" / "chat_template.llamacpp-copy.jinja"
SHAKESPEARE_HEAD = DATA / "tinyshakespeare-head.txt"   # the corpus' first 100,000 characters: training text
SHAKESPEARE_TAIL = DATA / "tinyshakespeare-tail.txt"   # its last 20,021: text no test vocabulary was trained on

# Kimi's pattern as the issue quotes it (tokenization_kimi.py), kept here apart from the library's copy.
KIMI_PATTERN_REFERENCE = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Kimi K2 Thinking's special tokens by offset from the base vocabulary (163584 + offset there).
KIMI_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
                 11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
                 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
                 22: "<think>", 23: "</think>", 254: "[UNK]", 255: "[PAD]"}

EXTRA_TEXT = """
人工智能是计算机科学的一个分支。我们今天去北京吃饭，然后在上海看电影。中文分词和英文不同。
def fibonacci(n: int) -> list[int]:
    a, b = 0, 1
    for _ in range(n):
        yield a; a, b = b, a + b   # 0 1 1 2 3 5 8 13
if (x != nullptr && y->next) { return std::move(z); }  // C++ \t\t tabs
{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}
Emoji: 😀🎉👍🏽🇫🇷 ❤️ ✨ — naïve café résumé Ångström façade São Paulo Ελληνικά Кириллица
I'm you're we've they'll she'd IT'S DON'T 12345678 3.14159 1,000,000
"""


def train_bytes_vocab(vocab_size: int = 2048, shakespeare_chars: int = 100_000) -> list[bytes]:
    """Token bytes by rank of a byte-level BPE trained on tiny Shakespeare (a prefix of
    SHAKESPEARE_HEAD) + EXTRA_TEXT."""
    from kimi_engine.chat.tokenizer import train_bpe

    text = data_file(SHAKESPEARE_HEAD).read_text(encoding="utf-8")
    if shakespeare_chars > len(text):
        raise ValueError(f"shakespeare_chars={shakespeare_chars}: {SHAKESPEARE_HEAD.name} holds {len(text)}")
    text = text[:shakespeare_chars]
    return train_bpe([*text.splitlines(keepends=True), *[EXTRA_TEXT] * 20], vocab_size)


def write_kimi_dir(directory: Path, tokens: list[bytes], chat_template: str | None = None) -> Path:
    """Write tiktoken.model + tokenizer_config.json (+ chat_template.jinja) as Kimi's checkpoints have them,
    through the library's writer, with this file's copy of Kimi's special tokens."""
    from kimi_engine.chat.tokenizer import write_kimi_tokenizer

    return write_kimi_tokenizer(directory, tokens, KIMI_SPECIALS, chat_template=chat_template)


def reference_special_tokens(num_base: int) -> dict[str, int]:
    """The special tokens Kimi's tokenization_kimi.py hands tiktoken: named ones, the rest reserved."""
    names = {num_base + k: s for k, s in KIMI_SPECIALS.items()}
    return {names.get(i, f"<|reserved_token_{i}|>"): i for i in range(num_base, num_base + 256)}


def tiktoken_reference(tokens: list[bytes]):
    """The tiktoken Encoding Kimi's own tokenizer builds for this vocabulary."""
    import tiktoken

    return tiktoken.Encoding("kimi-test", pat_str=KIMI_PATTERN_REFERENCE,
                             mergeable_ranks={t: i for i, t in enumerate(tokens)},
                             special_tokens=reference_special_tokens(len(tokens)))


@pytest.fixture(scope="session")
def kimi_vocab() -> list[bytes]:
    return train_bytes_vocab()


@pytest.fixture(scope="session")
def kimi_dir(kimi_vocab, tmp_path_factory) -> Path:
    """A tokenizer directory in Kimi's format without a chat template (the built-in one applies)."""
    return write_kimi_dir(tmp_path_factory.mktemp("kimi_tokenizer"), kimi_vocab)
