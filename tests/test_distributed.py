"""Tensor + expert parallelism: world size 2 over gloo in two spawned processes equals one process.

One spawn runs every case (process start-up and imports dominate the time). Each rank records the
bytes it reads through safetensors, so the test can check it read only its own share.
"""

import datetime
import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import kimi_engine as ke
from kimi_engine import checkpoint
from kimi_engine.checkpoint import INDEX_FILE, check_checkpoint, read_headers
from kimi_engine.config import QuantConfig
from kimi_engine.parallel import Parallel
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

from .model_helpers import write_chat_checkpoint

WORLD = 2
PROMPT = torch.randint(2, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()
NEW_TOKENS = 10
ALL_INT4 = QuantConfig(group_size=32, targets=("Linear",), ignore=()).to_dict()

CONFIGS = {
    # Kimi's layout: INT4 routed experts, bf16 attention / shared expert / dense MLP / lm_head.
    "kimi": {},
    # Every Linear INT4 (row-split INT4 splits o_proj's and down_proj's packed words and scale
    # groups), a plain q_proj, tied embeddings (the logits come from the vocab-split embedding),
    # two shared experts and a group-limited router.
    "all-int4-tied": dict(quantization_config=ALL_INT4, moe_intermediate_size=64, q_lora_rank=None,
                          tie_word_embeddings=True, n_shared_experts=2, n_routed_experts=16, n_group=4,
                          topk_group=2, num_experts_per_tok=4),
}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _worker(rank: int, store: str, cases: dict, chat_path: str, out: str) -> None:
    torch.set_num_threads(1)   # two ranks share the CI machine's two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    reads: list[tuple[str, int]] = []
    real_open = checkpoint.safe_open

    class CountingSlice:
        def __init__(self, s, key):
            self.s, self.key = s, key

        def __getattr__(self, name):            # get_dtype, get_shape: header only
            return getattr(self.s, name)

        def __getitem__(self, index):
            t = self.s[index]
            reads.append((self.key, t.numel() * t.element_size()))
            return t

    class CountingOpen:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return CountingSlice(self.f.get_slice(key), key)

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            reads.append((key, t.numel() * t.element_size()))
            return t

    checkpoint.safe_open = CountingOpen
    results = {}
    for name, path in cases.items():
        reads.clear()
        engine = ke.load(path, device="cpu", dtype=torch.float32, max_seq_len=256, progress=False,
                         parallel=Parallel(rank, WORLD))
        with torch.inference_mode():
            cacheless = engine.model(torch.tensor([PROMPT]))[0].float()
        torch.manual_seed(rank)   # unseeded sampling must still agree across ranks (a shared seed)
        sampled = [c.token_ids for c in engine.generate([PROMPT[:6], PROMPT[:6]], max_new_tokens=NEW_TOKENS,
                                                        temperature=1.0, stop_token_ids=[])]
        results[name] = dict(
            logits=engine.logits(PROMPT), cacheless=cacheless, greedy=engine.greedy(PROMPT[:6], NEW_TOKENS),
            sampled=sampled,
            reads=list(reads),
            param_bytes={n: p.numel() * p.element_size() for n, p in engine.model.named_parameters()},
        )
    # Only rank 0 schedules: the agent loop and its tools run there, and every rank returns its result.
    engine = ke.load(chat_path, device="cpu", dtype=torch.float32, max_seq_len=512, progress=False,
                     parallel=Parallel(rank, WORLD))
    tok, ran = engine.tokenizer, []

    def echo(text: str) -> str:
        """Say it back."""
        ran.append(text)
        return f"{text} from {rank}"
    turns = iter([tok.encode("<|tool_calls_section_begin|><|tool_call_begin|>functions.echo:0"
                             '<|tool_call_argument_begin|>{"text": "hi"}<|tool_call_end|><|tool_calls_section_end|>'),
                  tok.encode("<think></think>done")])
    script = {}

    def force(ids, row):
        if not ids:
            script["ids"] = next(turns) + [tok.eos_token_id]
        return torch.full_like(row, float("-inf")).index_fill(0, torch.tensor([script["ids"][len(ids)]]), 0.0)
    run = engine.run_agent([{"role": "user", "content": "echo hi"}], [echo], logits_processors=[force],
                           temperature=0, max_new_tokens=64)
    results["tool"] = dict(ran=ran, messages=run.messages)
    try:                                          # a call that breaks on rank 0 raises on every rank, no hang
        engine.run_agent([{"role": "user", "content": "x"}], [echo], on_step=lambda step: 1 / 0, max_new_tokens=2)
    except (ZeroDivisionError, RuntimeError) as e:
        results["tool"]["error"] = f"{type(e).__name__}: {e}"
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results], checkpoint paths) for every case."""
    tmp = tmp_path_factory.mktemp("distributed")
    paths = {name: write_random_checkpoint(tmp / name, tiny_config(**overrides), seed=3)
             for name, overrides in CONFIGS.items()}
    single = {}
    for name, path in paths.items():
        engine = ke.load(path, device="cpu", dtype=torch.float32, max_seq_len=256, progress=False)
        single[name] = dict(logits=engine.logits(PROMPT), greedy=engine.greedy(PROMPT[:6], NEW_TOKENS),
                            param_bytes={n: p.numel() * p.element_size() for n, p in engine.model.named_parameters()})
    chat = write_chat_checkpoint(tmp / "chat")
    mp.spawn(_worker, args=(str(tmp / "store"), {k: str(v) for k, v in paths.items()}, str(chat), str(tmp)),
             nprocs=WORLD)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks, paths


@pytest.mark.parametrize("case", list(CONFIGS))
def test_logits_and_greedy_match_single_process(runs, case):
    single, ranks, _ = runs
    for r in ranks:
        # float32: the row-split matmuls and all-reduces only reassociate sums (~1e-7 relative).
        assert r[case]["logits"].shape == single[case]["logits"].shape
        assert rel(r[case]["logits"], single[case]["logits"]) < 1e-5
        assert rel(r[case]["cacheless"], single[case]["logits"]) < 1e-5
        assert r[case]["greedy"] == single[case]["greedy"]
    # Every rank ends with the same logits (all-gathered), so every rank picks the same tokens.
    assert torch.equal(ranks[0][case]["logits"], ranks[1][case]["logits"])
    # Sampled without a seed, from global RNGs seeded differently on each rank: the same tokens on both.
    assert ranks[0][case]["sampled"] == ranks[1][case]["sampled"]


def test_agent_tools_run_on_rank_zero_only(runs):
    _, ranks, _ = runs
    assert [r["tool"]["ran"] for r in ranks] == [["hi"], []]
    assert ranks[0]["tool"]["messages"] == ranks[1]["tool"]["messages"]
    assert ranks[0]["tool"]["messages"][2]["content"] == "hi from 0" and ranks[0]["tool"]["messages"][-1]["content"] == "done"
    assert ranks[0]["tool"]["error"].startswith("ZeroDivisionError")
    assert ranks[1]["tool"]["error"].startswith("RuntimeError: run_agent failed on rank 0: ZeroDivisionError")


@pytest.mark.parametrize("case", list(CONFIGS))
def test_each_rank_holds_half_the_experts_and_its_slices(runs, case):
    single, ranks, _ = runs

    def total(param_bytes, pattern):
        return sum(b for n, b in param_bytes.items() if re.search(pattern, n))
    for pattern in (r"\.experts\.", r"self_attn\.(q_b_proj|q_proj|kv_b_proj|o_proj)", "embed_tokens", "lm_head",
                    r"mlp\.(gate|up|down)_proj", "shared_experts"):
        whole = total(single[case]["param_bytes"], pattern)
        for r in ranks:
            assert total(r[case]["param_bytes"], pattern) == whole // WORLD, pattern
    # Replicated: norms, router, the latent projections.
    for pattern in ("norm", r"mlp\.gate\.", "kv_a_proj_with_mqa"):
        for r in ranks:
            assert total(r[case]["param_bytes"], pattern) == total(single[case]["param_bytes"], pattern)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_each_rank_reads_only_its_share(runs, case):
    _, ranks, paths = runs
    infos = read_headers(paths[case])
    expert_bytes = sum(i.nbytes for k, i in infos.items() if ".experts." in k)
    split = re.compile(r"(q_b_proj|q_proj|kv_b_proj|o_proj|mlp\.(gate|up|down)_proj|shared_experts|embed_tokens|lm_head)\.")
    n_experts = tiny_config(**CONFIGS[case]).n_routed_experts
    for rank, r in enumerate(ranks):
        read: dict[str, int] = {}
        for key, nbytes in r[case]["reads"]:
            read[key] = read.get(key, 0) + nbytes
        experts = {int(m[1]) for k in read if (m := re.search(r"\.experts\.(\d+)\.", k))}
        mine = range(rank * n_experts // WORLD, (rank + 1) * n_experts // WORLD)
        assert experts == set(mine)                                   # never the other rank's experts
        assert sum(b for k, b in read.items() if ".experts." in k) == expert_bytes // WORLD
        for key, info in infos.items():
            if split.search(key) and ".experts." not in key and not key.endswith("weight_shape"):
                assert read[key] == info.nbytes // WORLD, key         # its slice, not the whole tensor
            elif ".experts." not in key:
                assert read[key] == info.nbytes, key                  # replicated: read whole, once
        total = sum(read.values())
        assert total < 0.75 * sum(i.nbytes for i in infos.values())


def test_world_size_one_is_the_single_process_path(tmp_path):
    # No process group exists here: a world of one must never touch torch.distributed.
    path = write_random_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3)
    a = ke.load(path, device="cpu", dtype=torch.float32, progress=False, parallel=Parallel(0, 1))
    b = ke.load(path, device="cpu", dtype=torch.float32, progress=False)
    assert a.model.parallel is None
    torch.testing.assert_close(a.logits(PROMPT), b.logits(PROMPT), rtol=0, atol=0)


def test_bad_splits_raise_clearly(tmp_path):
    path = write_random_checkpoint(tmp_path / "heads", tiny_config(num_attention_heads=3))
    with pytest.raises(ke.CheckpointError, match=r"config.json: num_attention_heads=3 is not divisible by world_size=2"):
        check_checkpoint(path, Parallel(0, 2))
    check_checkpoint(path)   # fine in one process

    # All-INT4 with v_head_dim 8: o_proj's 32 inputs split in two are less than one group of 32.
    path = write_random_checkpoint(tmp_path / "int4", tiny_config(quantization_config=ALL_INT4, v_head_dim=8,
                                                                   moe_intermediate_size=64))
    with pytest.raises(ke.CheckpointError, match=r"self_attn\.o_proj: in_features 16 \(this rank's 1/2 of the "
                                                 r"inputs\) is not a multiple of the group size 32"):
        check_checkpoint(path, Parallel(1, 2))

    with pytest.raises(ValueError, match=r"rank=2 must lie in \[0, world_size=2\)"):
        Parallel(2, 2)


def test_rank_layout_keeps_validating_the_whole_checkpoint(tmp_path):
    # Rank 0 never reads expert 7, but a checkpoint without it is still incomplete.
    path = write_random_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3)
    gone = "model.layers.2.mlp.experts.7.down_proj.weight_scale"
    index = json.loads((path / INDEX_FILE).read_text())
    shard = path / index["weight_map"].pop(gone)
    tensors = load_file(shard)
    del tensors[gone]
    save_file(tensors, shard, metadata={"format": "pt"})
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ke.CheckpointError, match="experts.7.down_proj.weight_scale' is missing"):
        check_checkpoint(path, Parallel(0, 2))


def test_parallel_mistakes_fail_before_loading(tmp_path, monkeypatch):
    missing = tmp_path / "not-read"                # the checks come before the checkpoint is opened
    with pytest.raises(ValueError, match="cuda_graphs: tensor/expert-parallel"):
        ke.load(missing, device="cpu", parallel=Parallel(0, 2), cuda_graphs=True)
    monkeypatch.setenv("LOCAL_RANK", "1")         # rank 1 of a node, but the current device is still 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match=r"rank 1 would load onto cuda:0 but LOCAL_RANK=1"):
        ke.load(missing, device="cuda", parallel=Parallel(1, 2))
