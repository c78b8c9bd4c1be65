"""Memory plan of low-rank correction training for one decoder block (see qllm_pipeline.methods.lowrank): what must sit on
the device at once (the block, the trainable parameters with AdamW's state, one batch's activations), from the
model's shapes alone, so a run's peak is known before any weight is read."""
from __future__ import annotations

from qllm_pipeline.model.arch import LLAMA

GIB = 1024**3


def linear_shapes(hidden_size: int, intermediate_size: int, num_attention_heads: int, num_key_value_heads: int,
                  head_dim: int | None = None) -> dict:
    """(out, in) of each projection; `head_dim` when the config sets it apart from hidden/heads (Qwen3, Gemma-3)."""
    head_dim = head_dim or hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    h, i = hidden_size, intermediate_size
    shapes = {  # (out, in)
        "self_attn.q_proj": (num_attention_heads * head_dim, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, num_attention_heads * head_dim),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    assert tuple(shapes) == LLAMA.linears  # every family so far has LLaMA's projections (arch.FAMILIES)
    return shapes


def memory_plan(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    n_samples: int,
    seq_len: int,
    rank: int,
    weight_bytes: int = 2,
    act_bytes: int = 2,
    batch_size: int = 1,
    train_norms: bool = True,
    head_dim: int | None = None,
) -> dict:
    """Bytes needed to train the low-rank correction of one LLaMA decoder block, from config numbers only.

    weight_bytes: bytes per stored block weight (2 for fp16/bf16); act_bytes: bytes per activation element in the
    compute dtype (2 under bf16 autocast, 4 without) and per element of the cached inputs/targets.
    Reported (all in bytes):
      block_weight_bytes           the block's weights (7 projections + 2 norms) as stored;
      trainable_params             number of LoRA (+ norm) parameters;
      lora_optimizer_bytes         those parameters in fp32 with their gradient and two AdamW moments (16 B each);
      cached_inputs_bytes / cached_targets_bytes   block inputs and FP targets for all samples (may stay on CPU);
      weight_work_bytes            quantized-weight copies saved for backward (one per projection, compute dtype)
                                   plus fp32 temporaries of the largest projection (W+B·A, quantizer, weight grad);
      activation_bytes             estimate of one batch's forward+backward activations, including attention scores
                                   batch·heads·L·L in fp32 (scores and their gradient);
      batch_io_bytes               one batch of inputs and targets on the device;
      device_peak_bytes            what must be on the device at once with inputs/targets on CPU;
      device_peak_with_cache_bytes the same with all inputs/targets on the device.
    The activation numbers are estimates (eager/math attention; flash/SDPA kernels need less).
    """
    shapes = linear_shapes(hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim)
    h, i = hidden_size, intermediate_size
    head_dim = head_dim or hidden_size // num_attention_heads
    kv = num_key_value_heads * head_dim
    linear_params = sum(o * n for o, n in shapes.values())
    norm_params = 2 * h
    block_weight_bytes = (linear_params + norm_params) * weight_bytes
    lora_params = sum(rank * (o + n) for o, n in shapes.values())
    trainable = lora_params + (norm_params if train_norms else 0)
    lora_optimizer_bytes = trainable * 4 * 4  # fp32 param + grad + exp_avg + exp_avg_sq

    tokens_per_sample = seq_len * h
    cached_inputs_bytes = n_samples * tokens_per_sample * act_bytes
    cached_targets_bytes = n_samples * tokens_per_sample * act_bytes

    largest_linear = max(o * n for o, n in shapes.values())
    saved_weight_bytes = linear_params * act_bytes  # Q(W+B·A) cast to the compute dtype, saved by each F.linear
    weight_temp_bytes = largest_linear * 4 * 4  # fp32: W+B·A, quantizer intermediates (×2), weight gradient
    weight_work_bytes = saved_weight_bytes + weight_temp_bytes

    t = batch_size * seq_len  # tokens per batch
    # Hidden-width tensors: 2 RMSNorms (fp32 input and normalised output: 2×4 B each), 6 quantized linear inputs
    # (q, k, v, o, gate, up), q output + rotary q + attention output (3), and 2 fp32 per-token quantizer temporaries.
    hidden_bytes = t * h * (2 * 2 * 4 + 6 * act_bytes + 3 * act_bytes + 2 * 4)
    # Intermediate-width: gate and up outputs, silu(gate), product, quantized down input, fp32 quantizer temps (2).
    inter_bytes = t * i * (5 * act_bytes + 2 * 4)
    kv_bytes = t * kv * 4 * act_bytes  # k, v outputs and their rotary / repeated copies
    scores_bytes = batch_size * num_attention_heads * seq_len * seq_len * 4 * 2  # probabilities + their gradient, fp32
    activation_bytes = hidden_bytes + inter_bytes + kv_bytes + scores_bytes
    rotary_bytes = 2 * seq_len * head_dim * 4
    batch_io_bytes = 2 * t * h * act_bytes

    device_peak = block_weight_bytes + lora_optimizer_bytes + weight_work_bytes + activation_bytes + rotary_bytes + batch_io_bytes
    return {
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "rank": rank,
        "batch_size": batch_size,
        "block_params": linear_params + norm_params,
        "trainable_params": trainable,
        "block_weight_bytes": block_weight_bytes,
        "lora_optimizer_bytes": lora_optimizer_bytes,
        "cached_inputs_bytes": cached_inputs_bytes,
        "cached_targets_bytes": cached_targets_bytes,
        "weight_work_bytes": weight_work_bytes,
        "activation_bytes": activation_bytes,
        "attention_scores_bytes": scores_bytes,
        "batch_io_bytes": batch_io_bytes,
        "device_peak_bytes": device_peak,
        "device_peak_with_cache_bytes": device_peak + cached_inputs_bytes + cached_targets_bytes,
    }


def format_plan(plan: dict) -> str:
    """A short table of `memory_plan` in GiB."""
    rows = [
        ("block weights", plan["block_weight_bytes"], "device"),
        (f"LoRA r={plan['rank']} + AdamW (fp32, {plan['trainable_params']:,} params)", plan["lora_optimizer_bytes"], "device"),
        ("quantized-weight work", plan["weight_work_bytes"], "device"),
        (f"activations / batch of {plan['batch_size']} (est.)", plan["activation_bytes"], "device"),
        ("  of which attention scores", plan["attention_scores_bytes"], ""),
        ("batch inputs + targets", plan["batch_io_bytes"], "device"),
        (f"cached inputs ({plan['n_samples']}×{plan['seq_len']})", plan["cached_inputs_bytes"], "CPU"),
        (f"cached targets ({plan['n_samples']}×{plan['seq_len']})", plan["cached_targets_bytes"], "CPU"),
        ("device peak (cache on CPU)", plan["device_peak_bytes"], ""),
        ("device peak (cache on device)", plan["device_peak_with_cache_bytes"], ""),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [f"low-rank correction memory per block (hidden {plan['hidden_size']}, inter {plan['intermediate_size']})"]
    lines += [f"  {name:<{width}}  {value / GIB:9.3f} GiB  {where}".rstrip() for name, value, where in rows]
    return "\n".join(lines)
