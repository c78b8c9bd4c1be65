"""Perplexity of a checkpoint served by vLLM: what a user of the checkpoint runs. Imports nothing of ours.

Run it with the Python of an environment that has vLLM (benchmarks/vllm_check.py does):
    VLLM_PYTHON benchmarks/vllm_ppl.py MODEL_DIR WINDOWS.pt [DTYPE]     (DTYPE: float32 (default) or bfloat16)
        -> one json line {"ppl", "tokens", "schemes", "seconds"}, or exit code 1 with vLLM's error on stderr
WINDOWS.pt holds a [n, seq_len] token tensor; ppl = exp(mean next-token NLL over all predicted positions), the
pipeline's protocol. vLLM gives the NLL as prompt logprobs (prompt_logprobs=0: the logprob of each actual token).
"""
import json
import math
import os
import sys
import time

# keep the engine in this process, so that apply_model can read which quantized kernels vLLM chose
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


def schemes(model) -> list[str]:
    """The compressed-tensors scheme of each quantized linear, by class name (e.g. CompressedTensorsW8A8Int8)."""
    return sorted({type(m.scheme).__name__ for m in model.modules() if getattr(m, "scheme", None) is not None})


def main() -> None:
    model_dir, windows = sys.argv[1], torch.load(sys.argv[2])
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float32"
    start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=windows.shape[1] + 1, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.15)  # on the CPU backend: the share of host memory it reserves
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for window, out in zip(windows.tolist(), outputs):
        for token, logprobs in zip(window[1:], out.prompt_logprobs[1:]):  # the first token has no prediction
            nll -= logprobs[token].logprob
            count += 1
    try:
        used = sorted({s for worker in llm.apply_model(schemes) for s in worker})
    except Exception as exc:  # older vLLM without apply_model: the perplexity still stands
        used = [f"unknown ({type(exc).__name__})"]
    print(json.dumps({"ppl": math.exp(nll / count), "tokens": count, "schemes": used,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
