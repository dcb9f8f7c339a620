"""`kimi-engine plan`: per-rank bytes and the decode floor, checked against the figures the
architecture notes give for Kimi K2 Thinking and against a loaded tiny model's own parameters."""

import math
import random
from collections import Counter

import pytest
import torch

from kimi_engine.cli import main
from kimi_engine.config import ModelConfig
from kimi_engine.parallel import Parallel
from kimi_engine.model import Transformer
from kimi_engine.plan import GB, experts_on_busiest_rank, plan, weight_kind
from kimi_engine.synthetic import tiny_config

from .conftest import FIXTURES, data_file

KIMI_CONFIG = FIXTURES / "kimi-k2-thinking" / "config.reconstructed.json"


@pytest.fixture(scope="module")
def kimi():
    return ModelConfig.from_json(data_file(KIMI_CONFIG))


def test_kimi_one_gpu_reads_33_gb_per_token(kimi):
    # ARCHITECTURE.md: 594 GB of weights; per token 11.9 GB INT4 experts, 12.3 GB attention,
    # 5.3 GB shared experts, 2.4 GB lm_head, 0.8 GB dense layer; 18.4 GB of KV per 256k sequence.
    p = plan(kimi, world_size=1, gpu_memory_gb=141, context=262144)
    assert sum(p.weights.values()) / GB == pytest.approx(594.2, abs=0.1)
    read = p.read_per_token
    for kind, gb in {"routed experts": 11.9, "attention": 12.3, "shared experts": 5.3, "lm_head": 2.35,
                     "dense MLP": 0.8, "KV cache": 18.4}.items():
        assert read[kind] / GB == pytest.approx(gb, abs=0.06), kind
    assert not p.fits


def test_kimi_on_8_h200_at_256k(kimi):
    p1 = plan(kimi, world_size=1, gpu_memory_gb=141, context=262144)
    p8 = plan(kimi, world_size=8, gpu_memory_gb=141, context=262144)
    assert p8.fits and p8.max_batch == 3
    assert p8.kv_bytes == p1.kv_bytes == 262144 * 70272          # replicated, not split
    for kind in ("routed experts", "dense MLP", "shared experts", "embedding", "lm_head"):
        assert p8.weights[kind] * 8 == p1.weights[kind], kind      # split evenly
    assert p8.weights["router"] == p1.weights["router"]           # replicated
    assert p8.read_per_token["routed experts"] == round(experts_on_busiest_rank(384, 8, 8) * p8.expert_bytes * 60)
    floor = p8.floor_seconds(4.8e12)
    assert floor == pytest.approx(sum(p8.read_per_token.values()) / 4.8e12) and 5e-3 < floor < 6e-3


def test_busiest_rank_expectation():
    assert experts_on_busiest_rank(384, 8, 1) == pytest.approx(8)
    assert experts_on_busiest_rank(8, 8, 4) == pytest.approx(2)   # every expert is used: 2 per rank
    # 2 of 4 experts over 2 ranks: both on one rank in 2 of the 6 subsets -> E[max] = 1 + 2/6.
    assert experts_on_busiest_rank(4, 2, 2) == pytest.approx(4 / 3)
    # 3 of 16 over 4 ranks: max 1 in 4^3 * 4 = 256 of C(16, 3) = 560 subsets, max 3 in 4 * 4 = 16.
    assert experts_on_busiest_rank(16, 3, 4) == pytest.approx((256 * 1 + 288 * 2 + 16 * 3) / 560)
    rng = random.Random(0)
    busiest = [max(Counter(e // 48 for e in rng.sample(range(384), 8)).values()) for _ in range(20000)]
    assert experts_on_busiest_rank(384, 8, 8) == pytest.approx(sum(busiest) / len(busiest), abs=0.03)


def test_plan_counts_what_the_rank_model_holds():
    config = tiny_config()
    p = plan(config, world_size=2, gpu_memory_gb=1, context=100, batch=3)
    with torch.device("meta"):
        model = Transformer(config, Parallel(1, 2))
    by_kind: dict[str, int] = {}
    for name, t in model.named_parameters():
        size = 2 if t.dtype == torch.float32 and not name.endswith("e_score_correction_bias") else t.element_size()
        by_kind[weight_kind(name)] = by_kind.get(weight_kind(name), 0) + t.numel() * size
    assert {k: v for k, v in p.weights.items() if v} == by_kind
    assert p.kv_bytes == 3 * 100 * 3 * (32 + 8) * 2
    assert plan(config, 2, 1, 100, kv_fp8=True).kv_bytes_per_token == 3 * (32 + 8 + 8)


def test_plan_command(capsys):
    config = str(data_file(KIMI_CONFIG))
    assert main(["plan", "--config", config, "--world-size", "8", "--gpu-memory", "141",
                 "--context", "262144", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "H200 (4.80 TB/s)" in out and "ms/token" in out
    assert main(["plan", "--config", config, "--world-size", "8", "--gpu-memory", "80",
                 "--context", "262144", "--batch", "1"]) == 0
    assert "fits: NO" in capsys.readouterr().out
    assert main(["plan", "--config", config, "--world-size", "6", "--gpu-memory", "141",
                 "--context", "1000"]) == 1
    assert "num_attention_heads=64 is not divisible by world_size=6" in capsys.readouterr().err
    assert math.isfinite(plan(tiny_config(), 1, 1, 10).floor_seconds(3.35e12))
