"""Command-line plumbing shared by the benchmark scripts: bad input is one `error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import time


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


def listed(option: str, value: str, known, noun: str) -> list[str]:
    """A comma-separated option's items, each one of `known` (else a CliError naming the option and the choices)."""
    items = [item for item in value.split(",") if item]
    for item in items:
        if item not in known:
            raise CliError(f"{option}: unknown {noun} {item!r}; choose from {', '.join(known)}")
    return items


def run_benchmark(name: str, parse_args, run, markdown, argv=None) -> None:
    """A benchmark's main: parse its arguments (bad input: one `error: ...` line, exit code 2, before any work), run
    it, write `name`.json and `name`.md under args.out, and print the markdown."""
    try:
        args = parse_args(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))
