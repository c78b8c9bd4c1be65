"""Save a conf/model entry as the pipeline loads it (dequantized GGUF included) to a plain transformers directory.

For benchmarks/peers.py on a model whose GGUF llmcompressor's pinned transformers misloads (Gemma-3 270M under 5.17):
run this with the main install, then `peers.py --model MODEL --model-path DIR` in the peers' environment.

    python benchmarks/save_model.py gemma3_270m /tmp/gemma3_270m
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from _cli import CliError, Parser, logger  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
log = logger("save_model")


def save_whole(model, tokenizer, out: Path) -> None:
    """Write the model and its tokenizer to a temporary folder beside `out`, renamed onto `out` only once both are
    written: a failed or interrupted save leaves no half-written `out` (accuracy_all takes one with a config.json as
    finished). `out` is new or an empty folder."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a conf/model entry, e.g. gemma3_270m")
    parser.add_argument("out", type=Path, help="the directory to write (config, safetensors weights, tokenizer)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        conf = REPO / "conf" / "model" / f"{args.model}.yaml"
        if not conf.is_file():
            raise CliError(f"unknown model {args.model!r}; choose a conf/model entry")
        if args.out.exists() and any(args.out.iterdir()):
            raise CliError(f"{args.out} is not empty; give a new directory")
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from qllm_pipeline.core.config import group_config
    from qllm_pipeline.model.model_loading import ModelSource, load_model, load_tokenizer

    cfg = group_config("model", args.model, REPO / "conf")
    source = ModelSource.from_config({**cfg, "load": "whole"})
    log(f"loading {args.model}")
    model, tokenizer = load_model(source), load_tokenizer(source)
    save_whole(model, tokenizer, args.out)
    log(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
