"""The built-in demo model: a small Kimi K2-architecture model trained on tiny Shakespeare.

This directory is a checkpoint in Kimi's layout (config.json, index + shards with INT4 routed
experts, tiktoken.model, tokenizer_config.json, chat_template.jinja, generation_config.json), written
by scripts/train_demo.py, plus metrics.json: what that script measured (held-out loss of the bf16 and
INT4 models, expert load, decode speed). `kimi_engine.load()` with no path loads it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent


def demo_path() -> Path:
    """The directory of the built-in demo checkpoint; CheckpointError if this installation lacks its files."""
    if not (DEMO_DIR / "config.json").is_file():
        raise CheckpointError(f"{DEMO_DIR}: the built-in demo model is missing (run scripts/train_demo.py, or "
                              "install a build that ships it)")
    return DEMO_DIR
