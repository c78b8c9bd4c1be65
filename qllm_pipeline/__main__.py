"""Command line: `python -m qllm_pipeline model=<name> quant=<w4a4|w4a8|w6a6|w8a8|fp16> [key=value ...]`."""
from qllm_pipeline.core.cli import main

if __name__ == "__main__":
    main()
