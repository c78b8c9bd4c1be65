"""Scaling benchmark: cost of search-theta and train-lowrank against hidden size and number of blocks.

Random-weight LLaMA configs of growing size (intermediate = 8/3 · hidden, head dim 64); each configuration runs in
its own subprocess so peak RSS is its own. For every configuration we run, for all blocks in order, exactly what the
stages run: the θ search at the three reassembly points, then low-rank training of the block. The exponent b of
time ∝ size^b is fitted by least squares in log-log space.

    python benchmarks/scaling.py            # defaults: hidden 256..2048, blocks 1..16 (about 10 min on 2 CPU cores)
    python benchmarks/scaling.py --tiny     # smoke mode used by the tests
Writes benchmarks/results/scaling.md and .json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(hidden: int, blocks: int, samples: int, seq_len: int, steps: int, epochs: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    import psutil

    from qllm_pipeline.methods.lowrank import LowRankConfig, train_block
    from qllm_pipeline.methods.theta_search import search_theta
    from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
    from qllm_pipeline.quantized.qblock import make_quant_block
    from qllm_pipeline.quantized.quantizer import QuantSpec
    from qllm_pipeline.quantized.subblock import POINTS, point_inputs, point_loss_fn, point_weights

    baseline_mib = psutil.Process().memory_info().rss / 2**20  # interpreter + torch, before any model exists
    torch.manual_seed(0)
    inter = (hidden * 8 // 3 + 63) // 64 * 64
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, vocab_size=256, max_position_embeddings=seq_len, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    runner = BlockRunner(model, seq_len, "cpu")
    x = torch.randn(samples, seq_len, hidden)
    x[..., :4] *= 30  # outlier channels, as real models have
    spec = QuantSpec(4)
    search_s = train_s = 0.0
    for layer in decoder_layers(model):
        start = time.perf_counter()
        inputs = point_inputs(layer, x[:1], runner)
        for point in POINTS:
            h = inputs[point]
            m = h.abs().flatten(0, -2).amax(0)
            loss_fn = point_loss_fn(layer, point, h, runner, spec, spec)
            search_theta(m, h.flatten(0, -2), point_weights(layer, point), loss_fn, steps, 0.2)
        search_s += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            target = runner(layer, x)
        block = make_quant_block(layer, spec, spec)
        train_block(block, runner, x, target, LowRankConfig(epochs=epochs), "cpu", progress=False)
        train_s += time.perf_counter() - start
        with torch.no_grad():
            x = runner(block, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"hidden": hidden, "blocks": blocks, "intermediate": inter, "params_per_block": sum(p.numel() for p in decoder_layers(model)[0].parameters()),
            "search_theta_s": search_s, "train_lowrank_s": train_s, "peak_rss_mib": peak,
            "added_rss_mib": peak - baseline_mib}


def fit_exponent(xs: list[float], ys: list[float]) -> float:
    import numpy as np

    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="256,512,1024,2048")
    parser.add_argument("--blocks", default="1,2,4,8,16")
    parser.add_argument("--blocks-hidden", type=int, default=512, help="hidden size for the blocks sweep")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one configuration
        hidden, blocks = map(int, args.one.split(","))
        print(json.dumps(measure(hidden, blocks, args.samples, args.seq_len, args.steps, args.epochs)))
        return
    if args.tiny:
        args.hidden, args.blocks, args.blocks_hidden, args.samples, args.seq_len, args.steps, args.epochs = "64,128", "1,2", 64, 2, 32, 5, 1
    configs = [(h, 1) for h in map(int, args.hidden.split(","))] + [(args.blocks_hidden, b) for b in map(int, args.blocks.split(","))]
    rows = []
    for hidden, blocks in dict.fromkeys(configs):
        cmd = [sys.executable, __file__, f"--one={hidden},{blocks}", f"--samples={args.samples}", f"--seq-len={args.seq_len}",
               f"--steps={args.steps}", f"--epochs={args.epochs}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"error: scaling run hidden={hidden} blocks={blocks} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[scaling] hidden={hidden} blocks={blocks}: search {rows[-1]['search_theta_s']:.1f}s, "
              f"train {rows[-1]['train_lowrank_s']:.1f}s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    by_hidden = [r for r in rows if r["blocks"] == 1]
    by_blocks = [r for r in rows if r["hidden"] == args.blocks_hidden]
    fits = {}
    for name, group, key in (("hidden", by_hidden, "hidden"), ("params per block", by_hidden, "params_per_block"), ("blocks", by_blocks, "blocks")):
        if len(group) >= 2:
            xs = [r[key] for r in group]
            fits[name] = {k: fit_exponent(xs, [r[k] for r in group]) for k in ("search_theta_s", "train_lowrank_s", "added_rss_mib")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps({"rows": rows, "exponents": fits, "argv": sys.argv[1:]}, indent=2))
    lines = ["# Scaling of search-theta and train-lowrank", "",
             f"Random LLaMA blocks (head dim 64, intermediate ≈ 8/3·hidden), {args.samples} samples × {args.seq_len} tokens, "
             f"θ grid {args.steps} steps, {args.epochs} LRC epochs, W4A4. Command: `{' '.join(['python benchmarks/scaling.py', *sys.argv[1:]])}`", "",
             "Peak RSS is the whole process; added RSS is the peak minus the process's RSS before the model was built.", "",
             "| hidden | blocks | params/block | search-theta (s) | train-lowrank (s) | peak RSS (MiB) | added RSS (MiB) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['hidden']} | {r['blocks']} | {r['params_per_block']:,} | {r['search_theta_s']:.2f} | {r['train_lowrank_s']:.2f} "
              f"| {r['peak_rss_mib']:.0f} | {r['added_rss_mib']:.0f} |" for r in rows]
    lines += ["", "Fitted exponents b in cost ∝ x^b:", ""]
    lines += [f"- against {name}: search-theta {f['search_theta_s']:.2f}, train-lowrank {f['train_lowrank_s']:.2f}, added RSS {f['added_rss_mib']:.2f}"
              for name, f in fits.items()]
    text = "\n".join(lines) + "\n"
    (args.out / "scaling.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
