"""benchmarks/bench_e2e.py runs end to end on a CPU (--device cpu --small), in process."""

import importlib.util
import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_bench():
    sys.path.insert(0, str(BENCHMARKS))          # the script imports its neighbours (common, e2e_model)
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCHMARKS / "bench_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_e2e_small_cpu(tmp_path, capsys):
    bench = load_bench()
    rows, peer = bench.main(["--device", "cpu", "--small", "--plot", str(tmp_path / "decode.png"),
                             "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert {(r["batch"], r["context"]) for r in rows} == {(b, c) for b in (1, 2, 4) for c in (64, 256)}
    for r in rows:
        assert r["eager"] > 0 and r["graphs"] > 0 and r["floor"] > 0 and math.isfinite(r["ratio"])
        assert r["layer_floor"] < r["floor"]     # the head's bytes come on top of the layers'
    assert all("h200" in r for r in rows if r["batch"] == 1)
    assert "| prefill tokens |" in out and "61 layers, 8 x H200" in out
    if importlib.util.find_spec("transformers"):
        assert peer is not None and peer[0] == 3 and "HF transformers DeepseekV3" in out
    assert list(tmp_path.glob("bench_e2e_*")) == []                  # the temporary checkpoint is gone
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
