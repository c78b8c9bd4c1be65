"""CUDA checks of the deployable paths (run when a GPU is lent; CI has none):

1. IntLinear (torch._int_mm, cuBLAS int8) against fake quantization, one projection and a whole random 2-block LLaMA,
   at W4A4, W4A8 and W8A8 (symmetric);
2. a compressed-tensors checkpoint written by qllm_pipeline.export_ct, loaded by stock transformers with
   `device_map="cuda"`, against the same checkpoint loaded on the CPU.

Writes benchmarks/results/cuda_check.md (or --out DIR).

    python benchmarks/cuda_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # --device cpu: a dry run of the same code where no GPU is lent


def fused_random_llama(wbits: int, abits: int, symmetric: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from qllm_pipeline.blocks import decoder_layers, quantize_block_linears
    from qllm_pipeline.quantizer import QuantSpec

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    for layer in decoder_layers(model):
        for ql in quantize_block_linears(layer, QuantSpec(wbits, symmetric), QuantSpec(abits, symmetric)).values():
            ql.fuse()
    return model


def integer_gemm_lines() -> list[str]:
    from qllm_pipeline.blocks import decoder_layers, quant_linears
    from qllm_pipeline.int_linear import IntLinear, to_integer_model

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

    from qllm_pipeline.blocks import decoder_layers
    from qllm_pipeline.export_ct import save_compressed_tensors_model
    from qllm_pipeline.fused import fused_block_tensors

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


def main() -> None:
    global DEVICE
    if "--device" in sys.argv:
        DEVICE = sys.argv[sys.argv.index("--device") + 1]
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run this where a GPU is available", file=sys.stderr)
        raise SystemExit(2)
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else REPO / "benchmarks" / "results"
    lines = ["# CUDA checks", "", f"{torch.cuda.get_device_name() if DEVICE == 'cuda' else 'CPU (dry run)'}, torch {torch.__version__}. Command: "
             "`python benchmarks/cuda_check.py`.", "", "IntLinear (torch._int_mm) against fake quantization "
             "(random 2-block LLaMA, hidden 256; a rare activation code can flip on float rounding, hence the "
             "whole-model error):", "", *integer_gemm_lines(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        lines.append(compressed_tensors_line(Path(tmp)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
