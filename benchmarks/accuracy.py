"""Accuracy benchmark: FP, RTN, SmoothQuant, rotation, CRA, LRC, CRA+LRC and rotation+CRA+LRC at several bit widths.

One invocation is one Hydra multirun of the ordinary pipeline (`python -m qllm_pipeline -m quant=... method=...`),
so every method runs through the same quantizers, calibration data and evaluation, in one process (the model is
loaded once). Each run starts from an empty artifact cache (a temporary directory unless --cache is given), so the
stage times are compute times; the FP row is evaluated once, the RTN reference row once per bit width.
Writes benchmarks/results/accuracy.md and .json: ppl, ratio to FP, and wall time and peak RSS of every stage.

    python benchmarks/accuracy.py                         # 3 bit widths × 7 methods (about 40 min on 2 CPU cores)
    python benchmarks/accuracy.py --quants w4a4 --methods rtn,qllm train_lowrank.epochs=4   # any Hydra overrides
    python benchmarks/accuracy.py --tiny --tiny-model-dir DIR   # smoke mode used by the tests (tiny random model)
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# conf/method option -> the row the pipeline reports for it (the name of its final variant)
METHODS = {
    "rtn": "rtn",
    "smoothquant": "smoothquant",
    "rotation": "rotation",
    "cra": "cra",
    "lrc": "lrc",
    "qllm": "cra+lrc",
    "rotation_qllm": "rotation+cra+lrc",
}
# Settings the benchmark runs with unless overridden; everything else is the default job's configuration. They halve
# the three costs that grow with tokens (evaluation windows, θ-search samples, LRC passes) so 21 runs fit in 45 min on
# 2 CPU cores; pass e.g. `eval.max_windows=32 search_theta.n_samples=4 train_lowrank.epochs=2` for the default job's.
# The exported model is not written: the table does not need it.
BENCH_OVERRIDES = [
    "eval.max_windows=16", "search_theta.n_samples=2", "train_lowrank.epochs=1", "fuse.save_model=false", "pipeline.progress=false",
]
TINY_OVERRIDES = [
    "calibrate.n_samples=2", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=4",
    "search_theta.steps=5", "search_theta.n_samples=1", "train_lowrank.epochs=1",
]


def sweep(args, cache: Path, sweep_dir: Path) -> list[dict]:
    cmd = [
        sys.executable, "-m", "qllm_pipeline", "-m", f"quant={','.join(args.quants)}", f"method={','.join(args.methods)}",
        f"model={args.model}", f"pipeline.cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}", *BENCH_OVERRIDES, *args.overrides,
    ]
    print("[accuracy] " + " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"error: the benchmark sweep failed (exit {proc.returncode}); see the log above")
    runs = []
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        results = json.loads(results_file.read_text())
        choice = dict(o.split("=", 1) for o in results["meta"]["overrides"] if o.split("=", 1)[0] in ("quant", "method"))
        runs.append({"dir": results_file.parent, "quant": choice["quant"], "method": choice["method"], "results": results})
    return runs


def rows_from(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        results, method = run["results"], run["method"]
        ppl = next(iter(results["ppl"].values()))
        rows.append({
            "quant": run["quant"],
            "method": METHODS[method],
            "config": f"method={method}",
            "ppl": ppl[METHODS[method]],
            "fp": ppl["fp"],
            "rtn": ppl["rtn"],
            "wall_s": round(results["meta"]["wall_seconds"], 1),
            "stages": {s["stage"]: {"seconds": s["seconds"], "peak_rss_mib": s["peak_rss_mib"]}
                       for s in results["stages"] if s["computed"]},
        })
    return rows


def markdown(rows: list[dict], args, command: str) -> str:
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fp = rows[0]["fp"]
    cell = {(r["method"], r["quant"]): r for r in rows}
    lines = [
        "# Accuracy: perplexity on the held-out wiki_sample articles",
        "",
        f"Model `{args.model}`; cells are ppl (× FP). Command: `{command}`",
        "",
        "Settings on top of the default job's: `" + " ".join([*BENCH_OVERRIDES, *args.overrides]) + "`",
        "",
        "| method | " + " | ".join(quants) + " |",
        "|---|" + "---:|" * len(quants),
        "| fp | " + " | ".join(f"{fp:.2f} (1.00×)" for _ in quants) + " |",
    ]
    for m in methods:
        cells = [f"{cell[m, q]['ppl']:.2f} ({cell[m, q]['ppl'] / fp:.2f}×)" if (m, q) in cell else "-" for q in quants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost of each run: wall time and peak RSS of every stage it computed", "",
              "Stage cells are seconds / peak RSS in MiB (sampled while the stage ran). Wall includes the walk through the",
              "blocks (FP targets, advancing the quantized stream) and writing the run's report.", "",
              "| quant | method | wall (s) | stages: s / MiB |", "|---|---|---:|---|"]
    for r in rows:
        stages = ", ".join(f"{k} {v['seconds']:.0f} s / {v['peak_rss_mib']:.0f}" for k, v in r["stages"].items())
        lines.append(f"| {r['quant']} | {r['method']} | {r['wall_s']:.0f} | {stages} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="w4a4,w4a8,w6a6", help="conf/quant options, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"conf/method options, comma-separated: {','.join(METHODS)}")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, help="artifact cache to use (default: a fresh temporary one, so stages are timed)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the tiny random model in --tiny-model-dir, few windows")
    parser.add_argument("--tiny-model-dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.quants, args.methods = args.quants.split(","), args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}")
    command = " ".join(["python benchmarks/accuracy.py", *sys.argv[1:]])
    if args.tiny:
        if not args.tiny_model_dir:
            raise SystemExit("error: --tiny needs --tiny-model-dir (a saved tiny LLaMA)")
        args.model = "smollm2_135m"
        args.overrides = ["model.name=tiny", f"model.path={args.tiny_model_dir}", "model.package=null", "model.gguf_file=null",
                          "model.hub_id=null", *TINY_OVERRIDES, *args.overrides]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qllm-bench-") as tmp:
        cache = args.cache or Path(tmp) / "cache"
        sweep_dir = args.out / "runs" / ("tiny" if args.tiny else "sweep")
        shutil.rmtree(sweep_dir, ignore_errors=True)  # runs of an earlier invocation must not mix into this table
        started = time.perf_counter()
        runs = sweep(args, cache, sweep_dir)
        total_s = time.perf_counter() - started
    rows = rows_from(runs)
    (args.out / "accuracy.json").write_text(json.dumps({"command": command, "total_wall_s": round(total_s, 1), "rows": rows}, indent=2))
    text = markdown(rows, args, command) + f"\nTotal wall time of the sweep: {total_s / 60:.1f} min.\n"
    (args.out / "accuracy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
