"""Accuracy benchmark: every method × bit width on the default model and the shipped corpus, one table.

Each (method, bits) is one ordinary pipeline run (`python -m qllm_pipeline ...`) sharing one artifact cache, so
FP/RTN rows and upstream stages are computed once. Writes benchmarks/results/accuracy.md and .json.

    python benchmarks/accuracy.py                      # defaults below (CPU: tens of minutes)
    python benchmarks/accuracy.py --tiny               # smoke mode used by the tests (tiny random model)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = ["calibrate", "collect_activations"]
# method -> (pipeline stages, extra overrides)
METHODS = {
    "rtn": ([*BASE, "fuse", "evaluate"], []),
    "cra_fixed": ([*BASE, "search_theta", "reassemble", "fuse", "evaluate"], ["search_theta.theta={theta}"]),
    "cra": ([*BASE, "search_theta", "reassemble", "fuse", "evaluate"], []),
    "lrc": ([*BASE, "train_lowrank", "fuse", "evaluate"], []),
    "cra+lrc": ([*BASE, "search_theta", "reassemble", "train_lowrank", "fuse", "evaluate"], []),
}
# The pipeline names its final row after the enabled methods.
ROW = {"rtn": "rtn", "cra_fixed": "cra", "cra": "cra", "lrc": "lrc", "cra+lrc": "cra+lrc"}


def run_one(method: str, quant: str, args, cache: Path, out: Path) -> dict:
    stages, extra = METHODS[method]
    run_dir = out / f"{quant}_{method}"
    cmd = [
        sys.executable, "-m", "qllm_pipeline", f"quant={quant}", f"pipeline.stages=[{','.join(stages)}]",
        f"pipeline.cache_dir={cache}", f"hydra.run.dir={run_dir}", "pipeline.progress=false",
        *[e.format(theta=args.fixed_theta) for e in extra], *args.overrides,
    ]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:])} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    ppl = next(iter(results["ppl"].values()))
    stages_by_name = {s["stage"]: s for s in results["stages"]}
    return {
        "method": method,
        "quant": quant,
        "ppl": ppl[ROW[method]],
        "fp": ppl["fp"],
        "wall_s": round(time.perf_counter() - started, 1),
        "stage_seconds": {k: v["seconds"] for k, v in stages_by_name.items() if v["computed"]},
        "peak_rss_mib": results["meta"]["peak_rss_mib"],
        "command": "python -m qllm_pipeline " + " ".join(cmd[3:]),
    }


def markdown(rows: list[dict], args) -> str:
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fp = rows[0]["fp"]
    cell = {(r["method"], r["quant"]): r for r in rows}
    lines = [
        "# Accuracy: perplexity on the held-out wiki_sample articles",
        "",
        f"Model `{args.model}`, FP perplexity **{fp:.3f}**. Cells: ppl (× FP). Command: `python benchmarks/accuracy.py "
        + " ".join(sys.argv[1:]) + "`",
        "",
        "| method | " + " | ".join(quants) + " |",
        "|---|" + "---:|" * len(quants),
    ]
    for m in methods:
        cells = [f"{cell[m, q]['ppl']:.2f} ({cell[m, q]['ppl'] / fp:.2f}×)" if (m, q) in cell else "-" for q in quants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost of each run (stages computed in that run; shared stages come from the cache)", "",
              "| quant | method | wall (s) | stages computed (s) | peak RSS (MiB) |", "|---|---|---:|---|---:|"]
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
        lines.append(f"| {r['quant']} | {r['method']} | {r['wall_s']:.0f} | {stages} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", default="w4a4,w4a8,w6a6,w8a8")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--fixed-theta", default="{qkv:2.0,gate_up:1.5,down:15.0}",
        help="θ for the cra_fixed method: a float for every point or a Hydra map per point",
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, default=REPO / "outputs" / "cache")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny random model given by --tiny-model-dir")
    parser.add_argument("--tiny-model-dir", type=Path)
    parser.add_argument("--merge", type=Path, help="an earlier accuracy.json whose rows are kept where this run has none")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.overrides = [f"model={args.model}", *args.overrides]
    if args.tiny:
        if not args.tiny_model_dir:
            raise SystemExit("error: --tiny needs --tiny-model-dir (a saved tiny LLaMA)")
        args.model = "tiny"
        args.overrides += [
            "model.name=tiny", f"model.path={args.tiny_model_dir}", "model.package=null", "model.gguf_file=null",
            "calibrate.n_samples=2", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=4",
            "search_theta.steps=5", "search_theta.n_samples=1", "train_lowrank.epochs=1",
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    quants, methods = args.quants.split(","), args.methods.split(",")
    for quant in quants:
        for method in methods:
            if quant == "w8a8" and method != "rtn":
                continue  # 8-bit is near-lossless with RTN already; keep the run short
            print(f"[accuracy] {quant} {method} ...", flush=True)
            rows.append(run_one(method, quant, args, args.cache, args.out / "runs"))
            print(f"[accuracy] {quant} {method}: ppl {rows[-1]['ppl']:.3f} in {rows[-1]['wall_s']:.0f}s", flush=True)
    sources = [{"argv": sys.argv[1:]}]
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        mine = {(r["quant"], r["method"]) for r in rows}
        kept = [r for r in earlier["rows"] if (r["quant"], r["method"]) not in mine]
        rows = sorted(rows + kept, key=lambda r: (quants.index(r["quant"]) if r["quant"] in quants else len(quants) + 1, r["quant"],
                                                 list(METHODS).index(r["method"])))
        sources.append({"argv": earlier.get("argv", []), "rows_kept": [[r["quant"], r["method"]] for r in kept]})
    (args.out / "accuracy.json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:], "sources": sources}, indent=2))
    text = markdown(rows, args)
    if args.merge:
        text += (f"\nRows not run by this command come from `{args.merge}` (command: `python benchmarks/accuracy.py "
                 + " ".join(json.loads(args.merge.read_text()).get("argv", [])) + "`): " + ", ".join(f"{q} {m}" for q, m in sources[1]["rows_kept"]) + ".\n")
    (args.out / "accuracy.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
