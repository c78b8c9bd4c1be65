"""`pipeline.plan_only=true`: the memory plan of a run from the model's architecture numbers, no weights loaded.

What a run holds, by where it lives (the terms follow the code; `benchmarks/memory.py` checks them against
measured peaks):

* resident on the host for the whole run: the Python process (`RUNTIME_BYTES`), the skeleton (embeddings, final
  norm, lm_head) and the calibration streams: the quantized stream, the FP stream / targets when a stage trains
  against them, and the next block's output, each n_samples × seq_len × hidden. A model loaded whole (GGUF, or
  model.load=whole) adds every block; a streamed one holds the blocks being worked on only;
* per stage, the working set of one block on the compute device (`stage_working_sets`); on a CPU run that is host
  memory too, next to the FP block the stages read from;
* evaluation: each variant's stream over the evaluation windows (the variants of one model stream side by side).
"""
from __future__ import annotations

import math

from .lrc_memory import GIB, format_plan, linear_shapes, memory_plan
from .model_loading import ModelSource, load_config, streams

GPU_BYTES = 80 * 10**9  # one 80 GB GPU (A100/H100-80G)
HOST_BUDGET_BYTES = 32 * 10**9  # the host the issue asks 70B to run on
RUNTIME_BYTES = int(0.7 * GIB)  # the Python process of a run before its model: torch, transformers, hydra, lm-eval, the tokenizer, the corpus (measured 0.68 GiB)
# Evaluation windows when eval.max_windows is null: WikiText2's test split is 341,469 LLaMA tokens (166 × 2048).
WIKITEXT2_TEST_TOKENS = 341_469
MAX_SCORE_TOKENS = 4096  # tokens the reassembly scorer keeps (stages.search_theta)
SCORER_ROWS = 2048  # rows per block of the scorer's distance matrix (qllm_pipeline.reassembly)
RUNS_FP_BLOCK = {"collect_activations", "search_theta"}  # stages whose working set includes the FP block itself


def architecture(model_cfg: dict, source: ModelSource) -> dict:
    """The config group's `arch` block when present (works offline), else the model's own config."""
    if model_cfg.get("arch"):
        return dict(model_cfg["arch"])
    return arch_from_config(load_config(source))


def arch_from_config(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "max_position_embeddings", "vocab_size")
    out = {k: getattr(config, k) for k in keys}
    out["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    return out


def block_params(arch: dict) -> int:
    shapes = linear_shapes(arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"],
                            arch["num_key_value_heads"])
    return sum(o * n for o, n in shapes.values()) + 2 * arch["hidden_size"]


def skeleton_params(arch: dict) -> int:
    embeddings = arch["vocab_size"] * arch["hidden_size"]
    return embeddings * (1 if arch.get("tie_word_embeddings") else 2) + arch["hidden_size"]


def model_params(arch: dict) -> int:
    return arch["num_hidden_layers"] * block_params(arch) + skeleton_params(arch)


def search_theta_working_set(arch: dict, tokens: int, nbytes: int, block_bytes: int) -> dict:
    """Bytes the θ search of one block holds at its peak, per reassembly point (stages.search_theta).

    Held through the stage: the FP block and its FP inputs at the three points (h1, h2: hidden wide; z: intermediate
    wide). Per point: the quantized copy of the block its loss function runs (`block_bytes`), the point's FP target,
    the scorer's C × C float32 distance matrix, and while a θ is scored: the point's quantized weights (cached, compute
    dtype) plus float32 temporaries of its largest projection (transformed weight, codes, rounding: 3 copies), and the
    quantized input and output in float32 (3 copies of the input, 2 of the output)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    shapes = linear_shapes(h, i, arch["num_attention_heads"], arch["num_key_value_heads"])
    points = {  # point -> (input channels C, projections, output width)
        "qkv": (h, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), h),
        "gate_up": (h, ("mlp.gate_proj", "mlp.up_proj"), i),
        "down": (i, ("mlp.down_proj",), h),
    }
    inputs = tokens * (2 * h + i) * nbytes
    out = {}
    for point, (c, linears, width) in points.items():
        weights = sum(shapes[n][0] * shapes[n][1] for n in linears)
        largest = max(shapes[n][0] * shapes[n][1] for n in linears)
        scored = min(tokens, MAX_SCORE_TOKENS)
        matrix = c * c * 4
        build = sum(shapes[n][0] for n in linears) * c * 4 + scored * c * 4 + 3 * SCORER_ROWS * c * 4  # while built
        loss = weights * nbytes + 3 * largest * 4 + tokens * (3 * c + 2 * width) * 4
        target = tokens * width * nbytes
        out[point] = block_bytes + inputs + block_bytes + target + matrix + max(build, loss)
    return out


def gptq_working_set(arch: dict, block_bytes: int, fp_target: bool = False) -> int:
    """GPTQ rounding one projection group (qllm_pipeline.gptq): the block, the group's float64 Hessian with its working
    copies (sum, permuted copy, Cholesky factor, inverse: 4 × C² × 8) and the weight in float64 twice. With
    gptq.fp_target: the FP block too, and the cross term, the ridge matrix and its factor (3 × C² × 8 more)."""
    h, i = arch["hidden_size"], arch["intermediate_size"]
    shapes = linear_shapes(h, i, arch["num_attention_heads"], arch["num_key_value_heads"])
    squares = 7 if fp_target else 4
    worst = max(squares * n * n * 8 + 2 * o * n * 8 for o, n in shapes.values())
    return (3 if fp_target else 2) * block_bytes + worst


def e2e_working_set(arch: dict, cfg: dict, nbytes: int) -> int:
    """tune_e2e holds the whole quantized model and the FP teacher; what a batch's backward keeps: per block and
    token about 40 hidden- and 15 intermediate-wide float32 tensors (the fake quantizers' intermediates), and about
    three float32 copies of every projection's weight (its dequantization from codes and tuned scales); and the
    logits (student, teacher, their log-softmaxes and the gradient). Measured on SmolLM2-135M (16 × 512 windows,
    batch 1): peak RSS 7.2 GiB for the whole run; this plan gives 5.3 GiB for the stage plus 1.4 GiB resident."""
    tokens = int((cfg.get("tune_e2e") or {}).get("batch_size", 1)) * int(cfg["calibrate"]["seq_len"])
    layers = arch["num_hidden_layers"]
    activations = layers * tokens * (40 * arch["hidden_size"] + 15 * arch["intermediate_size"]) * 4
    weights = 3 * layers * block_params(arch) * 4
    logits = 5 * tokens * arch["vocab_size"] * 4
    return 2 * model_params(arch) * nbytes + weights + activations + logits


def dtype_bytes(cfg: dict) -> int:
    """Bytes per weight and stream element in the model's dtype."""
    return 2 if cfg["model"].get("dtype", "float16") in ("float16", "bfloat16") else 4


def run_plan(cfg: dict, arch: dict, device_type: str, streamed: bool = True) -> dict:
    """Host and device peaks of a run (bytes), from config and architecture numbers (see the module doc)."""
    nbytes = dtype_bytes(cfg)
    stages = set(cfg["pipeline"]["stages"])
    n, seq = cfg["calibrate"]["n_samples"], cfg["calibrate"]["seq_len"]
    h = arch["hidden_size"]
    block = block_params(arch) * nbytes
    lrc_on = "train_lowrank" in stages and cfg["train_lowrank"].get("enabled", True)
    gptq_on = cfg["quant"].get("weight_algorithm") == "gptq" and cfg["quant"].get("wbits") is not None
    gptq_fp = gptq_on and bool((cfg.get("gptq") or {}).get("fp_target") or 0)
    stream = n * seq * h * nbytes
    resident = {
        "runtime": RUNTIME_BYTES,
        # the rotate stage keeps a rotated copy of the skeleton beside the loaded one (its blocks are rotated on request)
        "skeleton": skeleton_params(arch) * nbytes * (2 if "rotate" in stages else 1),
        "streams": (3 if lrc_on or gptq_fp else 2) * stream,  # quantized stream, FP targets, the next block's output
        "blocks held whole": 0 if streamed else arch["num_hidden_layers"] * block,
    }
    batch_tokens = int(cfg["pipeline"].get("batch_size", 1)) * seq
    # collect_activations: the FP block and one batch's activations (hidden- and intermediate-wide, float32 maxima)
    work = {"collect_activations": block + batch_tokens * (4 * h + 3 * arch["intermediate_size"]) * 4} \
        if "collect_activations" in stages else {}
    if "search_theta" in stages and cfg["quant"].get("abits") is not None:
        tokens = min(int(cfg["search_theta"]["n_samples"]), n) * seq
        work["search_theta"] = max(search_theta_working_set(arch, tokens, nbytes, block).values())
    lrc = cfg["train_lowrank"]
    lrc_plan = memory_plan(h, arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"], n, seq,
                           lrc["rank"], weight_bytes=nbytes, act_bytes=nbytes, batch_size=lrc["batch_size"],
                           train_norms=lrc["train_norms"])
    if lrc_on:
        work["train_lowrank"] = lrc_plan["device_peak_bytes"]
    if gptq_on:
        work["gptq"] = gptq_working_set(arch, block, gptq_fp)
    if "tune_e2e" in stages and (cfg["quant"].get("wbits") is not None or cfg["quant"].get("abits") is not None):
        work["tune_e2e"] = e2e_working_set(arch, cfg, nbytes)
    ev = cfg.get("eval", {})
    eval_seq = int(ev.get("seq_len", seq))
    windows = ev.get("max_windows") or math.ceil(WIKITEXT2_TEST_TOKENS / eval_seq)
    eval_streams = 3 * windows * eval_seq * h * nbytes if "evaluate" in stages else 0  # two variants + the output
    if "evaluate" in stages:  # a batch's logits in float32 and their log-softmax, then the block being run
        logits = 2 * int(ev.get("batch_size", 1)) * eval_seq * arch["vocab_size"] * 4
        work["evaluate"] = max(logits, 2 * block)
    base = sum(resident.values())
    if device_type == "cpu":  # the working sets are host memory too, beside the FP block the block state holds
        # (collect_activations and search_theta run that very block: "moving it to the device" copies nothing)
        per_stage = {name: base + ws + (0 if name in RUNS_FP_BLOCK else block) for name, ws in work.items()
                     if name != "evaluate"}
        if "evaluate" in work:
            per_stage["evaluate"] = base - resident["streams"] + eval_streams + work["evaluate"]
        device_peak = 0
    else:  # host: the FP block as read and one copy on its way to the device
        per_stage = {name: base + 2 * block for name in work if name != "evaluate"}
        if "tune_e2e" in work:  # both whole models are built on the host, then moved
            per_stage["tune_e2e"] = base + 2 * model_params(arch) * nbytes
        if "evaluate" in work:
            per_stage["evaluate"] = base - resident["streams"] + eval_streams + 2 * block
        device_peak = max(work.values(), default=block)
    host_peak = max(per_stage.values())
    return {"resident": resident, "stage_working_sets": work, "host_per_stage": per_stage, "host_peak_bytes": host_peak,
            "device_peak_bytes": device_peak, "block_bytes": block, "stream_bytes": stream,
            "eval_stream_bytes": eval_streams, "lrc": lrc_plan, "streamed": streamed, "device": device_type}


def print_plan(cfg: dict, source: ModelSource, arch: dict | None = None, device_type: str | None = None) -> dict:
    arch = arch or architecture(cfg["model"], source)
    device_type = device_type or ("cpu" if cfg["pipeline"].get("device") == "cpu" else "cuda")
    streamed = streams(source)
    plan = run_plan(cfg, arch, device_type, streamed)
    lrc = plan["lrc"]
    whole = model_params(arch) * dtype_bytes(cfg)
    fits = lrc["device_peak_bytes"] <= GPU_BYTES and plan["device_peak_bytes"] <= GPU_BYTES
    res = plan["resident"]
    lines = [
        f"plan for model={cfg['model']['name']} quant={cfg['quant']['name']}: {arch['num_hidden_layers']} blocks, "
        f"{model_params(arch) / 1e9:.2f} B parameters ({whole / GIB:.1f} GiB in {cfg['model'].get('dtype')})",
        f"  model in host memory: {'one block at a time (streamed from safetensors)' if streamed else 'whole'}; "
        f"skeleton {res['skeleton'] / GIB:.2f} GiB, block {plan['block_bytes'] / GIB:.2f} GiB",
        f"  block streams on CPU (quantized, FP targets, next output): {res['streams'] / GIB:.1f} GiB; "
        f"evaluation streams {plan['eval_stream_bytes'] / GIB:.1f} GiB",
        format_plan(lrc),
        "  working set per block on the " + ("CPU" if device_type == "cpu" else "device") + ": "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan["stage_working_sets"].items()),
        "  host peak per stage: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan["host_per_stage"].items()),
        f"  host peak: {plan['host_peak_bytes'] / GIB:.1f} GiB ({plan['host_peak_bytes'] / 1e9:.1f} GB; "
        f"{'within' if plan['host_peak_bytes'] <= HOST_BUDGET_BYTES else 'ABOVE'} a 32 GB host)",
    ]
    if device_type != "cpu":
        lines.append(f"  device peak: {plan['device_peak_bytes'] / GIB:.1f} GiB ({plan['device_peak_bytes'] / 1e9:.1f} GB)")
        lines.append(f"  fits one 80 GB GPU: {'yes' if fits else 'NO'} (device peak "
                     f"{max(lrc['device_peak_bytes'], plan['device_peak_bytes']) / GIB:.1f} GiB of {GPU_BYTES / GIB:.1f} GiB)")
    print("\n".join(lines))
    return {**plan, "plan": lrc, "host_model_bytes": whole, "fits_80gb": fits}
