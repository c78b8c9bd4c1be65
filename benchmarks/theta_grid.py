"""θ-grid benchmark: how the θ-search grid (search_theta.spacing × search_theta.steps) affects channel reassembly.

Runs the ordinary pipeline once per grid (one `python -m qllm_pipeline` process each) with channel reassembly alone
(`method=cra quant=w4a4`: RTN weights, so only the grid differs between the runs) at the default job's other
settings (calibrate 16 × 512, search_theta.n_samples=4, channel_ratio from quant), and evaluates every run on two
datasets:

* `calib_heldout`: held-out windows of the *calibration* split. The grid is to be chosen by this one.
* `wiki_sample`: the evaluation windows. Reported only, never used to choose.

Grids (`spacing/steps`, `null` = the QLLM reference size max(100, max|x|/0.5)):

    linear/100   today's default
    linear/null  the QLLM reference grid
    log/100      geometric spacing from the largest channel max, 100 steps
    log/null     geometric spacing, reference size

Per grid it records the perplexities (with the FP and RTN rows), the search_theta stage time (results.json "stages"),
and from the run's search_theta artifacts (`<cache>/search_theta/<key>/theta.json`, one per block; the per-block keys
are rebuilt with the runner's own key function from the run's config and checked against the run's final fused key):
the summed chosen loss relative to the summed no-reassembly baseline loss per reassembly point, and the details of one
point (default: block 11's down_proj input, whose largest channel max is |x| ≈ 2500): chosen θ, loss, baseline loss,
number of grid points.

    python benchmarks/theta_grid.py                                   # the four grids (about 5-10 min each, 2 CPU cores)
    python benchmarks/theta_grid.py --grids linear/100,log/100 eval.max_windows=16   # any Hydra overrides pass through
    python benchmarks/theta_grid.py --tiny --tiny-model-dir DIR       # smoke mode used by the tests (tiny random model)

All grids share one artifact cache (calibrate and block 0's collect_activations are the same for every grid, and so are
the FP and RTN evaluations), a fresh one per invocation under <out>/runs/theta_grid/ unless --cache is given. Writes
<out>/theta_grid.md and <out>/theta_grid.json after every grid, so a killed invocation keeps its finished grids.
Bad command-line input ends with one `error: ...` line and exit code 2; a failed grid run exits 1 after the others ran.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from theta_grid_report import CHOOSE_BY, POINTS, REPORTED, f, machine, write  # noqa: E402

from _cli import TINY_WINDOWS, CliError, Parser, logger, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPACINGS = ("linear", "log")  # qllm_pipeline.methods.theta_search.GRID_SPACINGS (not imported: --help stays fast)
DEFAULT_GRIDS = "linear/100,linear/null,log/100,log/null"
# The benchmark's own settings; everything else is the default job's configuration. The exported model is not written
# (nothing here reads it; it changes no number).
BENCH_OVERRIDES = [
    "method=cra", "quant=w4a4", f"eval.datasets=[{CHOOSE_BY},{REPORTED}]", "pipeline.progress=false", "fuse.save_model=false",
]
# Keys the benchmark sets itself: overriding them would silently break what the table claims.
CONTROLLED = {
    "search_theta.steps": "use --grids", "search_theta.spacing": "use --grids", "pipeline.cache_dir": "use --cache",
    "hydra.run.dir": "the benchmark sets it", "hydra.sweep.dir": "the benchmark runs no multirun",
    "search_theta.theta": "a fixed θ searches no grid", "search_theta.enabled": "the benchmark compares θ searches",
}
RUNS_NAME = "theta_grid"


log = logger("theta_grid")


# ---------------------------------------------------------------------------------------------------------------- CLI
def parse_grid(text: str) -> dict:
    spacing, sep, steps = text.partition("/")
    if not sep or spacing not in SPACINGS:
        raise CliError(f"--grids entry {text!r} must be SPACING/STEPS with SPACING one of {list(SPACINGS)}, e.g. log/100")
    if steps.lower() in ("null", "none"):
        return {"grid": f"{spacing}/null", "spacing": spacing, "steps": None}
    if not steps.isdigit() or int(steps) < 1:
        raise CliError(f"--grids entry {text!r}: STEPS must be a positive integer or null (the reference size)")
    return {"grid": f"{spacing}/{int(steps)}", "spacing": spacing, "steps": int(steps)}


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Later overrides of the same key replace earlier ones (Hydra refuses a group chosen twice)."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            merged.pop(override_key(o), None)
            merged[override_key(o)] = o
    return list(merged.values())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default=DEFAULT_GRIDS, help=f"comma-separated SPACING/STEPS (STEPS: int or null); default {DEFAULT_GRIDS}")
    p.add_argument("--model", default="smollm2_135m", help="conf/model option")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="directory for theta_grid.md/.json")
    p.add_argument("--cache", type=Path,
                   help="artifact cache to use as it is (default: a fresh one under <out>/runs/theta_grid/, so stages are timed)")
    p.add_argument("--detail-block", type=int, default=11, help="block whose reassembly point is detailed (default 11; "
                   "the last block if the model has fewer)")
    p.add_argument("--detail-point", default="down", help=f"reassembly point detailed: {', '.join(POINTS)} (default down)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: the tiny random model in --tiny-model-dir, few windows")
    p.add_argument("--tiny-model-dir", type=Path)
    p.add_argument("--timeout", type=int, default=3 * 3600, help="seconds one grid's run may take (default 3 h)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = p.parse_args(argv)
    names = [g.strip() for g in args.grids.split(",") if g.strip()]
    if not names:
        raise CliError("--grids is empty; give e.g. --grids linear/100,log/100")
    args.grids = [parse_grid(g) for g in names]
    if len({g["grid"] for g in args.grids}) != len(args.grids):
        raise CliError(f"--grids repeats a grid: {names}")
    if args.detail_block < 0:
        raise CliError(f"--detail-block={args.detail_block} must be a block index >= 0")
    if args.detail_point not in POINTS:
        raise CliError(f"--detail-point={args.detail_point!r} is not one of {list(POINTS)}")
    if args.timeout < 1:
        raise CliError(f"--timeout={args.timeout} must be a positive number of seconds")
    for o in args.overrides:
        if "=" not in o or o.startswith("="):
            raise CliError(f"override {o!r} is not key=value (extra arguments are Hydra overrides)")
        key = override_key(o)
        if key in CONTROLLED or key.startswith("hydra.sweep"):
            raise CliError(f"override {o!r} is not allowed: {CONTROLLED.get(key, 'the benchmark runs no multirun')}")
        if key == "eval.datasets" and CHOOSE_BY not in o:
            raise CliError(f"override {o!r} drops {CHOOSE_BY}, the dataset the grid is chosen by; keep it in eval.datasets")
        if "," in o.split("=", 1)[1] and not o.split("=", 1)[1].lstrip().startswith(("[", "{", "'", '"')):
            raise CliError(f"override {o!r} is a sweep; this benchmark runs one job per grid (list only the grids in --grids)")
    if args.tiny and not args.tiny_model_dir:
        raise CliError("--tiny needs --tiny-model-dir (a saved tiny LLaMA, e.g. the tests' tiny_model_dir fixture)")
    if args.tiny_model_dir and not (args.tiny_model_dir / "config.json").is_file():
        raise CliError(f"--tiny-model-dir={args.tiny_model_dir} has no config.json (a save_pretrained directory)")
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f"--out={args.out} is a file; give a directory")
    if args.cache is not None and args.cache.exists() and not args.cache.is_dir():
        raise CliError(f"--cache={args.cache} is a file; give a directory")
    return args


# ---------------------------------------------------------------------------------------------------------------- runs
def slug(grid: str) -> str:
    return grid.replace("/", "_")


def run_grid(grid: dict, args, cache: Path, runs: Path) -> dict:
    """One pipeline process for one grid; its output goes to <runs>/<slug>.log."""
    run_dir = runs / slug(grid["grid"])
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = "null" if grid["steps"] is None else str(grid["steps"])
    cmd = [sys.executable, "-m", "qllm_pipeline", *args.pipeline_overrides,
           f"search_theta.spacing={grid['spacing']}", f"search_theta.steps={steps}",
           f"pipeline.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    log_file = runs / f"{slug(grid['grid'])}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    with log_file.open("w") as out:
        out.write(" ".join(cmd) + "\n\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=args.timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    row = {"grid": grid["grid"], "spacing": grid["spacing"], "steps": grid["steps"], "wall_s": round(wall, 1),
           "run_dir": rel(run_dir), "log": rel(log_file), "overrides": cmd[3:-2]}
    results_file = run_dir / "results.json"
    if rc != 0 or not results_file.is_file():
        tail = log_file.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        return {**row, "status": "failed", "error": f"exit {rc}: {tail[0][-300:]}"}
    results = json.loads(results_file.read_text())
    row.update(summarize_run(results, run_dir, cache, args))
    return {**row, "status": "ok"}


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def summarize_run(results: dict, run_dir: Path, cache: Path, args) -> dict:
    ppl = results["ppl"]
    variants = [v for v in next(iter(ppl.values())) if v not in ("fp", "rtn")] or ["rtn"]
    method_row = max(variants, key=lambda v: (v.count("+"), len(v)))  # the final row: e.g. cra+lrc rather than cra
    stages = {s["stage"]: {"seconds": s["seconds"], "computed": s["computed"], "cached": s["cached"],
                           "peak_rss_mib": s["peak_rss_mib"]}
              for s in results["stages"] if s["status"] != "disabled"}
    keys = search_theta_keys(run_dir, results["meta"]["keys"])
    thetas = [json.loads((cache / "search_theta" / k / "theta.json").read_text()) for k in keys]
    return {
        "row": method_row,
        "ppl": ppl,
        "search_theta_s": stages.get("search_theta", {}).get("seconds"),
        "search_theta_computed": stages.get("search_theta", {}).get("computed"),
        "pipeline_wall_s": round(results["meta"]["wall_seconds"], 1),
        "peak_rss_mib": round(results["meta"]["peak_rss_mib"], 1),
        "stages": stages,
        "theta": theta_summary(thetas),
        "detail": detail(thetas, args.detail_block, args.detail_point),
        "search_theta_keys": keys,
    }


def search_theta_keys(run_dir: Path, meta_keys: dict) -> list[str]:
    """The run's per-block search_theta keys, as the runner recorded them in results.json."""
    found = (meta_keys.get("blocks") or {}).get("search_theta")
    if not found:
        raise RuntimeError(f"the run in {run_dir} recorded no search_theta keys (meta.keys.blocks)")
    return list(found)


def theta_summary(thetas: list[dict]) -> dict:
    """Per point: Σ chosen loss / Σ baseline loss over blocks, grid points, blocks where reassembly was chosen."""
    out = {}
    for point in POINTS:
        per = [t[point] for t in thetas if point in t and t[point].get("baseline_loss") is not None]
        if not per:
            continue
        loss, base = sum(r["loss"] for r in per), sum(r["baseline_loss"] for r in per)
        ratios = [r["loss"] / r["baseline_loss"] for r in per if r["baseline_loss"] > 0]
        out[point] = {
            "loss_sum": loss, "baseline_sum": base, "ratio": loss / base if base > 0 else None,
            "geomean_block_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios and min(ratios) > 0 else None,
            "grid_points": sum(len(r["curve"]) for r in per),
            "reassembled_blocks": sum(r["n_extra"] > 0 for r in per),
            "blocks": len(per),
        }
    loss = sum(v["loss_sum"] for v in out.values())
    base = sum(v["baseline_sum"] for v in out.values())
    out["all"] = {"loss_sum": loss, "baseline_sum": base, "ratio": loss / base if base > 0 else None,
                  "grid_points": sum(v["grid_points"] for v in out.values()), "blocks": len(thetas)}
    return out


def detail(thetas: list[dict], block: int, point: str) -> dict | None:
    index = min(block, len(thetas) - 1)
    r = thetas[index].get(point)
    if r is None:
        return None
    curve = r["curve"]
    return {
        "block": index, "requested_block": block, "point": point,
        "max_abs_x": curve[0]["theta"] if curve else None,  # the first grid point is max|x| (no channel split)
        "theta": r["theta"], "loss": r["loss"], "baseline_loss": r["baseline_loss"],
        "ratio": r["loss"] / r["baseline_loss"] if r.get("baseline_loss") else None,
        "grid_points": len(curve), "distinct_losses": len({c["loss"] for c in curve}),
        "grid_last_theta": curve[-1]["theta"] if curve else None,
        "n_extra": r["n_extra"], "channels": r.get("channels"),
    }


# ---------------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/theta_grid.py", *argv])
    extra = list(args.overrides)
    model = ["model=smollm2_135m" if args.tiny else f"model={args.model}"]
    if args.tiny:
        model += [*tiny_model(args.tiny_model_dir.resolve()), *TINY_WINDOWS]
    args.pipeline_overrides = merge_overrides(BENCH_OVERRIDES, model, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs" / (RUNS_NAME + ("_tiny" if args.tiny else ""))
    runs.mkdir(parents=True, exist_ok=True)
    if args.cache is None:
        cache = runs / "cache"
        shutil.rmtree(cache, ignore_errors=True)  # fresh: every stage of the first grid is computed, so it is timed
    else:
        cache = args.cache.resolve()
    result = {"command": command, "model": "tiny" if args.tiny else args.model, "pipeline_overrides": args.pipeline_overrides,
              "cache": rel(cache), "choose_by": CHOOSE_BY, "reported_only": [REPORTED], "machine": machine(),
              "total_wall_s": 0.0, "rows": []}
    log(f"{len(args.grids)} grid(s): {', '.join(g['grid'] for g in args.grids)}; cache {rel(cache)}; logs in {rel(runs)}")
    started = time.perf_counter()
    for i, grid in enumerate(args.grids, 1):
        row = run_grid(grid, args, cache, runs)
        result["rows"].append(row)
        result["total_wall_s"] = round(time.perf_counter() - started, 1)
        result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        write(args.out, result)
        if row["status"] == "ok":
            d = row["detail"] or {}
            log(f"grid {i}/{len(args.grids)} {row['grid']}: {CHOOSE_BY} {row['ppl'][CHOOSE_BY][row['row']]:.3f}, "
                f"{REPORTED} {row['ppl'].get(REPORTED, {}).get(row['row'], float('nan')):.3f}, search_theta "
                f"{row['search_theta_s']:.1f} s, block {d.get('block')} {d.get('point')} θ={f(d.get('theta'), '.2f')} "
                f"({d.get('grid_points')} points), {row['wall_s']:.0f} s")
        else:
            log(f"grid {i}/{len(args.grids)} {row['grid']}: FAILED ({row['error']}); log {row['log']}")
    text = write(args.out, result)
    print(text)
    failed = [r["grid"] for r in result["rows"] if r["status"] != "ok"]
    if failed:
        print(f"error: grid run(s) {failed} failed; see their logs under {rel(runs)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
