"""The whole-step CPU decode (cpu_step.py, kt_decode_step) against the modules it replaces: the same
logits and cache contents, bit for bit, on random checkpoints with odd sizes; and where it steps aside."""

import pytest
import torch

import kimi_engine
from kimi_engine import cpu_step
from kimi_engine.kernels import cpu
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")

# Odd sizes everywhere the kernels have tails: hidden 96 (3 INT4 groups), 3 heads, rope 10, ranks 40/48.
ODD = dict(vocab_size=301, hidden_size=96, intermediate_size=72, moe_intermediate_size=64, num_hidden_layers=3,
           num_attention_heads=3, q_lora_rank=40, kv_lora_rank=48, qk_nope_head_dim=24, qk_rope_head_dim=10,
           v_head_dim=20, n_routed_experts=6, num_experts_per_tok=3, n_group=2, topk_group=1)
VARIANTS = {
    "q_lora, grouped router": {},
    "no q_lora, tied embeddings, no shared expert": dict(q_lora_rank=None, tie_word_embeddings=True,
                                                         n_shared_experts=0, n_group=1),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("cpu_step")
    write_random_checkpoint(path, tiny_config(**{**ODD, **VARIANTS[request.param]}), seed=3)
    return path


def load(path, dtype):
    return kimi_engine.load(path, dtype=dtype, device="cpu", progress=False, max_seq_len=128)


def counting_runs(monkeypatch) -> list:
    runs = []
    run = cpu_step.Plan.run
    monkeypatch.setattr(cpu_step.Plan, "run", lambda self, *a: runs.append(1) or run(self, *a))
    return runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_is_the_modules_bit_for_bit(checkpoint, dtype, monkeypatch):
    engine = load(checkpoint, dtype)
    runs = counting_runs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    caches = [engine.new_cache(block_size=16) for _ in range(2)]   # [modules, step]
    prompts = [torch.randint(0, 301, (n,), generator=g).tolist() for n in (5, 37)]   # one crosses two blocks
    seqs = []
    for cache in caches:
        seqs = [cache.add_sequence() for _ in prompts]
        for seq, prompt in zip(seqs, prompts):
            engine.prefill(cache, seq, prompt)
    assert all(torch.equal(a, b) for a, b in zip(caches[0].pools.kv, caches[1].pools.kv))
    tokens = [7, 300]
    for _ in range(4):
        monkeypatch.setenv(cpu_step.STEP_ENV, "0")
        ref = engine.decode_step(caches[0], seqs, tokens)
        monkeypatch.setenv(cpu_step.STEP_ENV, "1")
        out = engine.decode_step(caches[1], seqs, tokens)
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(caches[0].pools.kv, caches[1].pools.kv))
        tokens = out.argmax(-1).tolist()
    assert len(runs) == 4


def test_greedy_generation_is_the_same(checkpoint, monkeypatch):
    engine = load(checkpoint, torch.bfloat16)
    runs = counting_runs(monkeypatch)
    out = engine.generate([3, 1, 4, 1, 5], max_new_tokens=12, temperature=0.0)
    assert len(runs) == 11
    monkeypatch.setenv(cpu_step.STEP_ENV, "0")
    assert engine.generate([3, 1, 4, 1, 5], max_new_tokens=12, temperature=0.0) == out
    assert len(runs) == 11


def test_a_modified_weight_is_read_anew(checkpoint):
    engine = load(checkpoint, torch.float32)
    cache = engine.new_cache(block_size=16)
    seq = cache.add_sequence()
    engine.prefill(cache, seq, [1, 2, 3])
    engine.decode_step(cache, [seq], [4])
    plan = engine.model._cpu_step_plan
    head = engine.model.lm_head.weight if engine.model.lm_head is not None else engine.model.model.embed_tokens.weight
    with torch.no_grad():
        head.mul_(2)   # float32 holding bf16 values: still exactly bf16, so the step still takes it
    fork = cache.fork(seq)
    out = engine.decode_step(cache, [seq], [5])
    assert engine.model._cpu_step_plan is not plan
    with pytest.MonkeyPatch.context() as m:
        m.setenv(cpu_step.STEP_ENV, "0")
        assert torch.equal(out, engine.decode_step(cache, [fork], [5]))


def test_where_it_steps_aside(checkpoint, monkeypatch):
    engine = load(checkpoint, torch.float32)
    model, cache = engine.model, engine.new_cache(block_size=16)
    seq = cache.add_sequence()
    engine.prefill(cache, seq, [1, 2, 3])
    one = torch.tensor([[4]])
    batch = cache.prepare([seq], 1)
    assert cpu_step.plan_for(model, one, batch, cache.pools, None) is not None
    assert cpu_step.plan_for(model, torch.tensor([[4, 5]]), batch, cache.pools, None) is None   # two tokens: prefill
    assert cpu_step.plan_for(model, one, batch, cache.pools, False) is None                      # naive attention asked
    assert cpu_step.plan_for(model, one, None, None, None) is None                               # no cache
    fp8 = engine.new_cache(block_size=16, fp8=True)
    assert cpu_step.plan_for(model, one, batch, fp8.pools, None) is None
    monkeypatch.setenv(cpu_step.STEP_ENV, "0")
    assert cpu_step.plan_for(model, one, batch, cache.pools, None) is None
    monkeypatch.setenv(cpu_step.STEP_ENV, "1")
    monkeypatch.setenv("KIMI_ENGINE_KERNELS", "torch")
    assert cpu_step.plan_for(model, one, batch, cache.pools, None) is None


def test_a_weight_that_is_not_bf16_runs_the_modules(checkpoint):
    engine = load(checkpoint, torch.float32)
    with torch.no_grad():
        engine.model.model.layers[0].self_attn.o_proj.weight.add_(1e-4)   # no longer exactly bf16
    cache = engine.new_cache(block_size=16)
    seq = cache.add_sequence()
    engine.prefill(cache, seq, [1, 2, 3])
    assert cpu_step.plan_for(engine.model, torch.tensor([[4]]), cache.prepare([seq], 1), cache.pools, None) is None


def test_bad_indices_raise_before_the_kernel(checkpoint):
    engine = load(checkpoint, torch.float32)
    cache = engine.new_cache(block_size=16)
    seq = cache.add_sequence()
    engine.prefill(cache, seq, [1, 2, 3])
    with pytest.raises(IndexError, match="token ids"), torch.inference_mode():
        engine.model(torch.tensor([[301]]), cache.prepare([seq], 1), cache.pools)
