"""Test setup: Triton kernels run under the interpreter on machines without a GPU."""

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
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
