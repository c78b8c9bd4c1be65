"""Reload a compressed-tensors checkpoint with stock transformers in a fresh process and print its perplexity.

Imports nothing from qllm_pipeline: this is what a user of the checkpoint runs.
    python tests/ct_reload.py MODEL_DIR WINDOWS.pt   ->   {"ppl": ..., "input_quantized": n, "linear_count": n}
WINDOWS.pt holds a [n, seq_len] token tensor; ppl = exp(mean next-token NLL over all predicted positions).
"""
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM

# trust_remote_code runs the checkpoint's own modeling_qllm.py when it ships one (methods with run-time parts)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
windows = torch.load(sys.argv[2])
total, count = 0.0, 0
with torch.no_grad():
    for start in range(0, windows.shape[0], 4):
        ids = windows[start : start + 4]
        logits = model(ids).logits.float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
quantized = [m for m in linears if getattr(getattr(m, "quantization_scheme", None), "input_activations", None) is not None
             or m._forward_pre_hooks]  # compressed-tensors' input quantizer, or the shipped modeling code's
print(json.dumps({"ppl": math.exp(total / count), "input_quantized": len(quantized), "linear_count": len(linears)}))
