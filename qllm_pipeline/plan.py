"""`pipeline.plan_only=true`: the memory plan of a run from the model's architecture numbers, no weights loaded."""
from __future__ import annotations

from .lowrank import GIB, format_plan, memory_plan
from .model_loading import ModelSource, load_config

GPU_BYTES = 80 * 10**9  # one 80 GB GPU (A100/H100-80G)


def architecture(model_cfg: dict, source: ModelSource) -> dict:
    """The config group's `arch` block when present (works offline), else the model's own config."""
    if model_cfg.get("arch"):
        return dict(model_cfg["arch"])
    return arch_from_config(load_config(source))


def arch_from_config(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "max_position_embeddings", "vocab_size")
    return {k: getattr(config, k) for k in keys}


def model_params(arch: dict) -> int:
    h, i, layers, vocab = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"], arch["vocab_size"]
    kv = arch["num_key_value_heads"] * (h // arch["num_attention_heads"])
    block = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return layers * block + 2 * vocab * h + h


def print_plan(cfg: dict, source: ModelSource, arch: dict | None = None) -> dict:
    arch = arch or architecture(cfg["model"], source)
    half = cfg["model"].get("dtype", "float16") in ("float16", "bfloat16")
    nbytes = 2 if half else 4
    lrc = cfg["train_lowrank"]
    plan = memory_plan(
        arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"],
        cfg["calibrate"]["n_samples"], cfg["calibrate"]["seq_len"], lrc["rank"], weight_bytes=nbytes, act_bytes=nbytes,
        batch_size=lrc["batch_size"], train_norms=lrc["train_norms"],
    )
    host = model_params(arch) * nbytes
    streams = 3 * plan["cached_inputs_bytes"]  # quantized stream, FP stream, FP targets
    fits = plan["device_peak_bytes"] <= GPU_BYTES
    lines = [
        f"plan for model={cfg['model']['name']} quant={cfg['quant']['name']}: {arch['num_hidden_layers']} blocks, "
        f"{model_params(arch) / 1e9:.2f} B parameters",
        f"  whole model on CPU: {host / GIB:.1f} GiB; block streams on CPU (quantized, FP, targets): {streams / GIB:.1f} GiB",
        format_plan(plan),
        f"  fits one 80 GB GPU: {'yes' if fits else 'NO'} (device peak {plan['device_peak_bytes'] / GIB:.1f} GiB "
        f"of {GPU_BYTES / GIB:.1f} GiB)",
    ]
    print("\n".join(lines))
    return {"plan": plan, "host_model_bytes": host, "host_stream_bytes": streams, "fits_80gb": fits}
