"""generate(): sampling, seeds, streaming, stops, continuous batching, heavy mode, errors, HF parity."""

import pytest
import torch

import kimi_engine as ke
from kimi_engine.runtime.sampling import SamplingParams, apply_repetition_penalty, filter_logits, make_generator, sample

from .hf_reference import hf_model_from_checkpoint
from .model_helpers import write_chat_checkpoint

PROMPTS = ["ROMEO:", "JULIET: O Romeo", "First Citizen:\nBefore we proceed"]
SAMPLING = dict(temperature=0.9, top_p=0.95, top_k=100, seed=7)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_chat_checkpoint(tmp_path_factory.mktemp("chat"))
    return ke.load(path, dtype=torch.float32, progress=False, device="cpu", max_batch_size=8, max_seq_len=512)


def test_seeded_request_same_alone_or_in_a_batch(engine):
    alone = engine.generate(PROMPTS[1], max_new_tokens=24, **SAMPLING)
    batch = engine.generate(PROMPTS, max_new_tokens=24, **SAMPLING)
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    assert engine.generate(PROMPTS[1], max_new_tokens=24, **SAMPLING).token_ids == alone.token_ids
    assert engine.generate(PROMPTS[1], max_new_tokens=24, **{**SAMPLING, "seed": 8}).token_ids != alone.token_ids


def test_streaming_equals_non_streaming(engine):
    for stop in (None, ["the", "e"]):
        full = engine.generate(PROMPTS, max_new_tokens=30, stop=stop, **SAMPLING)
        pieces = {}
        for delta in engine.generate(PROMPTS, max_new_tokens=30, stop=stop, stream=True, **SAMPLING):
            text, ids, reason = pieces.get(delta.prompt, ("", [], None))
            assert reason is None                                    # nothing after the last delta
            pieces[delta.prompt] = (text + delta.text, ids + delta.token_ids, delta.finish_reason)
        for i, c in enumerate(full):
            assert pieces[i] == (c.text, c.token_ids, c.finish_reason)


def test_stop_strings_token_ids_and_finish_reasons(engine):
    free = engine.generate(PROMPTS[0], max_new_tokens=40, temperature=0)
    assert free.finish_reason == "length" and free.completion_tokens == 40
    assert free.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))
    stop = free.text[10:13]
    cut = engine.generate(PROMPTS[0], max_new_tokens=40, temperature=0, stop=[stop, "zzzz"])
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    stop_id = free.token_ids[5]
    early = engine.generate(PROMPTS[0], max_new_tokens=40, temperature=0, stop_token_ids=[stop_id])
    k = free.token_ids.index(stop_id)
    assert early.finish_reason == "stop" and early.token_ids == free.token_ids[:k + 1]
    assert early.text == engine.tokenizer.decode(free.token_ids[:k])      # the stop token's text is left out
    eos = engine.tokenizer.eos_token_id                                   # <|im_end|> ends generation
    forced = engine.generate(PROMPTS[0], max_new_tokens=10, temperature=0,
                             logits_processors=[lambda ids, row: _force(row, eos if len(ids) == 2 else None)])
    assert forced.finish_reason == "stop" and forced.token_ids[-1] == eos and len(forced.token_ids) == 3


def _force(row, token):
    if token is None:
        return row
    out = torch.full_like(row, float("-inf"))
    out[token] = 0
    return out


def test_continuous_batching_more_prompts_than_slots(tmp_path):
    engine = ke.load(write_chat_checkpoint(tmp_path), dtype=torch.float32, progress=False, device="cpu",
                     max_batch_size=2)
    prompts = [f"{p} {i}" for i in range(3) for p in PROMPTS[:2]]            # 6 prompts, 2 slots
    alone = [engine.generate(p, max_new_tokens=16, temperature=0).token_ids for p in prompts]
    stop = alone[0][4]          # a stop token makes the paths finish at different steps, freeing slots
    queued = engine.generate(prompts, max_new_tokens=16, temperature=0, stop_token_ids=[stop])
    for ids, c in zip(alone, queued):
        expected = ids[:ids.index(stop) + 1] if stop in ids else ids
        assert c.token_ids == expected
    assert len({len(c.token_ids) for c in queued}) > 1


def test_heavy_mode_prefills_the_prompt_once(engine):
    before = engine.stats.prefill_tokens
    paths = engine.generate(PROMPTS[2], n=8, max_new_tokens=12, **SAMPLING)
    prompt_tokens = len(engine.tokenizer.encode(PROMPTS[2]))
    assert engine.stats.prefill_tokens - before == prompt_tokens
    assert len(paths) == 8 and len({tuple(p.token_ids) for p in paths}) > 1
    # Sample j of a seeded request is the same with or without its siblings.
    assert paths[3].token_ids == engine.generate(PROMPTS[2], n=4, max_new_tokens=12, **SAMPLING)[3].token_ids


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(n=0), "n"),
    (dict(n=9), "n"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[""]), "stop"),
    (dict(seed="x"), "seed"), (dict(prompt=[1, 10**6]), "vocab_size"), (dict(prompt="a" * 3000), "max_seq_len"),
    (dict(prompt=[]), "empty"),
])
def test_bad_arguments_raise_and_engine_stays_usable(engine, kwargs, name):
    kwargs = {"prompt": PROMPTS[0], **kwargs}
    with pytest.raises(ValueError, match=name):  # raised at the call, even for stream=True
        engine.generate(max_new_tokens=kwargs.pop("max_new_tokens", 4), stream=True, **kwargs)
    assert engine.generate(PROMPTS[0], max_new_tokens=3, temperature=0).completion_tokens == 3


def test_greedy_matches_hf_generate(tmp_path):
    path = write_chat_checkpoint(tmp_path, seed=3)
    engine = ke.load(path, dtype=torch.float32, progress=False, device="cpu")
    hf = hf_model_from_checkpoint(path, engine.config, torch.float32)
    prompt = engine.tokenizer.encode("KING RICHARD III:\nNow is the winter")
    ours = engine.generate(prompt, max_new_tokens=20, temperature=0).token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=sorted(engine.stop_ids()), pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


# --------------------------------------------------------------------------- the sampler itself
def test_filters_reduce_to_greedy_at_their_limits():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gens = [make_generator(torch.device("cpu"), i) for i in range(4)]
    greedy = logits.argmax(-1)
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
                   SamplingParams(temperature=0)):
        assert torch.equal(sample(logits, params, gens), greedy)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).log_softmax(-1)
    g = make_generator(torch.device("cpu"), 0)
    draws = torch.stack([sample(logits, SamplingParams(), [g]) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


def test_top_p_and_min_p_masks():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=float(p[0] + p[1] - 1e-4))))[0]
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_logits(logits, SamplingParams(min_p=float(p[2] / p[0]) - 1e-4)))[0]
    assert kept.tolist() == [True, True, True, False]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
