"""Inputs a server forwards verbatim: each bad one raises one clear error naming the argument, and the
engine afterwards gives the same greedy output as before the bad call."""

import pytest
import torch

import kimi_engine as ke


@pytest.fixture(scope="module")
def demo():
    return ke.load(device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def before(demo):
    return demo.generate("ROMEO:", max_new_tokens=8, temperature=0).token_ids


def nan_row(ids, row):
    return torch.full_like(row, float("nan"))


def minus_inf_row(ids, row):
    return torch.full_like(row, float("-inf"))


@pytest.mark.parametrize("call, error, match", [
    (lambda e: e.generate(123), ValueError, "prompt: expected .* got int"),
    (lambda e: e.generate(None), ValueError, "prompt: expected .* got NoneType"),
    (lambda e: e.generate({"a": 1}), ValueError, "prompt: expected .* got dict"),
    (lambda e: e.generate(b"ROMEO"), ValueError, "got bytes"),
    (lambda e: e.generate((1, 2, 3)), ValueError, "got tuple"),
    (lambda e: e.generate([]), ValueError, "an empty list"),
    (lambda e: e.generate([[1, 2], "x", 3]), ValueError, r"prompt\[2\]: expected .* got int"),
    (lambda e: e.generate(""), ValueError, "prompt is empty"),
    (lambda e: e.generate("x", n=0), ValueError, "n=0"),
    (lambda e: e.generate("x", max_new_tokens=0), ValueError, "max_new_tokens"),
    (lambda e: e.generate("x", temperature=-1), ValueError, "temperature"),
    (lambda e: e.generate("x", top_p=0), ValueError, "top_p"),
    (lambda e: e.generate("x", seed=1.5), ValueError, "seed"),
    (lambda e: e.generate("x", stop=[""]), ValueError, "stop"),
    (lambda e: e.generate("x", logprobs=-1), ValueError, "logprobs"),
    (lambda e: e.generate("x", logits_processors=[1]), ValueError, "logits_processors"),
    (lambda e: e.generate("x", max_new_tokens=2, logits_processors=[nan_row]), ValueError, "no finite logit"),
    (lambda e: e.generate("x", max_new_tokens=2, logits_processors=[minus_inf_row]), ValueError, "no finite logit"),
    (lambda e: e.logits("text"), ValueError, "token_ids: expected a list of token ids, got str"),
    (lambda e: e.logits([]), ValueError, "empty"),
    (lambda e: e.run_agent([{"role": "user", "content": "hi"}], [], max_tool_calls=-1), ValueError, "max_tool_calls"),
])
def test_bad_calls_raise_and_leave_the_engine_as_it_was(demo, before, call, error, match):
    with pytest.raises(error, match=match):
        call(demo)
    assert demo.blocks.num_used_blocks == 0 and not demo.scheduler.has_work()
    assert demo.generate("ROMEO:", max_new_tokens=8, temperature=0).token_ids == before


def test_a_processor_failing_in_a_batch_fails_only_its_request(demo, before):
    calls = []

    def fails_late(ids, row):
        calls.append(len(ids))
        if len(ids) == 3:
            raise KeyError("boom")
        return row
    with pytest.raises(KeyError, match="boom"):
        demo.generate("ROMEO:", max_new_tokens=8, temperature=0, logits_processors=[fails_late])
    assert calls == [0, 1, 2, 3]
    assert demo.blocks.num_used_blocks == 0
    assert demo.generate("ROMEO:", max_new_tokens=8, temperature=0).token_ids == before


def test_a_tool_raising_system_exit_propagates_and_the_engine_stays_consistent(demo, before):
    def leave():
        """Leave."""
        raise SystemExit(3)
    tok = demo.tokenizer
    script = tok.encode("<think></think><|tool_calls_section_begin|><|tool_call_begin|>functions.leave:0"
                        "<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>") + [tok.eos_token_id]

    def force(ids, row):
        return torch.full_like(row, float("-inf")).index_fill(0, torch.tensor([script[len(ids)]]), 0.0)
    with pytest.raises(SystemExit):
        demo.run_agent([{"role": "user", "content": "go"}], [leave], logits_processors=[force], temperature=0)
    assert demo.blocks.num_used_blocks == 0 and not demo.scheduler.has_work()
    assert demo.generate("ROMEO:", max_new_tokens=8, temperature=0).token_ids == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="tpu"), "device='tpu'"),
    (dict(device="cuda"), "CUDA is not available") if not torch.cuda.is_available() else (dict(device="nope"), "nope"),
    (dict(dtype=torch.int8), "dtype=torch.int8"),
    (dict(max_batch_size=0), "max_batch_size=0"),
    (dict(prefill_chunk=0), "prefill_chunk=0"),
    (dict(kv_cache_tokens=0), "kv_cache_tokens=0"),
])
def test_bad_load_arguments_fail_before_loading(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ke.load(progress=False, **kwargs)
