"""One rank of a data-parallel test job (`torchrun --nproc_per_node=N tests/dp_worker.py OUT METHOD... -- OVERRIDES`):
runs `python -m qllm_pipeline OVERRIDES method=METHOD hydra.run.dir=OUT/METHOD` for each method in turn, in this
process (torch and transformers imported once for all of them), and exits with the first failure's code."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_cli_in_process  # noqa: E402


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--")
    out, methods, overrides = Path(args[0]), args[1:split], args[split + 1 :]
    for method in methods:
        proc = run_cli_in_process([*overrides, f"method={method}", f"hydra.run.dir={out / method}"])
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return proc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
