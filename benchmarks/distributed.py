"""Data parallelism, measured: wall time per stage with 1 and 2 ranks (one thread each) on the embedded model, the
speedup, the perplexities (the same to 4 significant digits), and where the rest of the time goes (rank 0's seconds
in collectives: data moved and waits for the other rank).

    python benchmarks/distributed.py                                    # SmolLM2, the default job and the best recipe
    python benchmarks/distributed.py --methods qllm --ranks 1,2,4       # more ranks than cores only oversubscribes

Each run gets a fresh cache, so every stage is computed. 1 rank runs `python -m qllm_pipeline`, N ranks run
`torchrun --standalone --nproc_per_node=N -m qllm_pipeline` (gloo), each process with OMP_NUM_THREADS=1.
Writes benchmarks/results/distributed.json and .md.
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
from _cli import Parser, code_commit, listed, logger, run_benchmark, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
BLOCK_STAGES = ("collect_activations", "smooth", "search_theta", "reassemble", "train_lowrank", "fuse")
TINY = ["calibrate.n_samples=8", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=8", "eval.batch_size=2",
        "pipeline.batch_size=2", "search_theta.steps=10", "search_theta.n_samples=2", "train_lowrank.epochs=1"]
log = logger("distributed")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--quant", default="w4a4")
    parser.add_argument("--methods", default="qllm,rotation_lrc_gptq", help=f"conf/method options: {','.join(METHODS)}")
    parser.add_argument("--ranks", default="1,2", help="numbers of ranks, comma-separated (1 first: the baseline)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny-model-dir", type=Path, help="smoke mode: this saved tiny model, tiny settings")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    args.methods = listed("--methods", args.methods, METHODS, "method")
    try:
        args.ranks = [int(r) for r in args.ranks.split(",") if r]
    except ValueError:
        parser.error(f"--ranks={args.ranks!r} must be positive integers, comma-separated, e.g. 1,2")
    if not args.ranks or args.ranks[0] != 1 or any(r < 1 for r in args.ranks):
        parser.error(f"--ranks={','.join(map(str, args.ranks))} must start with 1 (the baseline the speedup is of)")
    return args


def run_once(args, method: str, ranks: int, tmp: Path) -> dict:
    run_dir, cache = tmp / f"{method}-{ranks}", tmp / f"cache-{method}-{ranks}"
    overrides = [f"model={args.model}", f"quant={args.quant}", f"method={method}", f"pipeline.cache_dir={cache}",
                 f"hydra.run.dir={run_dir}", "pipeline.progress=false"]
    if args.tiny_model_dir:
        overrides += [*tiny_model(args.tiny_model_dir), *TINY]
    overrides += args.overrides
    launcher = [sys.executable, "-m", "qllm_pipeline"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "qllm_pipeline"]
    log(f"{method}: {ranks} rank(s)")
    started = time.perf_counter()
    proc = subprocess.run([*launcher, *overrides], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: {method} with {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    stages = {row["stage"]: row["seconds"] for row in results["stages"] if row["status"] != "disabled"}
    return {"method": method, "ranks": ranks, "wall_s": round(wall, 1), "stages": stages, "ppl": results["ppl"],
            "collective_s": round(results["meta"].get("collective_seconds", 0.0), 1),
            "peak_rss_mib": round(results["meta"]["peak_rss_mib"])}


def run(args) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="qllm-dist-") as tmp:
        for method in args.methods:
            for ranks in args.ranks:
                runs.append(run_once(args, method, ranks, Path(tmp)))
    rows = []
    for r in runs:
        base = next(b for b in runs if b["method"] == r["method"] and b["ranks"] == 1)
        block = lambda x: sum(s for n, s in x["stages"].items() if n in BLOCK_STAGES)  # noqa: E731
        for stage, seconds in [*r["stages"].items(), ("block stages", block(r)), ("job", r["wall_s"])]:
            ref = base["stages"].get(stage) if stage not in ("block stages", "job") else (block(base) if stage == "block stages" else base["wall_s"])
            rows.append({"method": r["method"], "ranks": r["ranks"], "stage": stage, "wall_s": round(seconds, 1),
                         "speedup": round(ref / seconds, 2) if ref and seconds else None, "ppl": r["ppl"]})
    for r in runs:
        r["ppl_matches_1_rank"] = same_digits(r["ppl"], next(b for b in runs if b["method"] == r["method"] and b["ranks"] == 1)["ppl"])
    return {"command": " ".join(["python benchmarks/distributed.py", *sys.argv[1:]]), "commit": code_commit(),
            "model": "tiny" if args.tiny_model_dir else args.model, "quant": args.quant, "runs": runs, "rows": rows}


def same_digits(a: dict, b: dict, digits: int = 4) -> bool:
    """Every perplexity of `a` equals `b`'s to `digits` significant digits."""
    return all(f"{a[d][v]:.{digits - 1}e}" == f"{b[d][v]:.{digits - 1}e}" for d in b for v in b[d])


def markdown(result: dict) -> str:
    lines = [f"# Data parallel: 1 and N ranks ({result['model']}, {result['quant']})", "",
             f"`{result['command']}` (commit {result['commit']}); one thread per rank, a fresh cache per run.", "",
             "| method | ranks | job wall (s) | rank 0 in collectives (s) | peak RSS per rank (MiB) | perplexities | same to 4 digits as 1 rank |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in result["runs"]:
        ppl = "; ".join(f"{d}/{v} {p:.4f}" for d, row in r["ppl"].items() for v, p in row.items())
        lines.append(f"| {r['method']} | {r['ranks']} | {r['wall_s']} | {r['collective_s']} | {r['peak_rss_mib']} | {ppl} | "
                     f"{'yes' if r['ppl_matches_1_rank'] else '**no**'} |")
    lines += ["", "| method | stage | " + " | ".join(f"{n} rank(s) (s)" for n in sorted({r['ranks'] for r in result['runs']}))
              + " | speedup |", "|---|---|" + "---:|" * (len({r['ranks'] for r in result['runs']}) + 1)]
    by = {(row["method"], row["stage"], row["ranks"]): row for row in result["rows"]}
    ranks = sorted({r["ranks"] for r in result["runs"]})
    for method in dict.fromkeys(row["method"] for row in result["rows"]):
        for stage in dict.fromkeys(row["stage"] for row in result["rows"] if row["method"] == method):
            cells = [by.get((method, stage, n)) for n in ranks]
            speed = cells[-1]["speedup"] if cells[-1] else None
            lines.append(f"| {method} | {stage} | " + " | ".join(str(c["wall_s"]) if c else "-" for c in cells)
                         + f" | {speed if speed is not None else '-'}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_benchmark("distributed", parse_args, run, markdown)
