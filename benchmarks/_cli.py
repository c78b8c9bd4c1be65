"""Command-line plumbing shared by the benchmark scripts: bad input is one `error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Smoke mode (--tiny, the tests): a few short windows on the tiny random model (with `tiny_model`'s overrides).
TINY_WINDOWS = [
    "calibrate.n_samples=2", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=4", "search_theta.n_samples=1",
]
TINY_OVERRIDES = [*TINY_WINDOWS, "search_theta.steps=5", "train_lowrank.epochs=1"]


def tiny_model(model_dir) -> list[str]:
    """The overrides that run the pipeline on a saved tiny model (the SmolLM2 entry's other settings kept). Its runs
    draw no plots: a smoke run checks the benchmark's table, and matplotlib is a third of a tiny run."""
    return ["model.name=tiny", f"model.path={model_dir}", "model.package=null", "model.gguf_file=null", "model.hub_id=null",
            "pipeline.plots=false"]


class CliError(Exception):
    """Bad command-line input: printed as one `error: ...` line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage + error
        raise CliError(message)


def logger(prefix: str):
    """A print function that stamps each line with `[prefix HH:MM:SS]`."""

    def log(msg: str) -> None:
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    return log


def add_run_options(parser, out: Path) -> None:
    """The options of a benchmark that runs the pipeline: where results go, which artifact cache it uses, and its
    smoke mode on a saved tiny model (the tests run it so)."""
    parser.add_argument("--out", type=Path, default=out, help="directory for the results (.md, .json)")
    parser.add_argument("--cache", type=Path, help="artifact cache to use (default: a fresh one, so stages are timed)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: the tiny random model in --tiny-model-dir, few windows")
    parser.add_argument("--tiny-model-dir", type=Path)


def listed(option: str, value: str, known, noun: str) -> list[str]:
    """A comma-separated option's items, each one of `known` (else a CliError naming the option and the choices)."""
    items = [item for item in value.split(",") if item]
    for item in items:
        if item not in known:
            raise CliError(f"{option}: unknown {noun} {item!r}; choose from {', '.join(known)}")
    return items


def own_variant(ppl: dict) -> str:
    """A run's own row among its perplexities (fp, rtn, and the method's variants): the longest `a+b+...` label that
    is not fp (rtn when the method is rtn)."""
    names = [v for v in ppl if v != "fp"]
    return max(names, key=lambda v: (v != "rtn", v.count("+"), len(v)))


def code_commit() -> str:
    """The commit of the code that measures (`+dirty` when it has uncommitted changes), stored with each row."""
    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def rows_in(path: Path) -> list[dict]:
    """The rows of an accuracy.json-style results file ({"rows": [...]}); none when the file does not exist yet."""
    return json.loads(path.read_text()).get("rows", []) if path.is_file() else []


def merged_rows(previous: Path, rows: list[dict], same: dict, order: list | None = None,
                key=lambda row: row["case"]) -> list[dict]:
    """`rows` beside the rows of the other keys in the results file `previous`, when that file measured the same thing
    (its values of `same`'s keys equal): re-running some cases keeps the rest. A row's identity is `key(row)` (its
    "case" unless told); with `order` (the known keys, in order) rows of other keys are dropped and the rest sorted in
    that order, otherwise rows sort by key."""
    kept = []
    if previous.is_file():
        old = json.loads(previous.read_text())
        if all(old.get(k) == v for k, v in same.items()):
            fresh = {key(r) for r in rows}
            kept = [r for r in old.get("rows", []) if key(r) not in fresh and (order is None or key(r) in order)]
    return sorted(kept + rows, key=key if order is None else lambda r: order.index(key(r)))


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` in one step (a stopped run never leaves a half-written results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def run_benchmark(name, parse_args, run, markdown, argv=None, write=None) -> None:
    """A benchmark's main: parse its arguments (bad input: one `error: ...` line, exit code 2, before any work), run
    it, write `name`.json and `name`.md under args.out (or call `write(args, result)`, for a benchmark that writes more,
    e.g. a plot), and print the markdown (`name`: a string, or a function of the parsed arguments that gives it)."""
    try:
        args = parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = run(args)
    if write is not None:
        write(args, result)
    else:
        name = name(args) if callable(name) else name
        write_atomic(args.out / f"{name}.json", json.dumps(result, indent=2))
        write_atomic(args.out / f"{name}.md", markdown(result))
    print(markdown(result))
