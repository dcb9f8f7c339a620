"""CUDA-graph decode (runtime/cuda_graphs.py). On a CPU it runs its static-buffer step eagerly, so these
tests check everything but the capture itself: buckets, padding rows, buffer copies, unequal lengths,
sequences joining and leaving, pool changes, against Engine.decode_step. The capture and replay are
checked on a GPU (marked cuda).

float32 on CPU: the runner computes the same math on a padded batch, so logits agree to rounding
(a padded batch may change the BLAS blocking); 1e-5 is far below any logit difference that matters.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kimi_engine as ke
from kimi_engine import ops
from kimi_engine.runtime.cuda_graphs import DecodeGraphs, bucket_sizes, pool_addresses
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

PROMPTS = [[3, 17, 42, 7, 99], list(range(2, 40)), [250, 11, 64, 9] * 5, list(range(100, 121)), [5, 6]]
# Steps of (sequences that decode, by prompt index): buckets 1, 4 (3 padded), 4, 8 (3 padded), 2, a new
# sequence joining (index 5) and one leaving (0), another order; then a long prompt that grows every
# pool (new addresses: the graphs must be captured again) and a step after it.
SCHEDULE = [[0], [0, 1, 2], [3, 1, 0, 2], [0, 1, 2, 3, 4], [4, 2], "join", [5, 3, 1], "leave", [1, 5, 2, 3, 4],
            "grow", [2, 1, 3]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config(), seed=3)


@pytest.fixture(scope="module")
def engine(path):
    return ke.load(path, dtype=torch.float32, progress=False, device="cpu", max_batch_size=8, max_seq_len=512)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def graphs_on(engine, cache):
    """DecodeGraphs over `cache`'s pools (its scratch sequence taken from it) and a decode(seqs, tokens) through it."""
    scratch = cache.add_sequence()
    b = cache.prepare([scratch], 1, device="cpu")
    graphs = DecodeGraphs(engine.model, cache.pools, engine.max_batch_size, engine.max_seq_len,
                          (int(b.block_table[0, 0]), int(b.slots[0, 0])))
    return graphs, lambda seqs, tokens: graphs.decode(cache.prepare(seqs, 1, device="cpu"), tokens)


def run_schedule(engine, make_decode, steps=SCHEDULE, check=close, reference=None):
    """Decode the same steps through make_decode(cache) and `reference` (decode_step), on twin caches."""
    reference = reference or engine.decode_step
    caches = [engine.new_cache(block_size=16) for _ in range(2)]
    for cache in caches:
        cache.reserve(25)                    # room for all but "grow": the pools move only there
    decode = make_decode(caches[0])
    seqs = [[], []]
    gen = torch.Generator().manual_seed(0)

    def add(prompt):
        for cache, ids in zip(caches, seqs):
            ids.append(cache.add_sequence())
            engine.prefill(cache, ids[-1], prompt)
    for prompt in PROMPTS:
        add(prompt)
    for step in steps:
        if step == "join":
            add([9, 8, 7, 6, 5, 4, 3])
        elif step == "grow":
            add([2 + i % 250 for i in range(300)])
        elif step == "leave":
            for cache, ids in zip(caches, seqs):
                cache.free(ids[0])
        else:
            tokens = torch.randint(2, engine.config.vocab_size, (len(step),), generator=gen).tolist()
            ours = decode([seqs[0][i] for i in step], tokens)
            check(ours, reference(caches[1], [seqs[1][i] for i in step], tokens))
    return caches[0]


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(128) == (1, 2, 4, 8, 16, 32, 64, 128)


def test_runner_matches_decode_step(engine, monkeypatch):
    made, buckets = [], []

    def make(cache):
        graphs, decode = graphs_on(engine, cache)
        step = graphs._step
        monkeypatch.setattr(graphs, "_step", lambda bucket: buckets.append(bucket) or step(bucket))
        made.append(graphs)
        return decode
    cache = run_schedule(engine, make)
    graphs = made[0]
    assert buckets == [1, 4, 4, 8, 2, 4, 8, 4]
    assert list(graphs.graphs) == [4] and graphs.captures == 0    # cleared when the pools grew; no capture off CUDA
    assert len(cache.tables) == len(PROMPTS) + 2 + 1 - 1          # joined and grown, one left, and the scratch


def test_pool_growth_is_noticed(engine):
    a, b = engine.new_cache(block_size=16), engine.new_cache(block_size=16)
    graphs, decode = graphs_on(engine, a)
    sa, sb = a.add_sequence(), b.add_sequence()
    for cache, seq in [(a, sa), (b, sb)]:
        engine.prefill(cache, seq, PROMPTS[1])
    close(decode([sa], [5]), engine.decode_step(b, [sb], [5]))
    before = pool_addresses(a.pools)
    engine.prefill(a, a.add_sequence(), list(range(2, 200)))      # grows every pool: new addresses
    engine.prefill(b, b.add_sequence(), list(range(2, 200)))
    assert pool_addresses(a.pools) != before
    close(decode([sa], [6]), engine.decode_step(b, [sb], [6]))
    assert graphs._pools == pool_addresses(a.pools)


def test_generate_with_graphs_equals_without(engine, path):
    graphs = ke.load(path, dtype=torch.float32, progress=False, device="cpu", max_batch_size=8, max_seq_len=512,
                     cuda_graphs=True)
    assert isinstance(graphs.graphs, DecodeGraphs) and graphs.runner.graphs is graphs.graphs
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    for kwargs in [dict(temperature=0.0), dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=5, n=3)]:
        want = engine.generate(prompts, max_new_tokens=12, stop_token_ids=[], **kwargs)
        assert graphs.generate(prompts, max_new_tokens=12, stop_token_ids=[], **kwargs) == want
    assert graphs.stats.decode_tokens == 11 * (3 + 3 + 9)        # steps after each path's first token


def test_runner_errors(engine):
    cache = engine.new_cache()
    graphs, decode = graphs_on(engine, cache)
    seqs = [cache.add_sequence() for _ in range(9)]
    for s in seqs:
        engine.prefill(cache, s, [1, 2, 3])
    with pytest.raises(ValueError, match="buckets hold 1 to 8"):
        decode(seqs, [4] * 9)
    with pytest.raises(ValueError, match="2 tokens for 3 sequences"):
        decode(seqs[:3], [4, 5])


SYNCING_OPS = ("_local_scalar_dense", "nonzero", "unique", "repeat_interleave", "masked_select", "item", "equal")


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.interpreter
def test_triton_path_matches_and_reads_nothing_back(engine, monkeypatch):
    """The Triton kernels (interpreter) through the runner: same logits as decode_step, and the static
    step calls no op that would read a CUDA tensor back to the host (which a capture forbids)."""
    recorder = RecordOps()

    def triton(fn):                          # decode steps only: the prefills stay on the fast reference
        def call(*args):
            with monkeypatch.context() as m:
                m.setenv(ops.KERNELS_ENV, "triton")
                return fn(*args)
        return call
    def make(cache):
        graphs, decode = graphs_on(engine, cache)
        step = graphs._step

        def recorded(bucket):
            with recorder:
                return step(bucket)
        monkeypatch.setattr(graphs, "_step", recorded)
        return triton(decode)
    run_schedule(engine, make, steps=[[0, 1, 2], [4]], reference=triton(engine.decode_step),
                 check=lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4))
    assert recorder.ops and not [op for op in recorder.ops if any(s in op for s in SYNCING_OPS)]


def load_cuda(path, **kwargs):
    return ke.load(path, device="cuda", dtype=torch.bfloat16, progress=False, max_batch_size=8, max_seq_len=512,
                   **kwargs)


@pytest.mark.cuda
def test_graph_replay_matches_eager_on_gpu(path, monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    engine = load_cuda(path)
    made = []

    def make(use_graphs):
        def build(cache):
            graphs, decode = graphs_on(engine, cache)
            graphs.use_graphs = use_graphs   # False: the same static-buffer step, launched op by op
            made.append(graphs)
            return decode
        return build
    eager_decodes = []

    def eager_reference(cache, seqs, tokens):
        if not eager_decodes:
            eager_decodes.append(make(False)(cache))
        return eager_decodes[0](seqs, tokens)

    def same_kernels(a, b):                  # the replay runs the very kernels the eager step launches
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
    run_schedule(engine, make(True), check=same_kernels, reference=eager_reference)
    graphs = made[0]
    assert graphs.captures == 5                # buckets 1, 2, 4, 8, then 4 again after the pools grew
    assert list(graphs.graphs) == [4] and graphs.graphs[4] is not None

    def bf16_close(a, b):                    # decode_step: other split counts and MoE tiles, bf16 rounding
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())
    run_schedule(engine, make(True), check=bf16_close)

    with_graphs, reference = load_cuda(path, cuda_graphs=True), load_cuda(path, cuda_graphs=True)
    reference.graphs.use_graphs = False
    stops = sorted(with_graphs.stop_ids())

    def no_stop(ids, logits):                # every path runs all 8 steps, whatever CUDA's random stream draws
        return logits.index_fill(-1, torch.tensor(stops, device=logits.device), float("-inf"))
    for _ in range(2):                       # the second call reuses the engine's pools and graphs
        args = dict(max_new_tokens=8, temperature=0.7, seed=1, stop_token_ids=[], logits_processors=[no_stop])
        assert with_graphs.generate(PROMPTS[:3], **args) == reference.generate(PROMPTS[:3], **args)
    assert with_graphs.graphs.captures == 1  # three paths decode together: bucket 4 only
