"""The built-in demo model (kimi_engine/demo/, written by scripts/train_demo.py) loads without a path,
scores the held-out text as the training script recorded, and writes text."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kimi_engine
from kimi_engine import ModelConfig
from kimi_engine.chat import builtin_chat_template, parse_assistant
from kimi_engine.config import read_generation_config
from kimi_engine.demo import DEMO_DIR, demo_path

from .tokenizer_helpers import KIMI_SPECIALS

REPO = Path(__file__).resolve().parents[1]
MAX_PACKAGE_BYTES = 20 * 2**20
# The recorded loss is a float32 sum over ~500 tokens; another CPU's kernels change it by ~1e-6. A loader
# or format slip (a wrong scale, expert, rope table or token id) moves it by far more than this.
LOSS_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DEMO_DIR / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def engine32():
    return kimi_engine.load(demo_path(), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def engine_default():
    return kimi_engine.load(progress=False, device="cpu")   # no path, the defaults (bf16)


def scoring_windows(ids: list[int], length: int) -> torch.Tensor:
    """Non-overlapping windows [N, length + 1], as scripts/train_demo.py scores held-out text."""
    ids = torch.tensor(ids)
    return torch.stack([ids[i * length: i * length + length + 1] for i in range((len(ids) - 1) // length)])


def test_load_without_path_is_the_demo(engine_default):
    engine = engine_default
    c = engine.config
    assert (c.first_k_dense_replace, c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts) == (1, 16, 2, 1)
    assert c.q_lora_rank and c.kv_lora_rank and c.rope_scaling["type"] == "yarn" and c.topk_method == "noaux_tc"
    assert c.quant is not None and c.quant.group_size == 32
    experts = engine.model.model.layers[1].mlp.experts
    assert experts.int4 and not engine.model.model.layers[1].mlp.shared_experts.down_proj.int4
    assert engine.tokenizer.eos_token_id == c.eos_token_id == engine.tokenizer.special_tokens["<|im_end|>"]


def test_demo_tokenizer_is_in_kimis_format(engine32):
    tok = engine32.tokenizer
    base = tok.vocab_size - 256
    assert tok.vocab_size == engine32.config.vocab_size
    assert {name: tok.special_tokens[name] - base for name in KIMI_SPECIALS.values()} == \
           {name: offset for offset, name in KIMI_SPECIALS.items()}
    assert tok.bos_token_id == engine32.config.bos_token_id == base
    assert tok.chat_template == builtin_chat_template()


def test_held_out_loss_matches_the_recorded_value(engine32, metrics):
    s = metrics["test_slice"]
    wins = scoring_windows(engine32.tokenizer.encode(s["text"]), s["window"])
    assert wins.shape[0] * s["window"] + 1 == s["num_tokens"]
    with torch.no_grad():
        logits = engine32.model(wins[:, :-1]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), wins[:, 1:].flatten()).item()
    assert abs(loss - s["loss_float32"]) < LOSS_TOLERANCE
    # The recorded numbers meet the bar: INT4 within 5% of bf16 perplexity, far below unigram.
    assert metrics["int4_ppl_vs_bf16"] < 0.05
    assert metrics["int4"]["loss"] < metrics["unigram"]["loss"] - 1.0
    assert min(min(layer) for layer in metrics["expert_load"]) > 0


def test_generation_config_recommends_sampling():
    """The demo ships temperature 1.0 / top_p 0.95 (Moonshot's recommendation for K2 Thinking), and the
    file is exactly what scripts/train_demo.py writes."""
    assert read_generation_config(DEMO_DIR) == {"temperature": 1.0, "top_p": 0.95}
    spec = importlib.util.spec_from_file_location("train_demo", REPO / "scripts" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    written = json.dumps(train_demo.generation_config(ModelConfig.from_json(DEMO_DIR)), indent=2) + "\n"
    assert written == (DEMO_DIR / "generation_config.json").read_text(encoding="utf-8")


def test_recommended_temperature_is_calibrated(engine32, metrics):
    """Held-out loss with the logits divided by a temperature is lowest near the recommended 1.0
    (measured on the test slice: 3.971 at 0.8, 3.892 at 1.0, 4.010 at 1.2): 1.0 samples the text's own
    distribution as well as the model knows it; a miscalibrated export would move the minimum."""
    s = metrics["test_slice"]
    wins = scoring_windows(engine32.tokenizer.encode(s["text"]), s["window"])
    with torch.no_grad():
        logits = engine32.model(wins[:, :-1]).float().flatten(0, 1)
    recommended = read_generation_config(DEMO_DIR)["temperature"]
    loss = {t: F.cross_entropy(logits / t, wins[:, 1:].flatten()).item() for t in (0.8, recommended, 1.2)}
    assert loss[recommended] < min(loss[0.8], loss[1.2]), loss


def test_cached_prefill_matches_the_scoring_path(engine32, metrics):
    ids = engine32.tokenizer.encode(metrics["test_slice"]["text"])[:128]
    with torch.no_grad():
        expected = engine32.model(torch.tensor([ids]))[0].float()
    torch.testing.assert_close(engine32.logits(ids), expected, atol=2e-4, rtol=1e-4)   # float32, other op order


def test_greedy_writes_text(engine_default):
    engine = engine_default
    tok = engine.tokenizer
    out = engine.greedy(tok.encode("ROMEO:"), 64)
    text = tok.decode(out)
    words = re.findall(r"[A-Za-z']+", text)
    assert len(out) == 64 and max(out) < tok.vocab_size - 256, text     # no special tokens in plain text
    assert len(set(out)) >= 16 and Counter(out).most_common(1)[0][1] <= 16, text
    assert len(words) >= 20 and len(set(words)) >= 12, text


def test_chat_reply_ends_its_turn(engine32):
    tok = engine32.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Good morrow, my lord. What news?"}],
                                     add_generation_prompt=True)
    out = engine32.greedy(prompt, 160)
    assert out[-1] == tok.eos_token_id
    reply = parse_assistant(tok.decode(out))
    assert reply["content"].strip() and reply["reasoning_content"].strip()


def test_demo_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = pyproject["tool"]["setuptools"]
    assert "kimi_engine.demo" in setuptools["packages"]
    patterns = setuptools["package-data"]["kimi_engine.demo"]
    files = [f for f in DEMO_DIR.iterdir() if f.is_file() and f.suffix != ".py"]
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json", "metrics.json"} <= {f.name for f in files}
    assert all(any(f.match(p) for p in patterns) for f in files), [f.name for f in files]
    assert sum(f.stat().st_size for f in files) <= MAX_PACKAGE_BYTES
