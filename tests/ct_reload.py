"""Reload compressed-tensors checkpoints with stock transformers in a fresh process and print their perplexities.

Imports nothing from qllm_pipeline: this is what a user of the checkpoint runs.
    python tests/ct_reload.py MODEL_DIR [MODEL_DIR ...] WINDOWS.pt
        ->   one line per model: {"ppl": ..., "input_quantized": n, "linear_count": n, "class": "..."}
WINDOWS.pt holds a [n, seq_len] token tensor; ppl = exp(mean next-token NLL over all predicted positions).
Several models in one process pay torch's and transformers' imports once.
"""
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM


def reload(model_dir: str, windows: torch.Tensor) -> dict:
    # trust_remote_code runs the checkpoint's own modeling_qllm.py when it ships one (methods with run-time parts)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 4):
            ids = windows[start : start + 4]
            logits = model(ids).logits.float()
            total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    quantized = [m for m in linears if getattr(getattr(m, "quantization_scheme", None), "input_activations", None)
                 is not None or m._forward_pre_hooks]  # compressed-tensors' input quantizer, or the shipped code's
    return {"ppl": math.exp(total / count), "input_quantized": len(quantized), "linear_count": len(linears),
            "class": type(model).__name__}


if __name__ == "__main__":
    windows = torch.load(sys.argv[-1])
    for model_dir in sys.argv[1:-1]:
        print(json.dumps(reload(model_dir, windows)), flush=True)
