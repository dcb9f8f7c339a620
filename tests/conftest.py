"""Test setup: Triton kernels run under the interpreter on machines without a GPU.

Tests load engines on the CPU explicitly (device="cpu"), so the default suite checks the same thing
everywhere. On a CUDA machine the interpreter is off (it is chosen when triton is imported), so tests
marked `interpreter` (kernels on CPU tensors) are skipped there and the `cuda` tests run instead.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported: kernels then run on CPU tensors (slowly; small shapes only).
    os.environ.setdefault("TRITON_INTERPRET", "1")

TESTS = Path(__file__).resolve().parent
# Everything the tests read ships under tests/ (data/: tiny Shakespeare excerpts; fixtures/: Kimi K2
# Thinking's config and chat template), so a fresh clone runs every suite; see data_file().
DATA = TESTS / "data"
FIXTURES = TESTS / "fixtures"


def data_file(path: Path) -> Path:
    """A file the tests ship (under tests/data or tests/fixtures). A missing one fails the test, never
    skips it: a suite that silently skips looks green while checking nothing."""
    if not path.is_file():
        pytest.fail(f"test data {path} is missing: it ships with the repository (see {path.parent}/SOURCES.md)",
                    pytrace=False)
    return path


TINY_ENGINE_OPTIONS = dict(max_batch_size=8, max_seq_len=512)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    """One tiny random Kimi-architecture engine for the whole session: float32 on the CPU, 3 layers
    (dense first, then MoE with 8 INT4 experts), a 768-token vocabulary (a 512-token BPE trained on tiny
    Shakespeare plus Kimi's 256 special tokens, so text prompts, chat and tool calls work; ids below 512
    are plain tokens), Kimi's built-in chat template, max_batch_size 8, max_seq_len 512. Built by
    model_helpers.write_chat_checkpoint (seed 0).

    Shared by every test that asks for it: a test that changes a setting (engine.prefill_chunk, ...)
    puts it back in a `finally`, and caches it makes are its own. A test that needs other weights or
    load options builds its own engine.
    """
    import kimi_engine as ke   # here, not at the top: TRITON_INTERPRET must be set before triton loads

    from .model_helpers import write_chat_checkpoint
    path = write_chat_checkpoint(tmp_path_factory.mktemp("tiny_engine"))
    return ke.load(path, dtype=torch.float32, progress=False, device="cpu", **TINY_ENGINE_OPTIONS)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="Triton kernels on CPU tensors need TRITON_INTERPRET: a machine without CUDA")
        skipped = [item for item in items if "interpreter" in item.keywords and "cuda" not in item.keywords]
    else:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        skipped = [item for item in items if "cuda" in item.keywords]
    for item in skipped:
        item.add_marker(skip)
