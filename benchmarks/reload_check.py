"""The checkpoints of our main recipes on SmolLM2-135M reloaded by stock transformers (with the shipped
modeling_qllm.py where the method has run-time parts), in a fresh process that imports nothing of ours
(tests/ct_reload.py), against the pipeline's perplexity on the same evaluation windows (wiki_sample 32 × 512).

The test suite checks every method's round trip on tiny random models, whose near-uniform outputs hide small
differences; this measures it where the perplexity is sensitive. Writes benchmarks/results/reload_check.md and .json.

    python benchmarks/reload_check.py [--cases default_job,best_w4a4,...] [--cache DIR]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from vllm_check import evaluation_windows, reloaded_by_transformers, run_pipeline  # noqa: E402

from _cli import Parser, listed, logger, run_benchmark  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# case -> (overrides, the results row it is compared with)
CASES = {
    "default_job": ([], "cra+lrc"),  # python -m qllm_pipeline: W4A4 QLLM
    "best_w4a4": (["method=rotation_lrc_gptq"], "rotation+lrc+e2e+gptq"),
    "quarot_w4a4": (["method=quarot"], "rotation+gptq"),
    # stock checkpoints: compressed-tensors quantizes the activations itself
    "rtn_w8a8": (["method=rtn", "quant=w8a8"], "rtn"),
    "gptq_w8a8": (["method=gptq", "quant=w8a8"], "gptq"),
    "smoothquant_w8a8": (["method=smoothquant", "quant=w8a8"], "smoothquant"),
    "rtn_w4a8": (["method=rtn", "quant=w4a8"], "rtn"),
    # symmetric activations: compressed-tensors divides a token's max by 2^(b-1) - 0.5, we (and vLLM) by 2^(b-1) - 1
    "rtn_w8a8_sym": (["method=rtn", "quant=w8a8", "quant.w_symmetric=true", "quant.a_symmetric=true"], "rtn"),
}
log = logger("reload_check")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, help="the pipeline's cache directory (default: a fresh one)")
    parser.add_argument("--export-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="fuse.export_dtype of the checkpoints (default float32: the exact round trip; the "
                             "pipeline's default float16 reloads within a rounding band)")
    args = parser.parse_args(argv)
    args.cases = listed("--cases", args.cases, CASES, "case")
    return args


def run(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        windows = None
        for case in args.cases:
            log(f"{case}: running the pipeline")
            start = time.perf_counter()
            overrides = [*CASES[case][0], f"fuse.export_dtype={args.export_dtype}"]
            results = run_pipeline(case, work / case, args.cache or work / "cache", [], overrides)
            model_dir = work / case / "quantized_model"
            windows = windows or evaluation_windows(model_dir, "wiki_sample", 512, 32, work / "windows.pt")
            ppl = results["ppl"]["wiki_sample"]
            row = {"case": case, "overrides": CASES[case][0], "fp": ppl["fp"], "pipeline": ppl[CASES[case][1]],
                   "remote_code": (model_dir / "modeling_qllm.py").is_file(),
                   "transformers": reloaded_by_transformers(model_dir, windows), "seconds": 0.0,
                   "checkpoint_bytes": results["checkpoint"]["checkpoint_bytes"], "fp16_bytes": results["checkpoint"]["fp16_bytes"]}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            log(f"{case}: pipeline {row['pipeline']:.4f}, reloaded {row['transformers']:.4f}")
    return {"model": "SmolLM2-135M-Instruct", "windows": "wiki_sample 32 × 512", "export_dtype": args.export_dtype,
            "rows": rows}


def markdown(result: dict) -> str:
    cases = ",".join(r["case"] for r in result["rows"])
    dtype = result.get("export_dtype", "float32")
    lines = ["# Checkpoints reloaded by stock transformers", "",
             f"{result['model']}, {result['windows']} tokens, the pipeline in float32, the checkpoints written with "
             f"`fuse.export_dtype={dtype}` and reloaded (in that dtype) in a fresh process by `tests/ct_reload.py`. "
             f"Command: `python benchmarks/reload_check.py --cases {cases} --export-dtype {dtype}`.", "",
             "| case | overrides | modeling_qllm.py | FP ppl | pipeline ppl | reloaded ppl | reloaded vs pipeline | "
             "checkpoint MB | × FP16 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        size = (f"{r['checkpoint_bytes'] / 1e6:.1f} | {r['checkpoint_bytes'] / r['fp16_bytes']:.3f}"
                if "checkpoint_bytes" in r else "| ")  # rows measured before sizes were recorded
        lines.append(f"| {r['case']} | `{' '.join(r['overrides']) or '(defaults)'}` | {'yes' if r['remote_code'] else 'no'} | "
                     f"{r['fp']:.4f} | {r['pipeline']:.4f} | {r['transformers']:.4f} | "
                     f"{(r['transformers'] / r['pipeline'] - 1) * 100:+.3f} % | {size} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    # float32 (the exact round trip) is the main table; another dtype gets its own files
    run_benchmark(lambda args: "reload_check" + ("" if args.export_dtype == "float32" else f"_{args.export_dtype}"),
                  parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
