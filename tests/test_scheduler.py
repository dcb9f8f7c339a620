"""The long-lived scheduler and the prefix cache: outputs equal a cold engine's across partial blocks,
forks, preemption and eviction; threads share batches; the budget holds; cancellation frees blocks;
long prompts are chunked between decode steps.

float32 on CPU throughout. A cached prefix was computed in another pass (other chunk boundaries,
decode instead of prefill) than a cold prefill would compute it, so latents agree to rounding only;
greedy and seeded tokens are compared exactly, which these short runs bear (a near-tie flipping
would show up as a difference, and has not in any run).
"""

import threading

import pytest
import torch

import kimi_engine as ke
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

SAMPLED = dict(temperature=0.9, top_p=0.95, seed=11)


def load_demo(**kwargs):
    return ke.load(device="cpu", dtype=torch.float32, progress=False, **kwargs)


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def cold():
    return load_demo(prefix_cache=False)


@pytest.fixture(scope="module")
def random_path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("random"), tiny_config(), seed=5)


def ids(n: int, seed: int, vocab: int = 256) -> list[int]:
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def shakespeare_prompts(engine) -> list[list[int]]:
    """Prompts sharing a 150-token head (two full blocks and a partial one), then diverging."""
    head = engine.tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks? " * 12)[:150]
    return [head + engine.tokenizer.encode(tail) for tail in ("JULIET:", "Nurse:\nMadam", "MERCUTIO: Nay")]


@pytest.mark.parametrize("kwargs", [dict(temperature=0), SAMPLED], ids=["greedy", "seeded"])
def test_prefix_cache_equals_a_cold_engine_on_the_demo(demo, cold, kwargs):
    prompts = shakespeare_prompts(demo)
    want = [cold.generate(p, max_new_tokens=20, **kwargs) for p in prompts]
    first = demo.generate(prompts[0], max_new_tokens=20, **kwargs)
    assert first.token_ids == want[0].token_ids
    for p, w in zip(prompts[1:], want[1:]):
        got = demo.generate(p, max_new_tokens=20, **kwargs)
        assert got.token_ids == w.token_ids and got.text == w.text
        assert got.cached_tokens == 128 and w.cached_tokens == 0      # the shared head's two full blocks
    # Resending a prompt together with what it generated: served up to its last full block.
    again = demo.generate(prompts[0] + first.token_ids[:-1], max_new_tokens=5, temperature=0)
    assert again.cached_tokens == (len(prompts[0]) + 19) // 64 * 64
    assert again.token_ids == cold.generate(prompts[0] + first.token_ids[:-1], max_new_tokens=5, temperature=0).token_ids


def test_prefix_cache_equals_a_cold_engine_on_random_weights(random_path):
    warm = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512)
    cold = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512, prefix_cache=False)
    head = ids(130, 0)
    prompts = [head + ids(k, k) for k in (1, 7, 64, 70)]         # partial and exactly full last blocks
    for kwargs in (dict(temperature=0), SAMPLED, dict(SAMPLED, n=3)):
        got = [warm.generate(p, max_new_tokens=12, stop_token_ids=[], **kwargs) for p in prompts]
        want = [cold.generate(p, max_new_tokens=12, stop_token_ids=[], **kwargs) for p in prompts]
        assert got == [_no_cache_count(g, w) for g, w in zip(got, want)]
    assert warm.stats.cached_tokens > 0 and cold.stats.cached_tokens == 0


def _no_cache_count(got, want):
    """`want` with got's cached_tokens: the outputs must match in everything else."""
    if isinstance(want, list):
        return [_no_cache_count(g, w) for g, w in zip(got, want)]
    want.cached_tokens = got.cached_tokens
    return want


def test_preemption_and_eviction_mid_run_change_nothing(random_path, tmp_path):
    cold = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512, prefix_cache=False)
    # 6 blocks of 64 tokens for 4 sequences that grow to 100+ tokens each: the youngest are preempted
    # (and recomputed from what the prefix cache kept), cached blocks evicted.
    tight = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512,
                    max_batch_size=4, kv_cache_tokens=6 * 64)
    prompts = [ids(40 + 9 * i, 20 + i) for i in range(6)]
    for kwargs in (dict(temperature=0), SAMPLED):
        want = cold.generate(prompts, max_new_tokens=70, stop_token_ids=[], **kwargs)
        got = tight.generate(prompts, max_new_tokens=70, stop_token_ids=[], **kwargs)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    stats = tight.stats
    assert stats.preemptions > 0 and stats.evicted_blocks > 0
    assert tight.blocks.pools.num_blocks <= 6 and tight.blocks.num_used_blocks == 0


def test_a_sequence_longer_than_the_cache_fails_clearly_and_the_engine_goes_on(random_path):
    small = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512,
                    kv_cache_tokens=2 * 64)
    with pytest.raises(RuntimeError, match="kv_cache_tokens"):
        small.generate(ids(100, 1), max_new_tokens=100, stop_token_ids=[], temperature=0)
    assert small.blocks.num_used_blocks == 0
    assert small.generate(ids(20, 1), max_new_tokens=5, temperature=0).completion_tokens >= 1


def test_cancellation_frees_blocks_at_once(demo):
    for end in ("close", "break", "drop"):
        stream = demo.generate(shakespeare_prompts(demo)[1], max_new_tokens=200, temperature=0, stream=True)
        for i, _ in enumerate(stream):
            assert demo.blocks.num_used_blocks > 0
            if i == 2:
                break
        if end == "close":
            stream.close()
        elif end == "drop":
            del stream
        else:   # a generator broken out of and dropped by the loop is closed by CPython's refcounting
            del stream
        assert demo.blocks.num_used_blocks == 0 and demo.num_running == 0 and not demo.scheduler.has_work()


def test_eight_threads_share_batches_and_keep_their_seeds(demo):
    prompts = [f"{name}:\n" for name in ("ROMEO", "JULIET", "Nurse", "MERCUTIO", "TYBALT", "BENVOLIO", "FRIAR", "PARIS")]
    alone = [demo.generate(p, max_new_tokens=16, **SAMPLED).token_ids for p in prompts]
    results, errors, batch_sizes = [None] * 8, [], []
    execute = demo.runner.execute

    def recording(plan):
        if plan.decode_batch is not None:
            batch_sizes.append(len(plan.decode_tokens))
        return execute(plan)
    demo.runner.execute = recording
    barrier = threading.Barrier(8)

    def call(i):
        try:
            barrier.wait()
            results[i] = demo.generate(prompts[i], max_new_tokens=16, **SAMPLED).token_ids
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        del demo.runner.execute
    assert not errors and results == alone
    assert max(batch_sizes) > 1                                   # the threads' requests decoded together


def test_the_budget_holds_over_a_thousand_distinct_prompts(tmp_path):
    one_layer = write_random_checkpoint(tmp_path, tiny_config(num_hidden_layers=1, first_k_dense_replace=0), seed=1)
    engine = ke.load(one_layer, device="cpu", dtype=torch.float32, progress=False, max_seq_len=512,
                     max_batch_size=32, kv_cache_tokens=16 * 64)
    prompts = [ids(66, 1000 + i) for i in range(1000)]           # a full block each, all different
    sizes = []
    for start in range(0, 1000, 100):
        out = engine.generate(prompts[start:start + 100], max_new_tokens=1, temperature=0)
        assert all(c.finish_reason in ("length", "stop") for c in out)
        sizes.append(engine.blocks.pools.nbytes)
    assert engine.blocks.pools.num_blocks == 16 and len(set(sizes)) == 1   # at the budget from the first 100 on
    assert engine.stats.evicted_blocks > 900


def test_a_long_prompt_is_chunked_between_decode_steps(random_path):
    engine = ke.load(random_path, device="cpu", dtype=torch.float32, progress=False, max_seq_len=1024,
                     prefill_chunk=64)
    plans = []
    execute = engine.runner.execute

    def recording(plan):
        plans.append(([len(p.tokens) for p in plan.prefills], len(plan.decode_tokens)))
        return execute(plan)
    engine.runner.execute = recording
    short = [engine.generate(p, max_new_tokens=40, stop_token_ids=[], temperature=0, stream=True)
             for p in (ids(10, 1), ids(12, 2))]
    for stream in short:          # both decoding
        next(stream)
    long = engine.generate(ids(600, 3), max_new_tokens=2, stop_token_ids=[], temperature=0, stream=True)
    next(long)
    chunks = [(p, d) for p, d in plans if p and max(p) > 1]
    assert sum(sum(p) for p, _ in chunks) >= 590                 # the long prompt went in chunk by chunk ...
    assert all(sum(p) + d <= 64 for p, d in plans)               # ... within the step budget ...
    assert all(d == 2 for p, d in chunks[1:])                    # ... while both short ones kept decoding
    for stream in short + [long]:
        stream.close()


def test_stateless_conversation_prefills_what_each_round_appends(demo):
    messages, prefilled, appended = [{"role": "user", "content": "Good morrow."}], [], []
    previous = 0
    for round in range(8):
        reply = demo.chat(messages, thinking=False, max_new_tokens=12, temperature=0)
        usage = reply["usage"]
        prefilled.append(usage["prompt_tokens"] - usage["cached_tokens"])
        appended.append(usage["prompt_tokens"] - previous)   # the client's view: the last reply and the new turn
        previous = usage["prompt_tokens"]
        messages += [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": f"And {round}?"}]
    block = demo.blocks.block_size
    for p, a in zip(prefilled[1:], appended[1:]):
        assert p < a + block         # what the round appended, plus at most the previous prompt's partly filled block
