"""The paged latent cache: chunked prefill, appending, forks, fp8, and growth with use up to 32k+ tokens."""

import pytest
import torch

import kimi_engine as ke
from kimi_engine.cache import LatentCache
from kimi_engine.runtime.blocks import BlockManager, CacheFull
from kimi_engine.synthetic import kimi_k2_config, tiny_config, write_random_checkpoint

PROMPT = torch.randint(2, 256, (50,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config(), seed=2)
    return ke.load(path, dtype=torch.float32, progress=False, device="cpu")


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_prefill_equals_one_shot(engine, chunk):
    one_shot = engine.logits(PROMPT)
    engine.prefill_chunk = chunk
    try:
        close(engine.logits(PROMPT), one_shot)
    finally:
        engine.prefill_chunk = 2048


def test_append_equals_prefilling_the_whole(engine):
    cache = engine.new_cache(block_size=16)
    seq = cache.add_sequence()
    engine.prefill(cache, seq, PROMPT[:23])
    appended = engine.prefill(cache, seq, PROMPT[23:], all_logits=True)   # "prefill only what is new"
    close(appended, engine.logits(PROMPT)[23:])
    assert cache.length(seq) == len(PROMPT)


def test_fork_decodes_like_unforked_and_shares_blocks(engine):
    cache = engine.new_cache(block_size=16)
    parent = cache.add_sequence()
    engine.prefill(cache, parent, PROMPT[:40])         # 2.5 blocks: the third is shared half-full
    blocks_before = cache.num_used_blocks
    children = [cache.fork(parent) for _ in range(3)]
    assert cache.num_used_blocks == blocks_before     # nothing copied yet
    nexts = [[5, 6, 7], [8, 9, 10], [11, 12, 13]]
    forked = [engine.decode_step(cache, children, [n[i] for n in nexts]) for i in range(3)]
    for j, n in enumerate(nexts):
        alone = engine.logits(PROMPT[:40] + n)[40:]
        close(torch.stack([f[j] for f in forked]), alone)
    # Copy-on-write took one block per child; the parent's tokens are untouched.
    close(engine.prefill(cache, parent, PROMPT[40:], all_logits=True), engine.logits(PROMPT)[40:])
    cache.free(children[0])
    assert len(cache.tables[children[1]]) == 3


def test_batched_decode_with_unequal_lengths(engine):
    cache = engine.new_cache(block_size=16)
    seqs = [cache.add_sequence() for _ in range(3)]
    lengths = [5, 33, 17]
    for seq, n in zip(seqs, lengths):
        engine.prefill(cache, seq, PROMPT[:n])
    out = engine.decode_step(cache, seqs, [3, 4, 5])
    for row, (n, t) in enumerate(zip(lengths, [3, 4, 5])):
        close(out[row], engine.logits(PROMPT[:n] + [t])[-1])


def test_fp8_cache_halves_memory(engine):
    kimi = kimi_k2_config()
    bf16, fp8 = LatentCache(kimi).bytes_per_token(), LatentCache(kimi, fp8=True).bytes_per_token()
    assert bf16 == 70_272 and fp8 == (512 + 64 + 8) * 61          # e4m3 values + two float32 scales
    exact, f8 = engine.new_cache(), engine.new_cache(fp8=True)
    for cache in (exact, f8):
        engine.prefill(cache, cache.add_sequence(), PROMPT)
    assert f8.pools.nbytes * 3 < exact.pools.nbytes                            # vs this float32 engine's cache
    a, b = (engine.decode_step(cache, [0], [3]) for cache in (exact, f8))
    # e4m3 keeps 3 mantissa bits (<= 6.25% per value): the logits move, but stay close.
    assert ((b - a).norm() / a.norm()) < 0.3


def test_cache_bookkeeping():
    cache = BlockManager(LatentCache(tiny_config(), block_size=16), max_blocks=4, prefix_cache=False)
    assert cache.pools.nbytes == 0                             # nothing up front
    a = cache.add_sequence()
    batch = cache.prepare([a], 20)
    assert batch.seq_lens.tolist() == [20] and batch.block_table.shape == (1, 2)
    assert batch.slots[0, 17].item() == batch.block_table[0, 1].item() * 16 + 1
    b = cache.fork(a)
    cache.prepare([b], 1)                                       # copy-on-write of the half-full block
    assert cache.tables[a][0] == cache.tables[b][0] and cache.tables[a][1] != cache.tables[b][1]
    cache.free(a)
    cache.free(b)
    assert cache.refcount == [0] * cache.pools.num_blocks
    c = cache.add_sequence()
    with pytest.raises(CacheFull, match="full"):
        cache.prepare([c], 65)
    with pytest.raises(ValueError, match="twice"):
        cache.prepare([c, c], 1)


def test_32k_context_grows_with_use_and_stays_finite(tmp_path):
    """Fill a 33k-token cache (a 2-layer, 1-head model, chunked prefill) and decode past YaRN's original length."""
    config = tiny_config(num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=40_000,
                         rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=1024,
                                           beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
    engine = ke.load(write_random_checkpoint(tmp_path, config), dtype=torch.float32, progress=False, device="cpu",
                     prefill_chunk=4096)
    cache = engine.new_cache()
    seq = cache.add_sequence()
    tokens = torch.randint(2, 256, (33_000,), generator=torch.Generator().manual_seed(0))
    engine.prefill(cache, seq, tokens[:1000])
    pools = cache.pools
    small = pools.nbytes
    assert small <= 1.25 * 1024 * pools.bytes_per_token() + 16 * 64 * pools.bytes_per_token()
    logits = engine.prefill(cache, seq, tokens[1000:])
    assert pools.nbytes >= 33_000 * pools.bytes_per_token() > 20 * small
    for token in (5, 6):
        assert torch.isfinite(logits).all()
        logits = engine.decode_step(cache, [seq], [token])[0]
    assert torch.isfinite(logits).all() and cache.length(seq) == 33_002
