"""`kimi-engine inspect` (a summary, or exit 1 and the error for a broken checkpoint) and `kimi-engine bench`."""

import pytest
import torch

from kimi_engine.checkpoint import checkpoint_layout
from kimi_engine.cli import main, parameter_counts
from kimi_engine.model import Transformer
from kimi_engine.synthetic import kimi_k2_config, tiny_config, write_random_checkpoint


def test_inspect(tmp_path, capsys):
    path = write_random_checkpoint(tmp_path / "ckpt", tiny_config())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "INT4 group 32" in out and "valid           yes" in out and "240 bytes per token" in out
    (path / "config.json").write_text("{")
    assert main(["inspect", str(path)]) == 1
    assert "config.json" in capsys.readouterr().err


def test_kimi_k2_parameter_counts():
    # "1T total, 32B active": our layout of the full-size config must agree.
    config = kimi_k2_config()
    with torch.device("meta"):
        model = Transformer(config)
    total, active = parameter_counts(config, checkpoint_layout(model))
    assert total == pytest.approx(1.026e12, rel=1e-3) and active == pytest.approx(32.86e9, rel=1e-3)


def test_bench_prints_prefill_and_decode_tables(capsys):
    assert main(["bench", "--prompts", "16,32", "--batches", "1,2", "--context", "8", "--steps", "2", "--reps", "1",
                 "--device", "cpu"]) == 0            # the built-in demo
    lines = capsys.readouterr().out.splitlines()
    prefill = [line for line in lines if line.startswith("| 16 |") or line.startswith("| 32 |")]
    decode = [line.split("|") for line in lines if line.startswith("| 1 | 8 |") or line.startswith("| 2 | 8 |")]
    assert len(prefill) == 2 and len(decode) == 2
    assert all(float(row[3].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0 for row in decode)
