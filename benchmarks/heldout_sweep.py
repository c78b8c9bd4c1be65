"""Held-out sweep: choose one setting of a method on held-out calibration windows, never on the evaluation windows.

Runs one Hydra multirun of the ordinary pipeline over the values of one config key (`--sweep KEY=V1,V2,...`) for one
method and bit width, and evaluates every run on `calib_heldout` only: held-out windows of the *calibration* split
(spread over its articles, overlapping no calibration window). The value is chosen by it (lowest ratio to FP). The
evaluation windows are not evaluated at all, so no evaluation number is printed while a setting is chosen; the
accuracy tables (benchmarks/accuracy.py) report them after the choice. (Rows written before 2026-12-05 also hold
a `wiki_sample` entry: the sweep then reported the evaluation windows beside the choice.)

    python benchmarks/heldout_sweep.py --method quarot --sweep quant.a_clip_ratio=1.0,0.95,0.9,0.85,0.8
    python benchmarks/heldout_sweep.py --method rotation_lrc_gptq --sweep train_lowrank.epochs=2,4 quant.a_clip_ratio=0.9
    python benchmarks/heldout_sweep.py --tiny --tiny-model-dir DIR --out DIR --sweep quant.a_clip_ratio=1.0,0.9   # smoke

All runs share one artifact cache (a fresh one under <out>/runs/heldout_sweep/ unless --cache is given), so the stages
a value does not touch are computed once. Writes <out>/heldout_<KEY>.md and .json, keeping the rows of other methods
and bit widths already there. Bad command-line input ends with one `error: ...` line and exit code 2.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from _cli import TINY_OVERRIDES, CliError, Parser, add_run_options, logger, own_variant, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CHOOSE_BY = "calib_heldout"
BENCH_OVERRIDES = [f"eval.datasets=[{CHOOSE_BY}]", "pipeline.progress=false", "fuse.save_model=false"]
CONTROLLED = ("pipeline.cache_dir", "hydra.run.dir", "hydra.sweep.dir", "method", "quant", "eval.datasets")

log = logger("heldout_sweep")


def parse_args(argv: list[str]):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", required=True, help="KEY=V1,V2,... : the config key and the values to compare")
    p.add_argument("--method", default="qllm", help="conf/method option (default qllm)")
    p.add_argument("--quant", default="w4a4", help="conf/quant option (default w4a4)")
    p.add_argument("--model", default="smollm2_135m", help="conf/model option")
    add_run_options(p, REPO / "benchmarks" / "results")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (key=value)")
    args = p.parse_args(argv)
    key, sep, values = args.sweep.partition("=")
    args.key, args.values = key.strip(), [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not args.key or len(args.values) < 2:
        raise CliError(f"--sweep={args.sweep!r} must be KEY=V1,V2,... with at least two values")
    if len(set(args.values)) != len(args.values):
        raise CliError(f"--sweep repeats a value: {args.values}")
    for name, group in ((args.method, "method"), (args.quant, "quant"), (args.model, "model")):
        if not (REPO / "conf" / group / f"{name}.yaml").is_file():
            choices = sorted(f.stem for f in (REPO / "conf" / group).glob("*.yaml"))
            raise CliError(f"--{group}={name} is not a conf/{group} option; choose one of {choices}")
    for o in [args.sweep, *args.overrides]:
        k = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o:
            raise CliError(f"override {o!r} is not key=value (extra arguments are Hydra overrides)")
        if k in CONTROLLED or k.startswith("hydra."):
            raise CliError(f"{o!r} sets {k}, which the benchmark sets itself (use --method / --quant / --cache)")
    if args.tiny and not (args.tiny_model_dir and (args.tiny_model_dir / "config.json").is_file()):
        raise CliError("--tiny needs --tiny-model-dir, a saved tiny LLaMA (a directory with config.json)")
    return args


def run_sweep(args, cache: Path, sweep_dir: Path) -> list[dict]:
    model = [*tiny_model(args.tiny_model_dir), *TINY_OVERRIDES] if args.tiny else [f"model={args.model}"]
    cmd = [sys.executable, "-m", "qllm_pipeline", "-m", f"method={args.method}", f"quant={args.quant}", *model,
           *BENCH_OVERRIDES, *args.overrides, f"{args.key}={','.join(args.values)}",
           f"pipeline.cache_dir={cache}", f"hydra.sweep.dir={sweep_dir}"]
    log(" ".join(cmd[2:]))
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
        raise SystemExit("error: the sweep failed; see the log above")
    return sweep_rows(args, sweep_dir)


def sweep_rows(args, sweep_dir: Path) -> list[dict]:
    """One row per finished run of a multirun directory (a stopped sweep's finished runs too)."""
    rows = []
    for results_file in sorted(sweep_dir.glob("*/results.json"), key=lambda f: int(f.parent.name)):
        results = json.loads(results_file.read_text())
        value = dict(o.split("=", 1) for o in results["meta"]["overrides"])[args.key]
        row = {"method": args.method, "quant": args.quant, "key": args.key, "value": value,
               "overrides": [o for o in args.overrides], "wall_s": round(results["meta"]["wall_seconds"], 1),
               "stages_s": {s["stage"]: round(s["seconds"], 1) for s in results["stages"] if s["status"] != "disabled"}}
        row[CHOOSE_BY] = held_out_entry(results)
        rows.append(row)
    return rows


def held_out_entry(results: dict) -> dict:
    """A run's own row on the held-out windows, from its results.json: ppl, × FP, and the windows' NLLs, so that two
    runs are compared paired, on the same windows (heldout_rule.py, accuracy_all.py --choose)."""
    ppl = results["ppl"][CHOOSE_BY]
    label = own_variant(ppl)
    windows = results["windows"][CHOOSE_BY]
    return {"variant": label, "ppl": round(ppl[label], 3), "fp": round(ppl["fp"], 3),
            "ratio": round(ppl[label] / ppl["fp"], 4), "windows": windows,
            "window_nll": results["window_nll"][CHOOSE_BY][label], "tokens_per_window": windows["seq_len"] - 1}


def merge(path: Path, rows: list[dict], args) -> dict:
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    # rows written before extra overrides were recorded have no "overrides": they had none
    same = lambda r: (r["method"], r["quant"], r["model"], r["value"], tuple(r.get("overrides", [])))  # noqa: E731
    for r in rows:
        r["model"] = "tiny" if args.tiny else args.model
    new_keys = {same(r) for r in rows}
    kept = [r for r in old["rows"] if same(r) not in new_keys]
    return {"key": args.key, "host": platform.node(), "cpus": os.cpu_count(), "rows": kept + rows}


def held_out_ratio(row: dict) -> float:
    # the earliest rows (before 2026-11) kept the ratio as a flat "calib_heldout_x_fp"
    return row[CHOOSE_BY]["ratio"] if CHOOSE_BY in row else row["calib_heldout_x_fp"]


def markdown(data: dict) -> str:
    lines = [f"# Held-out sweep of `{data['key']}`", "",
             f"Chosen by `{CHOOSE_BY}` (held-out calibration windows, × FP); the evaluation windows are not evaluated. "
             "**bold** = the value chosen for that method and bit width. Rows measured before 2026-12-05 (held-out windows "
             "then taken from the end of the calibration text) are marked ‡.", "",
             "| model | method | quant | extra overrides | value | calib_heldout × FP | wall (s) |",
             "|---|---|---|---|---|---:|---:|"]
    groups: dict[tuple, list[dict]] = {}
    for r in data["rows"]:
        groups.setdefault((r["model"], r["method"], r["quant"], tuple(r.get("overrides", []))), []).append(r)
    for (model, method, quant, extra), rows in groups.items():
        best = min(rows, key=held_out_ratio)
        for r in rows:
            value = f"**{r['value']}**" if r is best else r["value"]
            old = "" if r.get(CHOOSE_BY, {}).get("windows") else " ‡"
            wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "-"
            lines.append(f"| {model} | {method} | {quant} | {' '.join(extra) or '-'} | {value}{old} | "
                         f"{held_out_ratio(r):.3f} | {wall} |")
    return "\n".join(lines) + "\n"


def sweep_and_write(args) -> tuple[dict, list[dict]]:
    """Run the sweep and merge its rows into <out>/heldout_<key>.json (and .md): the merged data, and the new rows."""
    runs = args.out / "runs" / "heldout_sweep"
    cache = args.cache or runs / "cache"
    sweep_dir = runs / f"{args.method}_{args.quant}_{args.key}_{time.strftime('%Y%m%d-%H%M%S')}"
    if args.cache is None:
        shutil.rmtree(cache, ignore_errors=True)
    rows = run_sweep(args, cache, sweep_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"heldout_{args.key.replace('.', '_')}"
    data = merge(stem.with_suffix(".json"), rows, args)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(data))
    log(f"wrote {stem}.md and .json")
    return data, rows


def main(argv: list[str]) -> None:
    try:
        args = parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    print(markdown(sweep_and_write(args)[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
