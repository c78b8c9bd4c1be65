"""Run-time cost of the online Hadamard transforms (R4 before down_proj, the optional one before o_proj).

For each projection shape it times, on the CPU, the projection's matmul alone, the online Hadamard applied the fast
way (Kronecker factors, qllm_pipeline.quantized.hadamard.OnlineHadamard) and as a dense n×n matmul, on a batch of tokens; and
a whole decoder block (fake-quantized W4A4) with and without the online transforms. Writes
benchmarks/results/hadamard_cost.md and .json.

    python benchmarks/hadamard_cost.py                 # SmolLM2-135M shapes (hidden 576, intermediate 1536)
    python benchmarks/hadamard_cost.py --hidden 4096 --intermediate 11008 --heads 32 --tokens 512
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one warm-up), in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qllm_pipeline.methods.rotation import add_online_hadamard
    from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
    from qllm_pipeline.quantized.hadamard import OnlineHadamard
    from qllm_pipeline.quantized.qblock import make_quant_block
    from qllm_pipeline.quantized.quantizer import QuantSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    for name in ("hidden", "intermediate", "heads", "kv_heads", "tokens", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    torch.manual_seed(0)
    rows = []
    for name, n_in, n_out in (("down_proj input", args.intermediate, args.hidden), ("o_proj input", args.hidden, args.hidden)):
        x, w = torch.randn(args.tokens, n_in), torch.randn(n_out, n_in)
        h = OnlineHadamard(n_in)
        dense = h.matrix(torch.float32)
        rows.append({
            "point": name, "n": n_in, "tokens": args.tokens,
            "matmul_ms": best_of(lambda: x @ w.T, args.repeats),
            "hadamard_fast_ms": best_of(lambda: h.apply_to_activation(x), args.repeats),
            "hadamard_dense_ms": best_of(lambda: x @ dense, args.repeats),
        })
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, num_hidden_layers=1, vocab_size=128,
                         max_position_embeddings=max(args.tokens, 256), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    seq = min(args.tokens, 512)
    runner = BlockRunner(model, seq, "cpu")
    x = torch.randn(max(1, args.tokens // seq), seq, args.hidden)
    w4, a4 = QuantSpec(4), QuantSpec(4)
    blocks = {"no online transform": make_quant_block(decoder_layers(model)[0], w4, a4)}
    for label, paths in (("R4 (down_proj)", ["mlp.down_proj"]), ("R4 + o_proj", ["mlp.down_proj", "self_attn.o_proj"])):
        rotated = copy.deepcopy(model)
        for path in paths:
            add_online_hadamard(rotated, path)
        blocks[label] = make_quant_block(decoder_layers(rotated)[0], w4, a4)
    block_ms = {}
    with torch.no_grad():
        for label, block in blocks.items():
            block_ms[label] = best_of(lambda b=block: runner(b, x), args.repeats)
    base = block_ms["no online transform"]
    result = {"args": vars(args) | {"out": str(args.out)}, "threads": torch.get_num_threads(), "rows": rows,
              "block_ms": block_ms}
    lines = [
        "# Run-time cost of the online Hadamard transforms",
        "",
        f"CPU, {torch.get_num_threads()} threads, fp32; {args.tokens} tokens; best of {args.repeats}. "
        f"Command: `python benchmarks/hadamard_cost.py{'' if args.hidden == 576 else ' ...'}`",
        "",
        "| transform at | n | projection matmul (ms) | online Hadamard, Kronecker (ms) | as a dense matmul (ms) | Kronecker / matmul |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['point']} | {r['n']} | {r['matmul_ms']:.2f} | {r['hadamard_fast_ms']:.2f} | "
                     f"{r['hadamard_dense_ms']:.2f} | {r['hadamard_fast_ms'] / r['matmul_ms']:.2f} |")
    lines += ["", "Whole W4A4 fake-quant decoder block (hidden {}, intermediate {}):".format(args.hidden, args.intermediate), "",
              "| block | ms | × no transform |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / base:.3f} |" for k, v in block_ms.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hadamard_cost.json").write_text(json.dumps(result, indent=2))
    (args.out / "hadamard_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
