"""End-to-end speed of Kimi K2 Thinking's full-width layers on one GPU, and the projection to 61 layers.

    python benchmarks/bench_e2e.py --layers 5             # 1 dense + 4 MoE layers, ~45 GB: an 80 GB card
    python benchmarks/bench_e2e.py --device cpu --small   # the whole script on a tiny config (a smoke run)

Writes a checkpoint of Kimi K2 Thinking's widths (hidden 7168, 64 heads, MLA ranks 1536/512, 384 INT4
experts of 2048, vocab 163840) with --layers layers of random weights, in the published layout, and
loads it with kimi_engine.load. Then, in one run: prefill tokens/s; decode ms per step (one token for
each of `batch` sequences at `context` cached tokens) eager and through CUDA graphs (DecodeGraphs),
and the graph replay alone (the GPU's share); per-layer decode time, (step - embedding/lm_head time) /
layers, against the layers' byte floor (bytes a step must read / measured copy bandwidth); the
projection to 61 layers on this GPU and on 8 x H200; and HF transformers' DeepseekV3 (eager, bf16
dequantized from the same weights) at batch 1 on as many of the same layers as fit.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kimi_engine as ke  # noqa: E402
from kimi_engine.plan import BANDWIDTH, GB, plan  # noqa: E402
from kimi_engine.synthetic import kimi_k2_config, tiny_config  # noqa: E402

from common import copy_bandwidth_gbs, device_name, markdown_table, sync, time_ms  # noqa: E402
from e2e_parts import (decode_cache, first_layers, graph_decoder, head_floor_bytes, hf_bytes, hf_decode_ms, hf_peer,  # noqa: E402
                       layer_floor_bytes, profile_step, random_checkpoint, rewound, save_plot, timed_ms)

FULL = dict(contexts=[1024, 32768], batches=[1, 8, 32, 128], prompts=[1024, 8192, 32768])
SMALL = dict(contexts=[64, 256], batches=[1, 2, 4], prompts=[64, 128, 256])
H200_RANKS, H200_MEMORY_GB = 8, 141


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="layers to build (default 5; 3 with --small)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths, short contexts (runs on a CPU)")
    ap.add_argument("--contexts", type=ints, default=None, help="decode contexts, e.g. 1024,32768")
    ap.add_argument("--batches", type=ints, default=None, help="decode batch sizes, e.g. 1,8,32,128")
    ap.add_argument("--prompts", type=ints, default=None, help="prefill lengths, e.g. 1024,8192,32768")
    ap.add_argument("--checkpoint", type=Path, default=None, help="write the checkpoint here (kept, reused if present)")
    ap.add_argument("--workdir", default=None, help="where a temporary checkpoint goes (/dev/shm: in memory)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers peer")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-kernel profile of batch-1 steps")
    ap.add_argument("--hf-steps", type=int, default=8)
    ap.add_argument("--plot", default="bench_e2e.png")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = SMALL if args.small else FULL
    contexts, batches, prompts = (getattr(args, k) or sizes[k] for k in ("contexts", "batches", "prompts"))
    layers = args.layers or (3 if args.small else 5)
    config = tiny_config(num_hidden_layers=layers) if args.small else kimi_k2_config(layers)
    full = kimi_k2_config()                              # the 61-layer model the projections are for
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    tmp = None if args.checkpoint else Path(tempfile.mkdtemp(prefix="bench_e2e_", dir=args.workdir))
    path = args.checkpoint or tmp
    if not (path / "config.json").is_file():
        random_checkpoint(path, config, seed=0, device=device)
    written = time.perf_counter()
    engine = ke.load(path, device=device, dtype=dtype, max_seq_len=max(contexts + prompts) + 64,
                     max_batch_size=max(batches), progress=False)
    loaded = time.perf_counter()
    if tmp:
        shutil.rmtree(tmp)
    model, L = engine.model, layers
    bw = copy_bandwidth_gbs(device) * 1e9                 # bytes/s
    vocab = config.vocab_size
    gen = torch.Generator().manual_seed(1)

    # ---- prefill
    def prefill(ids):
        cache = engine.new_cache()
        engine.prefill(cache, cache.add_sequence(), ids)
    prefill(list(range(2, 18)))                           # warm-up: Triton compiles
    prefill_rows = []
    for P in prompts:
        ids = torch.randint(2, vocab, (P,), generator=gen).tolist()
        ms = timed_ms(lambda: prefill(ids), device, reps=3 if P <= 8192 else 1)
        prefill_rows.append([f"{P:,}", f"{ms:,.1f}", f"{P / ms * 1e3:,.0f}"])

    # ---- decode
    kv_token = engine.new_cache().pools.bytes_per_token() / config.num_hidden_layers   # one layer, one token
    blocks = list(model.model.layers)
    dense = [b for b in blocks if not config.is_moe_layer(b.layer)] or blocks[-1:]
    moe = [b for b in blocks if config.is_moe_layer(b.layer)] or blocks[-1:]
    rows, profiles, capture_seconds = [], [], {}
    for ctx in contexts:
        if device.type == "cuda":
            torch.cuda.empty_cache()                      # mem_get_info does not count the allocator's cache
        fits = [B for B in batches if device.type != "cuda"
                or B * ctx * kv_token * L < 0.8 * torch.cuda.mem_get_info(device)[0]]
        if len(fits) < len(batches):
            print(f"skipped batch {sorted(set(batches) - set(fits))} at context {ctx:,}: the KV cache does not fit")
        if not fits:
            continue
        cache, seqs = decode_cache(engine, max(fits), ctx)
        runner = graph_decoder(engine, cache)
        for B in fits:
            tokens = torch.randint(2, vocab, (B,), generator=gen).tolist()
            eager = time_ms(rewound(engine.decode_step, cache, seqs[:B], ctx, tokens), device)
            graphs = time_ms(rewound(runner.step, cache, seqs[:B], ctx, tokens), device)
            if B == batches[0] and ctx == contexts[0] and not args.no_profile:
                for name, step in [("eager", engine.decode_step), ("CUDA graphs", runner.step)]:
                    profiles.append(f"{name}, batch {B}, context {ctx:,}: "
                                    + profile_step(rewound(step, cache, seqs[:B], ctx, tokens), device))
            replay = math.nan
            if runner.use_graphs:
                replay = time_ms(runner.graphs[next(b for b in runner.buckets if b >= B)][0].replay, device)
            tok = torch.randint(2, vocab, (B, 1), generator=gen).to(device)   # gen is a CPU generator
            with torch.inference_mode():
                head = time_ms(lambda: model.lm_head(model.model.norm(model.model.embed_tokens(tok)))[:, -1].float(),
                               device)
            layer_bytes = sum(layer_floor_bytes(b, B, ctx, kv_token) for b in blocks)
            proj_bytes = (full.first_k_dense_replace * layer_floor_bytes(dense[0], B, ctx, kv_token)
                          + (full.num_hidden_layers - full.first_k_dense_replace)
                          * layer_floor_bytes(moe[0], B, ctx, kv_token))
            per_layer = (graphs - head) / L
            ratio = per_layer / (layer_bytes / L / bw * 1e3)
            rows.append(dict(batch=B, context=ctx, eager=eager, graphs=graphs, replay=replay, head=head,
                             per_layer=per_layer, layer_floor=layer_bytes / L / bw * 1e3, ratio=ratio,
                             floor=(layer_bytes + head_floor_bytes(model, B)) / bw * 1e3,
                             here=ratio * proj_bytes / bw * 1e3 + head))
        capture_seconds.update(runner.capture_seconds)
        del cache, seqs, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the peer: HF transformers on the same first layers, batch 1
    peer = None
    if not args.no_hf and importlib.util.find_spec("transformers") and rows:
        ctx = contexts[0]
        budget = 0.8 * torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else math.inf
        hf_layers = max((n for n in range(1, L + 1) if hf_bytes(model, n, dtype) <= budget), default=0)
        if hf_layers:
            with first_layers(model, hf_layers):
                cache, seqs = decode_cache(engine, 1, ctx)
                ours_eager = time_ms(rewound(engine.decode_step, cache, seqs, ctx, [5]), device)
                ours_graphs = time_ms(rewound(graph_decoder(engine, cache).step, cache, seqs, ctx, [5]), device)
            del cache, seqs
            model.to("cpu")                                   # make room: HF holds every expert in bf16
            if device.type == "cuda":
                torch.cuda.empty_cache()
            hf = hf_peer(model, hf_layers, device, dtype)
            peer = (hf_layers, ctx, hf_decode_ms(hf, ctx, vocab, device, args.hf_steps, sync), ours_eager, ours_graphs)
            del hf

    # ---- report
    gpu = "this GPU" if device.type == "cuda" else "this CPU"
    n_moe = sum(config.is_moe_layer(i) for i in range(L))
    print(f"\n## bench_e2e: {device_name(device)}, {dtype}, {L} layers ({L - n_moe} dense + {n_moe} MoE) of "
          f"{'a tiny config' if args.small else 'Kimi K2 Thinking'}; "
          f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    print(f"checkpoint written in {written - start:.1f} s, loaded in {loaded - written:.1f} s\n")
    print(markdown_table(["prefill tokens", "ms", "tokens/s"], prefill_rows), "\n")
    header = ["batch", "context", "eager ms", "graphs ms", "replay ms", "graphs speedup", "floor ms",
              "ms/layer", "floor ms/layer", "layer / floor", f"61 layers, {gpu}: tok/s", "61 layers, 8 x H200: tok/s"]
    table = []
    for r in rows:
        h200 = ""
        if r["batch"] == 1:
            p = plan(full, H200_RANKS, H200_MEMORY_GB, r["context"])
            r["h200"] = sum(p.read_per_token.values()) / BANDWIDTH["H200"] * r["ratio"] * 1e3
            h200 = f"{1e3 / r['h200']:,.0f}"
        table.append([r["batch"], f"{r['context']:,}", f"{r['eager']:.3f}", f"{r['graphs']:.3f}",
                      "—" if math.isnan(r["replay"]) else f"{r['replay']:.3f}",
                      f"{r['eager'] / r['graphs']:.2f}x", f"{r['floor']:.3f}", f"{r['per_layer']:.3f}",
                      f"{r['layer_floor']:.3f}", f"{r['ratio']:.2f}x", f"{r['batch'] * 1e3 / r['here']:,.0f}", h200])
    print(markdown_table(header, table))
    if device.type != "cuda":
        print("- off CUDA the graphs column is DecodeGraphs' static-buffer step run eagerly (nothing is captured)")
    for r in (r for r in rows if r["batch"] == 1):
        p = plan(full, H200_RANKS, H200_MEMORY_GB, r["context"])
        read = sum(p.read_per_token.values())
        print(f"- batch 1, context {r['context']:,}: {gpu}, 61 layers = {r['ratio']:.2f} x (layer floors of "
              f"{full.first_k_dense_replace} dense + {full.num_hidden_layers - full.first_k_dense_replace} MoE) "
              f"+ head {r['head']:.3f} ms = {r['here']:.2f} ms; 8 x H200 = {read / GB:.2f} GB per rank / "
              f"{BANDWIDTH['H200'] / 1e12:.1f} TB/s x {r['ratio']:.2f} = {r['h200']:.2f} ms "
              "(all-reduces not counted)")
    print("- layer / floor is against this device's measured copy bandwidth; the 8 x H200 column applies it "
          "to the 4.8 TB/s spec figure, as `kimi-engine plan` does")
    if capture_seconds:
        print("- CUDA-graph capture, warm-up included: "
              + ", ".join(f"bucket {b}: {sec:.2f} s" for b, sec in sorted(capture_seconds.items())))
    for text in profiles:
        print(f"\nprofile, {text}")
    if peer:
        n, ctx, hf_ms, ours_eager, ours_graphs = peer
        peer_rows = [["HF transformers DeepseekV3, eager", f"{hf_ms:.3f}", "1.00x"],
                     ["kimi-engine, eager", f"{ours_eager:.3f}", f"{hf_ms / ours_eager:.2f}x"],
                     ["kimi-engine, CUDA graphs", f"{ours_graphs:.3f}", f"{hf_ms / ours_graphs:.2f}x"]]
        print("\n" + markdown_table([f"peer: batch 1, context {ctx:,}, first {n} layers", "ms/token", "HF / this"],
                                    peer_rows))
    if save_plot(rows, args.plot, f"decode, {L} layers, {device_name(device)}"):
        print(f"\nplot: {args.plot}")
    else:
        print("\n(matplotlib is not installed: no plot)")
    return rows, peer


if __name__ == "__main__":
    main()
