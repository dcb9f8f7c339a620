"""The benchmark scripts run end to end on a CPU (tiny shapes, Triton interpreter)."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_kernels_smoke(tmp_path):
    plot = tmp_path / "roofline.png"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_kernels.py"), "--interpret", "--small",
                             "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 * 2 + 2 + 2          # header, rule, w4a16 2 shapes x 2 M, moe 2 M, route 2 M
    assert "DIFFER" not in result.stdout
    errors = [float(line.split("|")[-2].split()[0]) for line in table[2:]]
    assert max(errors) < 1e-4                       # float32 under the interpreter
