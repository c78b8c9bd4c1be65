"""Command-line plumbing shared by the benchmark scripts: bad input is one `error: ...` line and exit code 2."""
from __future__ import annotations

import argparse
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
