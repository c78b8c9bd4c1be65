"""tune_e2e streamed block by block against the whole-model path, side by side in one invocation (#25).

The best recipe (`method=rotation_lrc_gptq`) on the embedded model: its blocks are computed once (a run that stops at
fuse fills a cache), then the tune_e2e stage runs in each mode in a process of its own on that cache with
`pipeline.force=[tune_e2e]` (so the FP teacher's states are computed again too), evaluation left out. Reported per
mode: the stage's wall time and peak RSS (sampled while it runs), the KL to the FP model before and after, and the
largest difference of the tuned values between the two modes.

    python benchmarks/e2e_streaming.py                     # SmolLM2, W4A4 (about 15 min on 2 CPU cores)
    python benchmarks/e2e_streaming.py --quant w6a6
    python benchmarks/e2e_streaming.py --tiny --tiny-model-dir DIR --out DIR   # smoke mode used by the tests
Writes benchmarks/results/e2e_streaming.md and .json (--out elsewhere).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import CliError, Parser, code_commit, logger, run_benchmark, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = ("whole", "streamed")
TARGET = 1.5  # the streamed stage's wall time against the whole-model stage's
BLOCKS = "[calibrate,rotate,train_lowrank,fuse]"
TUNED = "[calibrate,rotate,train_lowrank,fuse,tune_e2e]"
TINY = ["calibrate.n_samples=4", "calibrate.seq_len=32", "eval.seq_len=32", "train_lowrank.epochs=1", "tune_e2e.epochs=2"]
log = logger("e2e_streaming")


def parse(argv):
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--quant", default="w4a4", help="a conf/quant option")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the tiny random model in --tiny-model-dir")
    parser.add_argument("--tiny-model-dir", type=Path)
    args = parser.parse_args(argv)
    if not (REPO / "conf" / "quant" / f"{args.quant}.yaml").is_file():
        raise CliError(f"--quant={args.quant} is not in conf/quant")
    if args.tiny and args.tiny_model_dir is None:
        raise CliError("--tiny needs --tiny-model-dir (a saved tiny LLaMA)")
    return args


def pipeline(args, cache: Path, run_dir: Path, *overrides: str) -> dict:
    extra = [*tiny_model(args.tiny_model_dir), *TINY] if args.tiny else []
    cmd = [sys.executable, "-m", "qllm_pipeline", f"model={args.model}", f"quant={args.quant}", "method=rotation_lrc_gptq",
           "fuse.save_model=false", "pipeline.progress=false", f"pipeline.cache_dir={cache}", f"hydra.run.dir={run_dir}",
           *extra, *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the pipeline failed ({' '.join(overrides)}):\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "results.json").read_text())


def run(args) -> dict:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="qllm-e2e-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        log(f"computing the blocks once ({args.quant}, method=rotation_lrc_gptq up to fuse)")
        pipeline(args, cache, work / "blocks", f"pipeline.stages={BLOCKS}")
        rows, tuned = [], {}
        for mode in MODES:
            log(f"tune_e2e.mode={mode}")
            started = time.perf_counter()
            results = pipeline(args, cache, work / mode, f"pipeline.stages={TUNED}", f"tune_e2e.mode={mode}",
                               "pipeline.force=[tune_e2e]")
            stage = next(s for s in results["stages"] if s["stage"] == "tune_e2e")
            artifact = cache / "tune_e2e" / results["meta"]["keys"]["tune_e2e"]
            stats = json.loads((artifact / "stats.json").read_text())
            tuned[mode] = load_file(str(artifact / "tuned.safetensors"))
            rows.append({"mode": mode, "stage_s": stage["seconds"], "stage_peak_rss_mib": stage["peak_rss_mib"],
                         "process_s": round(time.perf_counter() - started, 1), "kl_before": stats["kl_before"],
                         "kl_measured": stats["kl_measured"], "kl_after": stats["kl_after"],
                         "best_epoch": stats["best_epoch"], "keep_blocks": stats["keep_blocks"],
                         "spill_inputs": stats["spill_inputs"]})
            log(f"{mode}: {stage['seconds']:.0f} s, peak RSS {stage['peak_rss_mib']:.0f} MiB, KL {stats['kl_before']:.4f} "
                f"-> {stats['kl_after']:.4f}")
    a, b = tuned["streamed"], tuned["whole"]
    difference = max((float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in b), default=0.0) \
        if a.keys() == b.keys() else float("inf")
    ratio = rows[1]["stage_s"] / rows[0]["stage_s"]
    command = "python benchmarks/e2e_streaming.py" + (f" --quant {args.quant}" if args.quant != "w4a4" else "") \
        + (" --tiny" if args.tiny else "")
    return {"command": command, "model": "tiny" if args.tiny else args.model, "quant": args.quant, "rows": rows,
            "time_ratio": round(ratio, 3), "target": TARGET, "met": ratio <= TARGET,
            "max_relative_difference": difference, "commit": code_commit(), "cpus": os.cpu_count()}


def markdown(result: dict) -> str:
    lines = [f"# tune_e2e streamed block by block vs the whole model ({result['model']}, {result['quant']}, "
             "method=rotation_lrc_gptq)", "",
             f"Command: `{result['command']}` (commit {result['commit']}, {result['cpus']} CPU cores). The blocks are "
             "computed once; then the stage runs in each mode in its own process on that cache "
             "(`pipeline.force=[tune_e2e]`: the FP teacher's states are computed again each time).", "",
             "| tune_e2e.mode | stage wall (s) | stage peak RSS (MiB) | KL before | KL per epoch | kept | fused blocks | "
             "block inputs |", "|---|---:|---:|---:|---|---|---|---|"]
    for r in result["rows"]:
        kept = "untuned" if r["best_epoch"] == 0 else f"epoch {r['best_epoch']}"
        lines.append(f"| {r['mode']} | {r['stage_s']:.0f} | {r['stage_peak_rss_mib']:.0f} | {r['kl_before']:.4f} | "
                     f"{', '.join(f'{k:.4f}' for k in r['kl_measured'])} | {kept} | "
                     f"{'kept in host memory' if r['keep_blocks'] else 'rebuilt per pass'} | "
                     f"{'spilled' if r['spill_inputs'] else 'in memory'} |")
    lines += ["", f"Streamed / whole wall time: **{result['time_ratio']:.2f}×** (target ≤ {result['target']}×: "
              f"{'met' if result['met'] else 'MISSED'}). Largest difference of the tuned values between the modes, "
              f"relative to each tensor's largest value: {result['max_relative_difference']:.2e}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    run_benchmark("e2e_streaming", parse, run, markdown, argv)


if __name__ == "__main__":
    main()
