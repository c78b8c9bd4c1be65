"""Integer execution on the CPU: prefill speed and memory of W8A8, W4A8 and W4A4 models run with integer GEMM
(qllm_pipeline.export.int_linear.IntLinear, torch._int_mm) against the fp32 model and the fake-quantized one.

For each model and bit width every decoder projection is fused with round-to-nearest codes (per output channel,
asymmetric; activations per token, dynamic, asymmetric); the speed does not depend on how the codes were chosen.
Measured, on one prompt of --tokens tokens (batch 1): prefill tokens/s (best of --repeats), the decoder blocks'
weight memory, and the process's peak RSS while the variant is built and run. On SmolLM2-135M the perplexity of
the integer and the fake-quantized model is also compared on the first --eval-windows evaluation windows of
wiki_sample (512 tokens each), with the fake-quantized model also run in float64: the integer products are exact,
so the spread between the three shows how much float rounding alone moves the perplexity of that model.
Writes benchmarks/results/int_speed.md and .json.

    python benchmarks/int_speed.py                                   # SmolLM2-135M and a random LLaMA (hidden 2048)
    python benchmarks/int_speed.py --models random --hidden 4096 --intermediate 11008 --layers 2
    python benchmarks/int_speed.py --device cuda --models random --out DIR   # CUDA: torch._int_mm's cuBLAS int8 path
    python benchmarks/int_speed.py --packed-model outputs/runs/<run>/quantized_model   # also a model the pipeline
        # wrote with fuse.format=qllm-packed (its own codes and online transforms; timed and checked the same way)
"""
from __future__ import annotations

import copy
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from _cli import CliError, Parser, listed, logger, run_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUANTS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
log = logger("int_speed")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,random", help="comma list of smollm2, random")
    parser.add_argument("--quants", default="w8a8,w4a8,w4a4")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--packed-model", type=Path, help="a fuse.format=qllm-packed model directory to add")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory is then the device's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        raise CliError(f"--device={args.device} must be cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device=cuda but no CUDA device is available")
    args.models = listed("--models", args.models, ("smollm2", "random"), "model")
    args.quants = listed("--quants", args.quants, QUANTS, "bit width")
    for name in ("tokens", "repeats", "eval_windows", "hidden", "intermediate", "heads", "layers"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')}={getattr(args, name)} must be a positive integer")
    if args.packed_model is not None:
        if not (args.packed_model / "qllm_quant.json").is_file():
            raise CliError(f"--packed-model={args.packed_model} is not a fuse.format=qllm-packed model directory (no qllm_quant.json)")
        args.models.append("packed")
    if args.hidden % args.heads:
        raise CliError(f"--hidden={args.hidden} must be a multiple of --heads={args.heads}")
    return args


def best_seconds(fn, repeats: int, device: str = "cpu") -> float:
    def timed():
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()  # warm-up
    return min(timed() for _ in range(repeats))


def block_bytes(model) -> int:
    from qllm_pipeline.quantized.blocks import decoder_layers

    layers = decoder_layers(model)
    return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def fused(model, wbits: int, abits: int):
    """A copy of `model` whose projections are fused W{wbits}A{abits} QuantLinears (RTN codes, fake quantization)."""
    from qllm_pipeline.quantized.blocks import decoder_layers, quantize_block_linears
    from qllm_pipeline.quantized.quantizer import QuantSpec

    out = copy.deepcopy(model)
    for layer in decoder_layers(out):
        for ql in quantize_block_linears(layer, QuantSpec(wbits), QuantSpec(abits)).values():
            ql.fuse()
    return out


def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            ids = windows[start : start + 4]
            logits = model(ids).logits.float()
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def load(name: str, args):
    if name == "smollm2":
        from qllm_pipeline.core.config import group_config
        from qllm_pipeline.model.model_loading import ModelSource, load_model, load_tokenizer

        source = ModelSource.from_config(group_config("model", "smollm2_135m", REPO / "conf"))
        return load_model(source).eval(), load_tokenizer(source), "SmolLM2-135M (hidden 576, intermediate 1536, 30 blocks)"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, num_hidden_layers=args.layers, vocab_size=32000,
                         max_position_embeddings=max(args.tokens, 2048), attn_implementation="sdpa")
    label = f"random LLaMA (hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks)"
    return LlamaForCausalLM(config).eval(), None, label


def run(args) -> dict:
    from qllm_pipeline.core.memory import PeakRSS, release_freed_memory
    from qllm_pipeline.export.int_linear import to_integer_model

    rows = []
    for name in args.models:
        if name == "packed":  # the pipeline's own model: its codes and online transforms, as written
            from transformers import AutoTokenizer

            from qllm_pipeline.export.packed import load_quantized_model

            meta = json.loads((args.packed_model / "qllm_quant.json").read_text())
            quant_name = f"w{meta['quant']['wbits']}a{meta['quant']['abits']}"
            model, tokenizer = load_quantized_model(args.packed_model), AutoTokenizer.from_pretrained(args.packed_model)
            label = f"SmolLM2-135M, pipeline model `{args.packed_model.name}`"
            loaded = lambda: load_quantized_model(args.packed_model).to(args.device)  # noqa: E731
            variants = [("fake quant", quant_name, loaded), ("integer GEMM", quant_name, lambda: to_integer_model(loaded()))]
        else:
            model, tokenizer, label = load(name, args)
            variants = [("fp32", "-", lambda: model)]
            for quant in args.quants:
                wbits, abits = QUANTS[quant]
                variants += [("fake quant", quant, lambda w=wbits, a=abits: fused(model, w, a)),
                             ("integer GEMM", quant, lambda w=wbits, a=abits: to_integer_model(fused(model, w, a)))]
        model.to(args.device)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(args.device)
        windows = None
        if tokenizer is not None:
            from qllm_pipeline.data.corpora import corpus_windows, load_corpus

            windows = corpus_windows(tokenizer, load_corpus("wiki_sample"), 512, args.eval_windows)
            windows = windows.to(args.device)

        def measure(variant: str, quant: str, build):
            release_freed_memory()
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as peak:
                m = build()
                with torch.no_grad():
                    seconds = best_seconds(lambda: m(prompt), args.repeats, args.device)
            row = {"model": label, "quant": quant, "variant": variant, "tokens_per_s": args.tokens / seconds,
                   "block_weight_mib": block_bytes(m) / 2**20, "peak_rss_mib": peak.mib}
            if args.device == "cuda":
                row["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if windows is not None and variant != "fp32":
                row["ppl"] = perplexity(m, windows)
                if variant == "fake quant":  # the same codes in float64: how far float rounding alone moves the ppl
                    row["ppl_fp64"] = perplexity(copy.deepcopy(m).double(), windows)
            log(f"{label} {quant} {variant}: {row['tokens_per_s']:.0f} tok/s, blocks {row['block_weight_mib']:.0f} MiB, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB" + (f", ppl {row['ppl']:.3f}" if "ppl" in row else ""))
            rows.append(row)
            m = None  # drop the variant before the next is built (rebinding, not del: `m` is read by a lambda above)
            gc.collect()

        for variant, quant, build in variants:
            measure(variant, quant, build)
        model = None  # as above: the variants' builders close over `model`
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"command": " ".join(["python benchmarks/int_speed.py", *sys.argv[1:]]),
            "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__, "tokens": args.tokens,
            "repeats": args.repeats, "eval_windows": args.eval_windows, "rows": rows}


def markdown(result: dict) -> str:
    rows = result["rows"]
    on_gpu = any("peak_device_mib" in r for r in rows)
    lines = ["# Integer execution (torch._int_mm)", "",
             f"{result['device']}, fp32, torch {result['torch']}; prefill of one {result['tokens']}-token prompt "
             f"(batch 1), best of {result['repeats']}. Command: `{result.get('command', 'python benchmarks/int_speed.py')}`.", "",
             "| model | quant | variant | prefill tok/s | × fp32 | × fake quant | block weights (MiB) | peak RSS (MiB) | "
             + ("peak device (MiB) | " if on_gpu else "") + "ppl |",
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if on_gpu else "") + "---:|"]
    fp = {r["model"]: r["tokens_per_s"] for r in rows if r["variant"] == "fp32"}
    fake = {(r["model"], r["quant"]): r["tokens_per_s"] for r in rows if r["variant"] == "fake quant"}
    for r in rows:
        vs_fake = f"{r['tokens_per_s'] / fake[(r['model'], r['quant'])]:.2f}" if r["variant"] == "integer GEMM" else ""
        vs_fp = f"{r['tokens_per_s'] / fp[r['model']]:.2f}" if r["model"] in fp else ""
        cells = [r["model"], r["quant"], r["variant"], f"{r['tokens_per_s']:.0f}", vs_fp,
                 vs_fake, f"{r['block_weight_mib']:.0f}", f"{r['peak_rss_mib']:.0f}"]
        if on_gpu:
            cells.append(f"{r.get('peak_device_mib', 0):.0f}")
        cells.append(f"{r['ppl']:.3f}" if "ppl" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    checks = [r for r in rows if "ppl_fp64" in r]
    if checks:
        ppl = {(r["model"], r["quant"], r["variant"]): r["ppl"] for r in rows if "ppl" in r}
        lines += ["", f"Perplexity on the first {result['eval_windows']} wiki_sample evaluation windows (512 tokens), the "
                      "same integer codes computed three ways:", "",
                  "| model | quant | fake quant, fp32 | fake quant, fp64 | integer GEMM | integer vs fp32 fake | integer vs fp64 fake |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in checks:
            integer = ppl[(r["model"], r["quant"], "integer GEMM")]
            lines.append(f"| {r['model']} | {r['quant']} | {r['ppl']:.3f} | {r['ppl_fp64']:.3f} | {integer:.3f} | "
                         f"{(integer / r['ppl'] - 1) * 100:+.2f} % | {(integer / r['ppl_fp64'] - 1) * 100:+.2f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark("int_speed", parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
