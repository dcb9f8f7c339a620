"""The CPU kernels build wherever they can: every test of them skips when the build fails, so this one
turns a source that no longer compiles into a failure instead of a suite of skips."""

import os
import platform
import shutil

import pytest

from kimi_engine.kernels import cpu


def builds_here() -> bool:
    """x86-64 with the AVX-512 subsets the source needs (F, BW, VL), a compiler, and the kernels not switched off."""
    flags = cpu._cpu_flags().split()
    return (platform.machine().lower() in ("x86_64", "amd64") and shutil.which(cpu._compiler()) is not None
            and all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))
            and os.environ.get(cpu.ENV_SWITCH, "1").strip() != "0")


@pytest.mark.skipif(not builds_here(), reason="no AVX-512, no C++ compiler, or the kernels are switched off")
def test_the_kernels_build_where_they_can():
    assert cpu.available(), cpu.unavailable_reason()
