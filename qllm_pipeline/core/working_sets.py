"""What one stage holds at its peak, in bytes, from the model's architecture numbers and the run's settings alone (no
weights read): the terms of the memory plan (qllm_pipeline.core.plan). Each formula follows the code it describes;
`benchmarks/memory.py` checks them against measured peaks on a block of LLaMA-2-70B's shape.

`arch` is a dict of the config numbers (`plan.arch_from_config`); `nbytes` the bytes per weight and stream element in
the model's dtype.
"""
from __future__ import annotations

import math

from qllm_pipeline.core.lrc_memory import linear_shapes
from qllm_pipeline.methods.e2e_tuning import HEAD_CHUNK_BYTES
from qllm_pipeline.methods.gptq import FACTOR_COLUMNS
from qllm_pipeline.model.arch import family_of_arch

MAX_SCORE_TOKENS = 4096  # tokens the reassembly scorer keeps (stages.search_theta)
SCORER_ROWS = 2048  # rows per block of the scorer's distance matrix (qllm_pipeline.quantized.reassembly)
# One decoder block's forward with autograd, per token, in float32: about 40 hidden- and 15 intermediate-wide
# tensors (norms, the fake quantizers' intermediates, attention, the SwiGLU), as measured on SmolLM2.
ACT_HIDDEN_PER_TOKEN, ACT_INTERMEDIATE_PER_TOKEN = 40, 15
# A fused projection whose scales are tuned keeps about three float32 copies of its weight for the backward
# (codes - zero, the dequantized weight, its cast), per projection of the block being run.
TUNED_WEIGHT_COPIES = 3
ADAMW_COPIES = 6  # a tuned value in float32: itself, its gradient, AdamW's two moments, the best state, a checkpoint


def shapes(arch: dict) -> dict[str, tuple[int, int]]:
    return linear_shapes(arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"],
                         arch["num_key_value_heads"], arch.get("head_dim"))


def linear_params(arch: dict) -> int:
    return sum(o * n for o, n in shapes(arch).values())


def block_params(arch: dict) -> int:
    return linear_params(arch) + 2 * arch["hidden_size"]


def skeleton_params(arch: dict) -> int:
    embeddings = arch["vocab_size"] * arch["hidden_size"]
    return embeddings * (1 if arch.get("tie_word_embeddings") else 2) + arch["hidden_size"]


def model_params(arch: dict) -> int:
    return arch["num_hidden_layers"] * block_params(arch) + skeleton_params(arch)


def fused_block_bytes(arch: dict, nbytes: int) -> int:
    """A fused block built from its artifact (qllm_pipeline.quantized.fused): each projection's dequantized weight in the
    model's dtype beside its integer codes (float32), the norms."""
    return linear_params(arch) * (nbytes + 4) + 2 * arch["hidden_size"] * nbytes


def collect_activations_working_set(arch: dict, batch_tokens: int, block_bytes: int) -> int:
    """The FP block and one batch's activations (hidden- and intermediate-wide, float32 maxima)."""
    return block_bytes + batch_tokens * (4 * arch["hidden_size"] + 3 * arch["intermediate_size"]) * 4


def search_theta_working_set(arch: dict, tokens: int, nbytes: int, block_bytes: int) -> dict:
    """Bytes the θ search of one block holds at its peak, per reassembly point (stages.search_theta).

    Held through the stage: the FP block and its FP inputs at the three points (h1, h2: hidden wide; z: intermediate
    wide). Per point: the quantized copy of the block its loss function runs (`block_bytes`), the point's FP target,
    the scorer's C × C float32 distance matrix, and while a θ is scored: the point's quantized weights (cached, compute
    dtype) plus float32 temporaries of its largest projection (transformed weight, codes, rounding: 3 copies), and the
    quantized input and output in float32 (3 copies of the input, 2 of the output)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    sh = shapes(arch)
    linears = family_of_arch(arch).point_linears
    points = {  # point -> (input channels C, projections, output width)
        "qkv": (h, linears["qkv"], h),
        "gate_up": (h, linears["gate_up"], i),
        "down": (i, linears["down"], h),
    }
    inputs = tokens * (2 * h + i) * nbytes
    out = {}
    for point, (c, linears, width) in points.items():
        weights = sum(sh[n][0] * sh[n][1] for n in linears)
        largest = max(sh[n][0] * sh[n][1] for n in linears)
        scored = min(tokens, MAX_SCORE_TOKENS)
        matrix = c * c * 4
        build = sum(sh[n][0] for n in linears) * c * 4 + scored * c * 4 + 3 * SCORER_ROWS * c * 4  # while built
        loss = weights * nbytes + 3 * largest * 4 + tokens * (3 * c + 2 * width) * 4
        target = tokens * width * nbytes
        out[point] = block_bytes + inputs + block_bytes + target + matrix + max(build, loss)
    return out


def gptq_working_set(arch: dict, block_bytes: int, fp_target: bool = False, accelerator: bool = True) -> int:
    """GPTQ rounding one input group of a block (qllm_pipeline.methods.weight_rounding, qllm_pipeline.methods.gptq), at the largest
    group: the block (the FP block too with gptq.fp_target) and the larger of
    - the factorization: the float64 K factorized in place and the float32 U it gives (8 + 4 bytes per C² entry), a
      slab of rows while K is built and the solved columns while U is (FACTOR_COLUMNS wide); the group's float32
      Hessian beside them on the CPU (on an accelerator it waits in host memory);
    - the sweep: the Hessian and U (4 + 4 per C² entry) and about six float32 copies of the weight (the merged weight,
      GPTQ's working copy and its permuted view, the codes, RTN's and GPTQ's dequantized weights for the report).
    With gptq.fp_target the cross term and its blend (2 × 4 per C² entry) and the float64 ridge solve (3 × 8) too."""
    sh = shapes(arch)
    worst = 0
    for group in family_of_arch(arch).input_groups:
        c = sh[group[0]][1]
        out = max(sh[name][0] for name in group)
        slabs = 4 * FACTOR_COLUMNS * c * 8
        factor = c * c * (8 + 4) + slabs + (0 if accelerator else c * c * 4)
        sweep = c * c * (4 + 4) + 6 * out * c * 4
        extra = c * c * (2 * 4 + 3 * 8) if fp_target else 0
        worst = max(worst, max(factor, sweep) + extra)
    return (2 if fp_target else 1) * block_bytes + worst


def e2e_values(arch: dict, tunes_scales: bool, tunes_clips: bool, tunes_norms: bool, group_size: int | None) -> int:
    """How many values tune_e2e trains: a scale per row (and group) of every projection, a clip ratio per
    projection, the norm weights."""
    per_block = 0
    if tunes_scales:
        per_block += sum(o * (n // group_size if group_size else 1) for o, n in shapes(arch).values())
    per_block += 7 if tunes_clips else 0
    per_block += 2 * arch["hidden_size"] if tunes_norms else 0
    return arch["num_hidden_layers"] * per_block


def e2e_block_working_set(arch: dict, batch_tokens: int, nbytes: int) -> int:
    """One fused block run forward and backward with its scales tuned: the block, its tuned projections' float32
    weight copies, one batch's activations (float32) and the block's input, output and their gradients."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    activations = batch_tokens * (ACT_HIDDEN_PER_TOKEN * h + ACT_INTERMEDIATE_PER_TOKEN * i) * 4
    return fused_block_bytes(arch, nbytes) + TUNED_WEIGHT_COPIES * linear_params(arch) * 4 + activations \
        + 4 * batch_tokens * h * 4


def e2e_head_working_set(arch: dict, batch_tokens: int, nbytes: int, heads: int) -> int:
    """The final norm and lm_head of the student and of the FP teacher (`heads` = 2 when they differ, with the
    rotate stage; 1 when they are the same modules), and the logits of one chunk of tokens in float32 (both models'
    logits, their log-softmaxes and the gradient: 5 copies)."""
    weights = heads * (arch["vocab_size"] + 1) * arch["hidden_size"] * nbytes
    logits = min(batch_tokens * arch["vocab_size"] * 4, max(HEAD_CHUNK_BYTES, arch["vocab_size"] * 4))
    return weights + 5 * logits


def e2e_working_set(arch: dict, batch_tokens: int, nbytes: int, mode: str, heads: int = 2) -> int:
    """tune_e2e's device working set: streamed, one block and the heads; whole, every block with its activations
    (one autograd graph over the model) and the heads."""
    blocks = 1 if mode == "streamed" else arch["num_hidden_layers"]
    return blocks * e2e_block_working_set(arch, batch_tokens, nbytes) \
        + e2e_head_working_set(arch, batch_tokens, nbytes, heads)


def e2e_host_terms(arch: dict, n_samples: int, seq_len: int, batch_tokens: int, nbytes: int, values: int,
                   keep_blocks: bool, spill_inputs: bool, mode: str) -> dict[str, int]:
    """tune_e2e's host memory beside the process and the skeletons: the teacher's final hidden states on every
    window, the trained values (`ADAMW_COPIES` float32 each), a batch's block inputs (streamed, unless spilled), the
    fused blocks (kept between passes, or one being built: the FP block read, its copy and the fused block)."""
    layers, h = arch["num_hidden_layers"], arch["hidden_size"]
    fused = fused_block_bytes(arch, nbytes)
    return {
        "teacher states": n_samples * seq_len * h * nbytes,
        "tuned values": values * 4 * ADAMW_COPIES,
        "block inputs": 0 if spill_inputs or mode == "whole" else layers * batch_tokens * h * nbytes,
        "fused blocks": layers * fused if keep_blocks or mode == "whole" else 2 * block_params(arch) * nbytes + fused,
    }


def evaluate_working_set(arch: dict, eval_batch: int, eval_seq: int, block_bytes: int) -> int:
    """A batch's logits in float32 and their log-softmax, then the block being run."""
    return max(2 * eval_batch * eval_seq * arch["vocab_size"] * 4, 2 * block_bytes)


def rotate_working_set(arch: dict, block_bytes: int) -> int:
    """The rotation Q (float32), and a block rotated on request: the loaded block, the rotated one kept for the next
    request and the copy handed out."""
    return arch["hidden_size"] ** 2 * 4 + 3 * block_bytes


def fuse_working_set(arch: dict, block_bytes: int, nbytes: int) -> int:
    """Round-to-nearest fusing: the block being fused and the fused block with its codes."""
    return block_bytes + fused_block_bytes(arch, nbytes)


def eval_windows(max_windows: int | None, seq_len: int, test_tokens: int) -> int:
    return max_windows or math.ceil(test_tokens / seq_len)
