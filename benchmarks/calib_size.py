"""Calibration size: how the number (and length) of calibration windows trades cost for accuracy (the QLLM paper's
first open question), for the default job's method and the best recipe at W4A4.

One run of the ordinary pipeline per method, length and size (`calibrate.n_samples`, `calibrate.seq_len`), all in one
artifact cache, so the FP and RTN rows are computed once; the results are written after every run. Each run is
evaluated on the evaluation windows (wiki_sample 32 × 512, with the paired 95 % interval of its ratio to FP). Reports perplexity, wall time and
peak RSS per size, and a plot (ratio to FP against the number of calibration tokens). Writes
benchmarks/results/calib_size.{json,md,png} (or --out DIR), keeping rows of sizes not re-run.

    python benchmarks/calib_size.py --methods qllm --sizes 8,16,32,64,128
    python benchmarks/calib_size.py --methods rotation_lrc_gptq --sizes 8,16,32 --seq-lens 512,2048
    python benchmarks/calib_size.py --tiny --tiny-model-dir DIR --out DIR --sizes 2,4   # smoke mode (the tests)

Published anchors, for comparison: QLLM (Table F, error correction alone, LLaMA-1-7B W4A4, WikiText2): 128 / 256 /
512 samples -> 16.64 / 14.94 / 12.35; DuQuant (Table E19, LLaMA-2-7B W4A4): flat from 16 to 256 samples.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _cli import (  # noqa: E402
    CliError,
    Parser,
    add_run_options,
    code_commit,
    logger,
    merged_rows,
    own_variant,
    run_benchmark,
    tiny_model,
    write_atomic,
)
from qllm_pipeline.core.config import CalibrateConfig  # noqa: E402
from qllm_pipeline.evaluation.intervals import difference_interval, verdict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZE = CalibrateConfig().n_samples  # the default job's number of calibration windows
DEFAULT_SEQ_LEN = CalibrateConfig().seq_len  # and their length
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
DATASET = "wiki_sample"
TINY = ["eval.seq_len=32", "eval.max_windows=4", "search_theta.steps=5", "search_theta.n_samples=1", "train_lowrank.epochs=1",
        "tune_e2e.epochs=1"]
ANCHORS = [
    "QLLM (arXiv 2310.08041, Table F; error correction alone, LLaMA-1-7B W4A4, WikiText2): 128 / 256 / 512 samples "
    "give 16.64 / 14.94 / 12.35.",
    "DuQuant (Table E19; LLaMA-2-7B W4A4): flat from 16 to 256 samples.",
]
log = logger("calib_size")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="qllm,rotation_lrc_gptq", help="conf/method options, comma-separated")
    parser.add_argument("--sizes", default="8,16,32,64,128", help="calibrate.n_samples values, comma-separated")
    parser.add_argument("--seq-lens", default="512", help="calibrate.seq_len values, comma-separated")
    parser.add_argument("--quant", default="w4a4")
    add_run_options(parser, REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if not args.methods or unknown:
        raise CliError(f"--methods: unknown or none {unknown}; choose from {', '.join(METHODS)}")
    args.sizes, args.seq_lens = positive_ints("--sizes", args.sizes), positive_ints("--seq-lens", args.seq_lens)
    if not (REPO / "conf" / "quant" / f"{args.quant}.yaml").is_file():
        raise CliError(f"--quant={args.quant} is not a conf/quant option")
    if args.tiny and not (args.tiny_model_dir and (args.tiny_model_dir / "config.json").is_file()):
        raise CliError("--tiny needs --tiny-model-dir, a saved tiny LLaMA (a directory with config.json)")
    return args


def positive_ints(option: str, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise CliError(f"{option}={value!r} must be comma-separated positive integers") from None
    if not items or min(items) < 1 or len(set(items)) != len(items):
        raise CliError(f"{option}={value!r} must be distinct positive integers")
    return items


def run_one(args, method: str, seq_len: int, n: int, cache: Path, run_dir: Path) -> dict:
    """One pipeline run at `n` calibration windows of `seq_len` tokens; its row."""
    model = [*tiny_model(args.tiny_model_dir), *TINY] if args.tiny else []
    cmd = [sys.executable, "-m", "qllm_pipeline", f"method={method}", f"quant={args.quant}", *model,
           f"calibrate.seq_len={seq_len}", f"calibrate.n_samples={n}", f"eval.datasets=[{DATASET}]",
           "fuse.save_model=false", "pipeline.progress=false", f"pipeline.cache_dir={cache}",
           f"hydra.run.dir={run_dir}"]
    log(" ".join(cmd[2:]))
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise SystemExit(f"error: the run of {method} at {n} × {seq_len} failed; see the log above (the rows of the "
                         "sizes before it are written)")
    return row_from_results(json.loads((run_dir / "results.json").read_text()), method, seq_len, code_commit())


def row_from_results(results: dict, method: str, seq_len: int, commit: str) -> dict:
    """A calib_size row from one run's results.json: its most complete variant against FP on DATASET."""
    n = int(dict(o.split("=", 1) for o in results["meta"]["overrides"])["calibrate.n_samples"])
    ppl, ci = results["ppl"][DATASET], results["ppl_ci"][DATASET]
    label = own_variant(ppl)
    return {"method": method, "variant": label, "n_samples": n, "seq_len": seq_len, "tokens": n * seq_len,
            "ppl": ppl[label], "fp": ppl["fp"], "ratio": ppl[label] / ppl["fp"], "ci_low": ci[label][0],
            "ci_high": ci[label][1], "windows": results["windows"][DATASET],
            "wall_s": round(results["meta"]["wall_seconds"], 1), "peak_rss_mib": round(results["meta"]["peak_rss_mib"]),
            "stages_s": {s["stage"]: round(s["seconds"], 1) for s in results["stages"] if s["computed"]},
            "window_nll": results["window_nll"][DATASET][label], "commit": commit}


def merged(args, rows: list[dict]) -> dict:
    """`rows` beside the rows already in <out>/calib_size.json of the sizes, lengths and methods not re-run."""
    head = {"model": "tiny" if args.tiny else "smollm2_135m", "quant": args.quant}
    rows = merged_rows(args.out / "calib_size.json", rows, head,
                       key=lambda r: (r["method"], r["seq_len"], r["n_samples"]))
    return {**head, "dataset": DATASET, "rows": rows}


def write(args, result: dict) -> None:
    """The json, markdown and plot, each replaced whole (a stopped run leaves the rows of its finished sizes)."""
    write_atomic(args.out / "calib_size.json", json.dumps(result, indent=2))
    write_atomic(args.out / "calib_size.md", markdown(result))
    plot(result, args.out / "calib_size.png")


def run(args) -> dict:
    """One run per method, length and size, smallest first, all on one artifact cache (FP and RTN once); the
    results are written after every run, so a long study stopped part-way keeps what it measured."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="qllm-calib-size-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        for method in args.methods:
            for seq_len in args.seq_lens:
                for n in sorted(args.sizes):
                    rows.append(run_one(args, method, seq_len, n, cache, Path(tmp) / f"{method}_{seq_len}_{n}"))
                    write(args, merged(args, rows))
    return merged(args, rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (method, seq_len) in dict.fromkeys((r["method"], r["seq_len"]) for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == method and r["seq_len"] == seq_len]
        x = [r["tokens"] for r in rows]
        y = [r["ratio"] for r in rows]
        err = [[r["ratio"] - r["ci_low"] for r in rows], [r["ci_high"] - r["ratio"] for r in rows]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{rows[0]['variant']} (windows of {seq_len})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration tokens (windows × length)")
    ax.set_ylabel(f"perplexity / FP on {result['dataset']} (95 % CI)")
    ax.set_title(f"{result['model']} {result['quant']}: calibration size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# Calibration size: {result['model']} {result['quant']}", "",
             f"Evaluation: {result['dataset']} (the pipeline's windows; interval: 95 % paired bootstrap of the ratio to "
             "FP over the windows). Command: `python benchmarks/calib_size.py --methods ... --sizes ...`; the plot is "
             "`calib_size.png`.", "",
             "quantize (s): the stages computed for that size other than evaluate (the first size of a method also "
             "computes what later sizes share); wall (s): the whole run, evaluation included.", "",
             f"ppl − default: the 95 % paired interval of the difference to the same method at the default job's "
             f"{DEFAULT_SIZE} × {DEFAULT_SEQ_LEN} calibration windows, for every length, on the same evaluation windows "
             "(below zero: better than the default calibration).", "",
             "| method | windows × length | tokens | ppl | × FP (95 % CI) | ppl − default (95 % paired) | quantize (s) | "
             "wall (s) | peak RSS (MiB) | commit |",
             "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['n_samples']} × {r['seq_len']} | {r['tokens']} | {r['ppl']:.3f} | "
                     f"{r['ratio']:.3f} ({r['ci_low']:.3f}–{r['ci_high']:.3f}) | {against_default(r, result['rows'])} | "
                     f"{quantize_seconds(r):.0f} | {r['wall_s']:.0f} | {r['peak_rss_mib']} | {r['commit']} |")
    lines += ["", "Published anchors:", "", *[f"* {a}" for a in ANCHORS]]
    return "\n".join(lines) + "\n"


def against_default(row: dict, rows: list[dict]) -> str:
    """The paired interval of ppl(row) − ppl(the same method at the default job's DEFAULT_SIZE × DEFAULT_SEQ_LEN
    windows): longer windows are compared with the default calibration too, so 4 × 2048 stands beside 16 × 512."""
    base = next((r for r in rows if (r["method"], r["seq_len"], r["n_samples"]) == (row["method"], DEFAULT_SEQ_LEN,
                                                                                   DEFAULT_SIZE)), None)
    if base is None or base is row or not row.get("window_nll") or not base.get("window_nll"):
        return "-"
    low, high = difference_interval(row["window_nll"], base["window_nll"], row["windows"]["seq_len"] - 1)
    return f"{low:+.2f} to {high:+.2f} ({verdict(low, high).replace('lead', 'better').replace('behind', 'worse')})"


def quantize_seconds(row: dict) -> float:
    return sum(t for stage, t in row["stages_s"].items() if stage != "evaluate")


def main(argv=None) -> None:
    # run() has written json, markdown and plot after every size, its last included: nothing is left to write
    run_benchmark("calib_size", parse_args, run, markdown, argv, write=lambda args, result: None)


if __name__ == "__main__":
    main()
