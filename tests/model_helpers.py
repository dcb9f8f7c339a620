"""A tiny random Kimi-architecture checkpoint with a Kimi-format tokenizer, for generate/chat/agent tests."""

from pathlib import Path

from kimi_engine.chat import builtin_chat_template
from kimi_engine.synthetic import tiny_config, write_random_checkpoint
from kimi_engine.chat.tokenizer import NUM_RESERVED_SPECIAL_TOKENS, write_kimi_tokenizer

from .tokenizer_helpers import train_bytes_vocab

BASE_VOCAB = 512


def write_chat_checkpoint(path: Path, seed: int = 0, **config) -> Path:
    """Random weights + a 512-token BPE (Shakespeare) with Kimi's special tokens right after it."""
    tokens = train_bytes_vocab(BASE_VOCAB, shakespeare_chars=100_000)
    vocab = len(tokens) + NUM_RESERVED_SPECIAL_TOKENS
    cfg = tiny_config(vocab_size=vocab, bos_token_id=len(tokens), eos_token_id=len(tokens) + 2, **config)
    write_random_checkpoint(path, cfg, seed=seed)
    write_kimi_tokenizer(path, tokens, chat_template=builtin_chat_template())
    return path
