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

SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        skip = pytest.mark.skip(reason="Triton kernels on CPU tensors need TRITON_INTERPRET: a machine without CUDA")
        skipped = [item for item in items if "interpreter" in item.keywords and "cuda" not in item.keywords]
    else:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        skipped = [item for item in items if "cuda" in item.keywords]
    for item in skipped:
        item.add_marker(skip)
