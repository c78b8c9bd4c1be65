"""Every row of benchmarks/results/accuracy.json from one commit: ours (benchmarks/accuracy.py) and llm-compressor's
(benchmarks/peers.py), on one machine, resumable.

The table's rows are otherwise measured a few at a time, so they drift across commits and machines (float kernels
differ in their last bits between CPUs, and quantized perplexities carry that a few per cent: README, "Same code,
another CPU"). This script runs the table's cases (CASES: one benchmark invocation each) in order, each into its own
folder under --work with one shared artifact cache (a case that reuses another's stages lists only the stages it
computed, in its row's `stages`), and refuses to start on a working tree with uncommitted changes: every row then
carries the same `commit`. A case whose rows are already there from this commit is skipped, so the same command
resumes after a kill; rows from another commit are run again. Only when every case is done are the rows written to
<out>/accuracy.json and .md (the table never mixes commits); until then <work>/accuracy.json holds the finished ones.

    python benchmarks/accuracy_all.py --list                 # the cases, and which are done at this commit
    python benchmarks/accuracy_all.py                        # run what is missing (one torch thread per case)
    python benchmarks/accuracy_all.py --only smollm2-best-w4a8,gemma-best-w4a8    # a subset, e.g. one per core
    python benchmarks/accuracy_all.py --choose               # which of our Gemma rows the held-out rule chooses

With the table it writes <out>/accuracy_choice.{md,json}: for Gemma, which has no one best recipe for every width, the
held-out rule (benchmarks/heldout_rule.py) along rotation + GPTQ → + LRC → + `tune_e2e`, on calib_heldout alone.

Two processes may run disjoint `--only` subsets on one --work (each case has its own folder; the cache locks per key).
The peers' cases need llm-compressor's environment (--peers-python; see benchmarks/peers.py for its install).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from heldout_sweep import CHOOSE_BY, held_out_entry  # noqa: E402

from _cli import CliError, Parser, code_commit, listed, logger, rows_in, write_atomic  # noqa: E402
from qllm_pipeline.evaluation.intervals import difference_interval  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
log = logger("accuracy_all")
QUANTS = ("w4a4", "w4a8", "w6a6")
GEMMA_ONLINE = ["rotate.residual=false", "rotate.online_inputs=true"]  # Gemma's rotation (README: Gemma-3 270M)
NO_E2E = "pipeline.stages=[calibrate,rotate,train_lowrank,fuse,evaluate]"


def ours(*args: str) -> list[str]:
    return ["benchmarks/accuracy.py", *args]


# name -> (tool, the benchmark's arguments, the rows it writes: one per evaluation corpus and quant). The order is the
# table's; cases that share stages come after the case that computes them (the no-e2e rows reuse the full recipe's LRC).
CASES: dict[str, tuple[str, list[str], int]] = {
    "smollm2-default-w4a4": ("ours", ours("--quants", "w4a4", "--methods", "qllm"), 2),
    **{f"smollm2-best-{q}": ("ours", ours("--quants", q, "--methods", "rotation_lrc_gptq"), 2) for q in QUANTS},
    "smollm2-peers": ("peers", ["benchmarks/peers.py", "--quants", ",".join(QUANTS), "--recipes", "rtn,quip_gptq",
                                "--fp-check"], 12),
    **{f"gemma-rotation-{q}": ("ours", ours("--model", "gemma3_270m", "--quants", q, "--methods", "quarot", "--tag",
                                            "online inputs", *GEMMA_ONLINE), 2) for q in QUANTS},
    **{f"gemma-best-{q}": ("ours", ours("--model", "gemma3_270m", "--quants", q, "--methods", "rotation_lrc_gptq",
                                        "--tag", "online inputs", *GEMMA_ONLINE), 2) for q in QUANTS},
    **{f"gemma-best-no-e2e-{q}": ("ours", ours("--model", "gemma3_270m", "--quants", q, "--methods", "rotation_lrc_gptq",
                                               "--tag", "online inputs, no e2e", *GEMMA_ONLINE, NO_E2E), 2) for q in QUANTS},
    "gemma-peers": ("peers", ["benchmarks/peers.py", "--model", "gemma3_270m", "--quants", ",".join(QUANTS),
                              "--recipes", "quip_gptq", "--fp-check"], 6),
}


# Which of our Gemma rows is chosen at each width, on held-out calibration windows only: each rung replaces the one
# chosen so far only when the paired interval of ppl(rung) - ppl(chosen) on calib_heldout lies below zero (the held-out
# rule of benchmarks/heldout_rule.py; a tie is no reason to change). Gemma has no one best recipe for every width.
LADDERS = {"gemma3_270m": [("rotation + GPTQ", "gemma-rotation-{}"), ("+ LRC, no e2e", "gemma-best-no-e2e-{}"),
                           ("full recipe", "gemma-best-{}")]}


def rows_of(work: Path, name: str) -> list[dict]:
    return rows_in(work / name / "accuracy.json")


def done(work: Path, name: str, commit: str) -> bool:
    """The case's rows are all there, every one measured at `commit` (a failed peer row has no ppl)."""
    rows = rows_of(work, name)
    return len(rows) == CASES[name][2] and all(r.get("commit") == commit and r.get("ppl") for r in rows)


def command_of(name: str, work: Path, cache: Path, peers_python: Path, gemma_dir: Path) -> list[str]:
    tool, args, _ = CASES[name]
    out = work / name
    if tool == "ours":
        return [sys.executable, *args, f"--out={out}", f"--cache={cache}"]
    extra = [f"--model-path={gemma_dir}"] if "gemma3_270m" in args else []
    # peers.py writes peers.json under --out and upserts its rows into --merge: the case's own accuracy.json
    return [str(peers_python), *args, *extra, f"--out={out}", f"--merge={out / 'accuracy.json'}", "--threads=1"]


def merged(work: Path) -> list[dict]:
    """Every finished case's rows, in CASES' order."""
    return [row for name in CASES for row in rows_of(work, name)]


def write_table(path: Path, rows: list[dict], command: str) -> None:
    from accuracy import markdown  # noqa: E402  (beside this script)

    write_atomic(path / "accuracy.json", json.dumps({"command": command, "rows": rows}, indent=2))
    write_atomic(path / "accuracy.md", markdown(rows, command))


def held_out(work: Path, name: str) -> dict:
    """A finished case's own row on calib_heldout: × FP and the window NLLs (from the run's results.json)."""
    found = sorted((work / name / "runs").glob("**/results.json"))
    if len(found) != 1:
        raise CliError(f"case {name} has {len(found)} results.json under {work / name / 'runs'}, not 1; run it first")
    commit = {r.get("commit") for r in rows_of(work, name)}
    return {**held_out_entry(json.loads(found[0].read_text())), "commit": ",".join(sorted(c for c in commit if c))}


def choose(work: Path) -> list[dict]:
    """The held-out rule along each model's ladder, per width: one step per rung after the first."""
    steps = []
    for model, ladder in LADDERS.items():
        for quant in QUANTS:
            chosen_name, chosen = ladder[0][0], held_out(work, ladder[0][1].format(quant))
            for name, case in ladder[1:]:
                row = held_out(work, case.format(quant))
                low, high = difference_interval(row["window_nll"], chosen["window_nll"], row["tokens_per_window"])
                adopt = high < 0
                steps.append({"model": model, "quant": quant, "candidate": name, "candidate_ratio": row["ratio"],
                              "against": chosen_name, "against_ratio": chosen["ratio"], "ci": [low, high],
                              "chosen": name if adopt else chosen_name, "commit": row["commit"]})
                if adopt:
                    chosen_name, chosen = name, row
    return steps


def choice_markdown(steps: list[dict], command: str) -> str:
    lines = [f"# Which of our rows is chosen, on `{CHOOSE_BY}` only", "", f"Command: `{command}`. Each candidate "
             "replaces the row chosen so far only when the 95 % paired interval of ppl(candidate) − ppl(chosen) on the "
             "held-out calibration windows lies below zero. No evaluation window is read.", "",
             "| model | quant | candidate (× FP) | against (× FP) | candidate − against (95 % paired) | chosen | commit |",
             "|---|---|---|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['model']} | {s['quant']} | {s['candidate']} ({s['candidate_ratio']:.4f}×) | {s['against']} "
                     f"({s['against_ratio']:.4f}×) | {s['ci'][0]:+.3f} to {s['ci'][1]:+.3f} | **{s['chosen']}** | "
                     f"{s['commit']} |")
    return "\n".join(lines) + "\n"


def write_choice(work: Path, out: Path, command: str) -> None:
    steps = choose(work)
    write_atomic(out / "accuracy_choice.json", json.dumps({"command": command, "steps": steps}, indent=2))
    write_atomic(out / "accuracy_choice.md", choice_markdown(steps, command))


def parse_args(argv: list[str]):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "accuracy_all",
                   help="each case's folder, the shared cache, and the rows finished so far")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                   help="where accuracy.json and .md go once every case is done")
    p.add_argument("--only", default="", help=f"comma-separated cases (default all): {','.join(CASES)}")
    p.add_argument("--peers-python", type=Path, default=REPO / ".venv-peers" / "bin" / "python",
                   help="the python of llm-compressor's environment (benchmarks/peers.py)")
    p.add_argument("--list", action="store_true", help="print the cases and which are done at this commit; run nothing")
    p.add_argument("--choose", action="store_true", help=f"from the finished cases, write which of our Gemma rows the "
                   f"held-out rule chooses per width (<out>/accuracy_choice.md and .json; {CHOOSE_BY} only); run nothing")
    args = p.parse_args(argv)
    args.only = listed("--only", args.only, list(CASES), "case") or list(CASES)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        commit = code_commit()
        pending = [n for n in args.only if not done(args.work, n, commit)]
        if args.list:
            for name in CASES:
                state = "done" if done(args.work, name, commit) else "pending"
                print(f"{name:28s} {state:8s} {' '.join(CASES[name][1])}")
            return 0
        if args.choose:
            write_choice(args.work, args.out, " ".join(["python benchmarks/accuracy_all.py", *argv]))
            print((args.out / "accuracy_choice.md").read_text())
            return 0
        if commit.endswith("+dirty"):
            raise CliError("the working tree has uncommitted changes; every row must come from one commit: "
                           "commit or stash them, then run again")
        if any(CASES[n][0] == "peers" for n in pending) and not args.peers_python.is_file():
            raise CliError(f"--peers-python {args.peers_python} does not exist; install llm-compressor's environment "
                           "(benchmarks/peers.py says how) or leave the peers' cases out with --only")
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/accuracy_all.py", *argv])
    cache, gemma_dir = args.work / "cache", args.work / "gemma3_270m_model"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per case: the rows' numbers depend on the thread count
    log(f"commit {commit}: {len(pending)} case(s) to run: {', '.join(pending) or 'none'}")
    for i, name in enumerate(pending, 1):
        if name == "gemma-peers" and not (gemma_dir / "config.json").is_file():
            subprocess.run([sys.executable, "benchmarks/save_model.py", "gemma3_270m", str(gemma_dir)], cwd=REPO,
                           env=env, check=True)
        (args.work / name).mkdir(parents=True, exist_ok=True)
        (args.work / name / "accuracy.json").unlink(missing_ok=True)  # rows of another commit must not stay
        log(f"case {i}/{len(pending)}: {name}")
        proc = subprocess.run(command_of(name, args.work, cache, args.peers_python, gemma_dir), cwd=REPO, env=env)
        if proc.returncode != 0 or not done(args.work, name, commit):
            print(f"error: case {name} failed (exit {proc.returncode}); its log is above; the same command resumes",
                  file=sys.stderr)
            return 1
        write_table(args.work, merged(args.work), command)
    if all(done(args.work, n, commit) for n in CASES):
        write_table(args.out, merged(args.work), command)
        try:
            write_choice(args.work, args.out, command)
        except CliError as exc:  # the table stands; only the choice is missing
            print(f"error: {exc}", file=sys.stderr)
            return 1
        log(f"every case done at {commit}: {args.out / 'accuracy.json'} (and which rows the held-out rule chooses: "
            f"{args.out / 'accuracy_choice.md'})")
    else:
        log(f"cases still to run: {', '.join(n for n in CASES if not done(args.work, n, commit))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
