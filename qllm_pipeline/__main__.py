"""Command line: `python -m qllm_pipeline model=<name> quant=<w4a4|w4a8|w6a6|w8a8|fp16> [key=value ...]`."""
from __future__ import annotations

import sys
from pathlib import Path

from .cli import check_group_overrides, main

if __name__ == "__main__":
    check_group_overrides(sys.argv[1:], Path(__file__).resolve().parent.parent / "conf")
    main()
