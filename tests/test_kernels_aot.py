"""Every kernel compiles for sm_90 (H100/H200) and sm_80 (A100) at Kimi K2's widths, without a GPU (kernels.aot)."""

import os
import subprocess
import sys

import pytest

from kimi_engine.kernels.aot import Variant, spills_in_loops

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1+0x8], R176 ;
        /*0020*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0030*/                   LDL.LU R11, [R1+0xc] ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/               @!P0 BRA 0x20 ;
        /*0060*/                   STL [R1+0x4], R3 ;
        /*0070*/               @P1 BRA 0x90 ;
        /*0080*/                   LDL R2, [R1] ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_spills_in_loops_counts_only_loop_bodies():
    # the loop is [0x20, 0x50]: the LDL at 0x30 is in it; the STLs at 0x10 and 0x60, the LDL after a
    # forward branch and the self-branch at the end are not
    assert spills_in_loops(SASS) == 1
    assert spills_in_loops(SASS.replace("LDL.LU", "LDG.E")) == 0


def test_variant_problems():
    ok = Variant("c", "k", "", registers=255, spilled=32, loop_spills=0, shared=145 * 1024, tensor_cores="wgmma")
    assert ok.problems(90) == []
    assert Variant("c", "k", "", 255, 352, 86, 1024, "wgmma").problems(90) == ["86 spill loads/stores inside loops"]
    assert "shared" in Variant("c", "k", "", 128, 0, 0, 230 * 1024, "mma").problems(90)[0]


@pytest.mark.parametrize("arch", [90, 80], ids=["H100-H200", "A100"])
def test_every_kernel_compiles_without_spilling_in_loops(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "kimi_engine.kernels.aot", "--arch", str(arch)],
                            capture_output=True, text=True, env=env, timeout=600)
    if "cuobjdump" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this Triton has no cuobjdump")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    kernels = {row[1].strip() for row in rows}
    assert kernels == {"w4a16_matmul_kernel", "moe_gate_up_kernel", "moe_down_kernel", "route_kernel",
                       "mla_decode_kernel", "mla_merge_kernel"}
    assert all(row[-1].strip() == "yes" for row in rows)
    cores = {(row[0].strip(), row[1].strip()): row[-2].strip() for row in rows}
    if arch == 90:   # Hopper keeps its tensor-core path: wgmma for prefill tiles and 64-head attention
        assert cores["mla_decode H=64 kv=bfloat16 ctx=4096", "mla_decode_kernel"] == "wgmma"
        assert cores["w4a16 M=4096 [4096x7168]", "w4a16_matmul_kernel"] == "wgmma"
    else:            # no fp8 cache before sm_89; mma.sync everywhere
        assert not any("fp8" in case for case, _ in cores) and "wgmma" not in cores.values()
