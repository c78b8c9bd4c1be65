"""The memory plan of a run, from the model's architecture numbers and the settings, with no weight read; and the
check that refuses a run whose plan does not fit before any weight is read.

What a run holds, by where it lives (each stage's working set: qllm_pipeline.core.working_sets):

* resident on the host for the whole run: the Python process (`RUNTIME_BYTES`), the skeleton (embeddings, final
  norm, lm_head; twice with the rotate stage) and, while the blocks are walked, the calibration streams: the
  quantized stream, the FP stream / targets when a stage trains against them, and the next block's output, each
  n_samples × seq_len × hidden. A model loaded whole (GGUF, or model.load=whole) adds every block; a streamed one
  holds the blocks being worked on only;
* per stage, its working set on the compute device; on a CPU run that is host memory too; the first load of a GGUF
  file holds the weights once more while it writes their float copy (stage `load`);
* the stages after the blocks hold no block streams: tune_e2e its teacher states, inputs and fused blocks
  (`working_sets.e2e_host_terms`), evaluation each variant's stream over the evaluation windows.

`pipeline.plan_only=true` prints the plan and stops. Every run checks it first (`check_fits`): a plan above the
device's memory or the host's available memory ends the run with one error line naming the stage and the setting
that brings it down; `pipeline.memory_check=false` runs anyway.
"""
from __future__ import annotations

import logging

import psutil
import torch

from qllm_pipeline.core.distributed import World, env_world
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.lrc_memory import GIB, format_plan, memory_plan
from qllm_pipeline.core.working_sets import (
    block_params,
    collect_activations_working_set,
    e2e_host_terms,
    e2e_values,
    e2e_working_set,
    eval_windows,
    evaluate_working_set,
    fuse_working_set,
    fused_block_bytes,
    gptq_working_set,
    model_params,
    rotate_working_set,
    search_theta_working_set,
    skeleton_params,
)
from qllm_pipeline.methods.e2e_tuning import resolved_settings
from qllm_pipeline.methods.weight_rounding import weight_rounding
from qllm_pipeline.model.model_loading import ModelSource, load_config, streams, writes_float_copy

log = logging.getLogger(__name__)

GPU_BYTES = 80 * 10**9  # one 80 GB GPU (A100/H100-80G): the device a plan-only run is checked against by default
HOST_BUDGET_BYTES = 32 * 10**9  # the host a plan-only run is checked against by default
RUNTIME_BYTES = int(0.7 * GIB)  # the Python process of a run before its model: torch, transformers, hydra, lm-eval, the tokenizer, the corpus (measured 0.68 GiB)
# Evaluation windows when eval.max_windows is null: WikiText2's test split is 341,469 LLaMA tokens (166 × 2048).
WIKITEXT2_TEST_TOKENS = 341_469
HOST_STAGES = {"calibrate", "rotate"}  # stages that run on the host whatever the device
RUNS_FP_BLOCK = {"collect_activations", "search_theta", "reassemble"}  # stages whose working set includes the FP block itself
# The setting that brings each stage's memory down, for the refusal's message.
REMEDY = {
    "calibrate": "lower calibrate.n_samples or calibrate.seq_len",
    "rotate": "lower calibrate.n_samples or calibrate.seq_len",
    "collect_activations": "lower pipeline.batch_size",
    "smooth": "lower calibrate.n_samples or calibrate.seq_len",
    "search_theta": "lower search_theta.n_samples",
    "reassemble": "lower search_theta.n_samples",
    "train_lowrank": "lower train_lowrank.batch_size or calibrate.seq_len",
    "fuse": "lower calibrate.n_samples or calibrate.seq_len",
    "gptq": "set gptq.fp_target=0, or quant.weight_algorithm=rtn",
    "tune_e2e": "lower tune_e2e.batch_size or calibrate.n_samples",
    "evaluate": "lower eval.max_windows or eval.batch_size",
    "load": "set QLLM_GGUF_CACHE=off (the GGUF file is then read on every run instead of a float copy)",
}


def architecture(model_cfg: dict, source: ModelSource) -> dict:
    """The config group's `arch` block when present (works offline), else the model's own config."""
    if model_cfg.get("arch"):
        return dict(model_cfg["arch"])
    return arch_from_config(load_config(source))


def model_config(model_cfg: dict, source: ModelSource):
    """The transformers config the plan's checks read (family, widths): built from the `arch` block when present
    (offline), else the model's own."""
    if not model_cfg.get("arch"):
        return load_config(source)
    from transformers import AutoConfig

    arch = dict(model_cfg["arch"])
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def arch_from_config(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
            "max_position_embeddings", "vocab_size")
    out = {k: getattr(config, k) for k in keys}
    out["tie_word_embeddings"] = bool(getattr(config, "tie_word_embeddings", False))
    if getattr(config, "head_dim", None):  # set apart from hidden/heads by Qwen3 and Gemma-3
        out["head_dim"] = int(config.head_dim)
    out["model_type"] = config.model_type
    return out


def dtype_bytes(cfg: dict) -> int:
    """Bytes per weight and stream element in the model's dtype."""
    return 2 if cfg["model"]["dtype"] in ("float16", "bfloat16") else 4


def _e2e_settings(cfg: dict) -> dict:
    e2e = {**(cfg.get("tune_e2e") or {}), **resolved_settings(cfg)} if cfg.get("tune_e2e") else {}
    scale_lr = e2e.get("scale_lr", 0)
    quant = cfg["quant"]
    return {"mode": e2e.get("mode", "streamed"), "batch_tokens": int(e2e.get("batch_size", 1)) * int(cfg["calibrate"]["seq_len"]),
            "heads": 2 if "rotate" in cfg["pipeline"]["stages"] else 1,  # the rotated student's head is its own
            "values": lambda arch: e2e_values(arch, bool(scale_lr) and quant.get("wbits") is not None,
                                              bool(e2e.get("act_clip_lr")) and quant.get("abits") is not None,
                                              bool(e2e.get("norm_lr")), quant.get("group_size"))}


def e2e_host(cfg: dict, arch: dict, device_type: str, keep_blocks: bool, spill_inputs: bool) -> tuple[int, dict]:
    """tune_e2e's host peak (bytes) with the given layout, and its terms."""
    nbytes, settings = dtype_bytes(cfg), _e2e_settings(cfg)
    terms = {"runtime": RUNTIME_BYTES, "skeleton": _skeleton_bytes(cfg, arch, nbytes),
             **e2e_host_terms(arch, cfg["calibrate"]["n_samples"], cfg["calibrate"]["seq_len"], settings["batch_tokens"],
                              nbytes, settings["values"](arch), keep_blocks, spill_inputs, settings["mode"])}
    if device_type == "cpu":  # the device's working set is host memory; the fused blocks and the heads (the
        # skeletons' own modules) are counted already
        heads = settings["heads"] * (arch["vocab_size"] + 1) * arch["hidden_size"] * nbytes
        terms["working set"] = e2e_working_set(arch, settings["batch_tokens"], nbytes, settings["mode"], settings["heads"]) \
            - (arch["num_hidden_layers"] if settings["mode"] == "whole" else 1) * fused_block_bytes(arch, nbytes) - heads
    return sum(terms.values()), terms


def e2e_execution(cfg: dict, arch: dict, device_type: str, host_budget: int | None) -> dict:
    """How tune_e2e uses the host: keep every fused block between passes when the host has room for them (else
    rebuild each from its artifact on every pass), and spill a batch's block inputs to disk only when the host has no
    room for them. `host_budget` None: no limit known, keep everything."""
    if _e2e_settings(cfg)["mode"] == "whole":  # every block on the device at once: nothing to stream
        return {"keep_blocks": True, "spill_inputs": False}

    def fits(keep: bool, spill: bool) -> bool:
        return host_budget is None or e2e_host(cfg, arch, device_type, keep, spill)[0] <= host_budget

    for keep, spill in ((True, False), (False, False), (False, True)):
        if fits(keep, spill):
            return {"keep_blocks": keep, "spill_inputs": spill}
    return {"keep_blocks": False, "spill_inputs": True}  # the least it can hold; the run-time check refused or was overridden


def _skeleton_bytes(cfg: dict, arch: dict, nbytes: int) -> int:
    # the rotate stage keeps a rotated copy of the skeleton beside the loaded one (its blocks are rotated on request)
    return skeleton_params(arch) * nbytes * (2 if "rotate" in cfg["pipeline"]["stages"] else 1)


def run_plan(cfg: dict, arch: dict, device_type: str, streamed: bool = True, host_budget: int | None = None,
             float_copy: bool = False) -> dict:
    """Host and device peaks of a run (bytes), from config and architecture numbers (see the module doc), with every
    selected stage's working set and host peak. `float_copy`: the load writes a GGUF file's float copy
    (qllm_pipeline.model.gguf_copy), whose serialization holds the weights once more (checked by hand with psutil: +501 MiB for
    SmolLM2-135M's 513 MiB of fp32 weights)."""
    nbytes = dtype_bytes(cfg)
    stages = list(cfg["pipeline"]["stages"])
    quant = cfg["quant"]
    ranks = plan_ranks(cfg)
    # Under data parallelism each rank streams its shard of the windows (the largest shard: qllm_pipeline.core.distributed)
    n_all, seq = cfg["calibrate"]["n_samples"], cfg["calibrate"]["seq_len"]
    n = largest_shard(n_all, int(cfg["pipeline"]["batch_size"]), ranks)
    h = arch["hidden_size"]
    block = block_params(arch) * nbytes
    quantized = quant.get("wbits") is not None or quant.get("abits") is not None
    lrc_on = "train_lowrank" in stages and cfg["train_lowrank"]["enabled"] and quant.get("wbits") is not None
    gptq_on = weight_rounding(cfg).reads_inputs and quant.get("wbits") is not None
    gptq_fp = gptq_on and bool((cfg.get("gptq") or {}).get("fp_target") or 0)
    stream = n * seq * h * nbytes
    resident = {
        "runtime": RUNTIME_BYTES,
        "skeleton": _skeleton_bytes(cfg, arch, nbytes),
        "streams": (3 if lrc_on or gptq_fp else 2) * stream,  # quantized stream, FP targets, the next block's output
        "blocks held whole": 0 if streamed else arch["num_hidden_layers"] * block,
    }
    batch_tokens = int(cfg["pipeline"]["batch_size"]) * seq
    lrc = cfg["train_lowrank"]
    lrc_plan = memory_plan(h, arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"], n, seq,
                           lrc["rank"], weight_bytes=nbytes, act_bytes=nbytes, batch_size=lrc["batch_size"],
                           train_norms=lrc["train_norms"], head_dim=arch.get("head_dim"))
    gptq = gptq_working_set(arch, block, gptq_fp, accelerator=device_type != "cpu") if gptq_on else 0
    work = {}  # per selected stage, its working set on the compute device (bytes)
    for name in stages:
        if name in ("calibrate", "smooth"):
            work[name] = block if name == "smooth" else 0
        elif name == "rotate":  # on the host whatever the device (the blocks are rotated as they are read)
            work[name] = rotate_working_set(arch, block)
        elif name == "collect_activations":
            work[name] = collect_activations_working_set(arch, batch_tokens, block)
        elif name in ("search_theta", "reassemble") and quant.get("abits") is not None:
            tokens = min(int(cfg["search_theta"]["n_samples"]), n_all) * seq  # gathered on every rank
            work[name] = max(search_theta_working_set(arch, tokens, nbytes, block).values())
        elif name == "train_lowrank" and lrc_on:  # GPTQ rounds the base it refines first
            work[name] = max(lrc_plan["device_peak_bytes"], gptq)
        elif name == "fuse":
            work[name] = gptq if gptq_on and not lrc_on else fuse_working_set(arch, block, nbytes)
        elif name == "tune_e2e" and quantized:
            settings = _e2e_settings(cfg)
            work[name] = e2e_working_set(arch, settings["batch_tokens"], nbytes, settings["mode"], settings["heads"])
        elif name == "evaluate":
            ev = cfg.get("eval", {})
            work[name] = evaluate_working_set(arch, int(ev.get("batch_size", 1)), int(ev.get("seq_len", seq)), block)
    ev = cfg.get("eval", {})
    eval_seq = int(ev.get("seq_len", seq))
    windows = largest_shard(eval_windows(ev.get("max_windows"), eval_seq, WIKITEXT2_TEST_TOKENS), int(ev.get("batch_size", 1)), ranks)
    eval_streams = 3 * windows * eval_seq * h * nbytes if "evaluate" in stages else 0  # two variants + the output
    base = sum(resident.values())
    e2e_layout, e2e_terms = None, {}
    per_stage = {}
    if float_copy and not streamed:
        model_bytes = skeleton_params(arch) * nbytes + arch["num_hidden_layers"] * block
        per_stage["load"] = RUNTIME_BYTES + 2 * model_bytes
    for name, ws in work.items():
        if name == "evaluate":
            per_stage[name] = base - resident["streams"] + eval_streams + (ws if device_type == "cpu" else 2 * block)
        elif name == "tune_e2e":
            e2e_layout = e2e_execution(cfg, arch, device_type, host_budget)
            per_stage[name], e2e_terms = e2e_host(cfg, arch, device_type, e2e_layout["keep_blocks"],
                                                  e2e_layout["spill_inputs"])
            per_stage[name] += resident["blocks held whole"]
        elif name in HOST_STAGES:  # before the blocks (no block streams yet), on the host: the rotation of a block
            per_stage[name] = base - resident["streams"] + ws
        elif device_type == "cpu":  # the working set is host memory too, beside the FP block the block state holds
            # (collect_activations, search_theta and reassemble run that very block: "moving it to the device" copies nothing)
            per_stage[name] = base + ws + (0 if name in RUNS_FP_BLOCK else block)
        else:  # host: the FP block as read and one copy on its way to the device
            per_stage[name] = base + 2 * block
    on_device = {k: v for k, v in work.items() if k not in HOST_STAGES}
    device_peak = 0 if device_type == "cpu" else max(on_device.values(), default=block)
    return {"resident": resident, "stage_working_sets": work, "host_per_stage": per_stage,
            "host_peak_bytes": max(per_stage.values(), default=base), "device_peak_bytes": device_peak,
            "block_bytes": block, "stream_bytes": stream, "eval_stream_bytes": eval_streams, "lrc": lrc_plan,
            "e2e_layout": e2e_layout, "e2e_host_terms": e2e_terms, "e2e_mode": _e2e_settings(cfg)["mode"],
            "streamed": streamed, "device": device_type, "ranks": ranks, "windows_per_rank": n}


def plan_ranks(cfg: dict) -> int:
    """The data-parallel ranks a plan is for: pipeline.ranks, else torchrun's (1 without it)."""
    return int(cfg["pipeline"].get("ranks") or env_world().size)


def largest_shard(n: int, batch_size: int, ranks: int) -> int:
    """Windows of the rank holding the most of n, dealt in whole batches (distributed.World.shard)."""
    return max(part.stop - part.start for part in World(0, ranks).shards(n, batch_size))


def memory_budget(cfg: dict, device: torch.device | str) -> dict:
    """The memory a run may use, in bytes: `pipeline.device_memory_gb` / `pipeline.host_memory_gb` when set, else the
    device's total memory (None on a CPU: its working sets are host memory) and the host's available memory now."""
    pipeline = cfg["pipeline"]
    device = torch.device(device)
    device_bytes = None
    if device.type != "cpu":
        if pipeline.get("device_memory_gb") is not None:
            device_bytes = int(pipeline["device_memory_gb"] * 10**9)
        elif torch.cuda.is_available():
            device_bytes = torch.cuda.get_device_properties(device).total_memory
        else:
            device_bytes = GPU_BYTES  # a plan for a device this machine does not have
    host = pipeline.get("host_memory_gb")
    host_bytes = int(host * 10**9) if host is not None else psutil.virtual_memory().available
    return {"device": device_bytes, "host": host_bytes,
            "device_source": "that pipeline.device_memory_gb allows" if pipeline.get("device_memory_gb") is not None
            else "the device has",
            "host_source": "that pipeline.host_memory_gb allows" if host is not None else "this host has available"}


def check_fits(plan: dict, budget: dict) -> None:
    """Refuse a plan above the budget: one PipelineError naming the stage and the setting that brings it down."""
    device_bytes = budget["device"]
    if device_bytes is not None and plan["device_peak_bytes"] > device_bytes:
        on_device = {k: v for k, v in plan["stage_working_sets"].items() if k not in HOST_STAGES}
        stage = max(on_device, key=on_device.get)
        raise PipelineError(
            f"the memory plan needs {plan['device_peak_bytes'] / GIB:.1f} GiB on the {plan['device']} device at stage "
            f"{stage}, above the {device_bytes / GIB:.1f} GiB {budget['device_source']}; {_remedy(stage, plan)}, "
            "or set pipeline.memory_check=false to run anyway")
    host_bytes = budget["host"]
    if plan["host_peak_bytes"] > host_bytes:
        stage = max(plan["host_per_stage"], key=plan["host_per_stage"].get)
        remedy = _remedy(stage, plan)
        resident = plan["resident"]
        largest = max(("blocks held whole", "streams"), key=resident.get)
        if stage not in ("tune_e2e", "evaluate", "load") and resident[largest] > plan["stage_working_sets"].get(stage, 0):
            remedy = {"blocks held whole": "stream the blocks from a safetensors checkpoint (model.load=auto with "
                                           "model.path or model.hub_id)",
                      "streams": "lower calibrate.n_samples or calibrate.seq_len"}[largest]
        raise PipelineError(
            f"the memory plan needs {plan['host_peak_bytes'] / GIB:.1f} GiB of host memory at stage {stage}, above the "
            f"{host_bytes / GIB:.1f} GiB {budget['host_source']}; {remedy}, or set pipeline.memory_check=false "
            "to run anyway")


def _remedy(stage: str, plan: dict) -> str:
    if stage == "tune_e2e" and plan["e2e_mode"] == "whole":
        return "set tune_e2e.mode=streamed"
    return REMEDY.get(stage, "lower calibrate.n_samples or calibrate.seq_len")


def plan_for(cfg: dict, source: ModelSource, arch: dict | None = None, device_type: str | None = None,
             host_budget: int | None = None) -> dict:
    arch = arch or architecture(cfg["model"], source)
    device_type = device_type or ("cpu" if cfg["pipeline"].get("device") == "cpu" else "cuda")
    plan = run_plan(cfg, arch, device_type, streams(source), host_budget, writes_float_copy(source))
    plan["arch"] = arch
    plan["host_model_bytes"] = model_params(arch) * dtype_bytes(cfg)
    return plan


def format_run_plan(cfg: dict, plan: dict, budget: dict | None = None) -> str:
    arch, lrc, res = plan["arch"], plan["lrc"], plan["resident"]
    device_budget = (budget or {}).get("device") or GPU_BYTES
    host_budget = (budget or {}).get("host") or HOST_BUDGET_BYTES
    lines = [
        f"plan for model={cfg['model']['name']} quant={cfg['quant']['name']}: {arch['num_hidden_layers']} blocks, "
        f"{model_params(arch) / 1e9:.2f} B parameters ({plan['host_model_bytes'] / GIB:.1f} GiB in {cfg['model'].get('dtype')})",
        f"  model in host memory: {'one block at a time (streamed from safetensors)' if plan['streamed'] else 'whole'}; "
        f"skeleton {res['skeleton'] / GIB:.2f} GiB, block {plan['block_bytes'] / GIB:.2f} GiB",
        f"  block streams on CPU (quantized, FP targets, next output): {res['streams'] / GIB:.1f} GiB; "
        f"evaluation streams {plan['eval_stream_bytes'] / GIB:.1f} GiB",
        format_plan(lrc),
        "  working set per block on the " + ("CPU" if plan["device"] == "cpu" else "device") + ": "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan["stage_working_sets"].items()),
        "  host peak per stage: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan["host_per_stage"].items()),
    ]
    if plan["e2e_layout"] is not None:
        lines.append(f"  tune_e2e ({plan['e2e_mode']}): fused blocks "
                     f"{'kept in host memory' if plan['e2e_layout']['keep_blocks'] else 'rebuilt on each pass'}, block inputs "
                     f"{'spilled to disk' if plan['e2e_layout']['spill_inputs'] else 'in host memory'}; host terms "
                     + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in plan["e2e_host_terms"].items()))
    if plan["ranks"] > 1:
        lines.append(f"  data parallel, {plan['ranks']} ranks: every number here is per rank (its {plan['windows_per_rank']} "
                     f"of {cfg['calibrate']['n_samples']} calibration windows; the device peak is per GPU); a node running "
                     f"k ranks needs k × the host peak")
    host_name = "a 32 GB host" if host_budget == HOST_BUDGET_BYTES else f"a {host_budget / 1e9:.1f} GB host budget"
    lines.append(f"  host peak: {plan['host_peak_bytes'] / GIB:.1f} GiB ({plan['host_peak_bytes'] / 1e9:.1f} GB; "
                 f"{'within' if plan['host_peak_bytes'] <= host_budget else 'ABOVE'} {host_name})")
    if plan["device"] != "cpu":
        fits = plan["device_peak_bytes"] <= device_budget
        device_name = "one 80 GB GPU" if device_budget == GPU_BYTES else f"a {device_budget / 1e9:.1f} GB device"
        lines.append(f"  device peak: {plan['device_peak_bytes'] / GIB:.1f} GiB ({plan['device_peak_bytes'] / 1e9:.1f} GB)")
        lines.append(f"  fits {device_name}: {'yes' if fits else 'NO'} (device peak {plan['device_peak_bytes'] / GIB:.1f} "
                     f"GiB of {device_budget / GIB:.1f} GiB)")
    return "\n".join(lines)


def print_plan(cfg: dict, source: ModelSource, arch: dict | None = None, device_type: str | None = None) -> dict:
    """`pipeline.plan_only=true`: the plan against the configured budget (default one 80 GB GPU and a 32 GB host)."""
    pipeline = cfg["pipeline"]
    budget = {"device": int(pipeline["device_memory_gb"] * 10**9) if pipeline.get("device_memory_gb") is not None else GPU_BYTES,
              "host": int(pipeline["host_memory_gb"] * 10**9) if pipeline.get("host_memory_gb") is not None else HOST_BUDGET_BYTES}
    plan = plan_for(cfg, source, arch, device_type, budget["host"])
    print(format_run_plan(cfg, plan, budget))
    fits = plan["device_peak_bytes"] <= budget["device"] and plan["host_peak_bytes"] <= budget["host"]
    return {**plan, "plan": plan["lrc"], "budget": budget, "fits": fits,
            "fits_80gb": plan["device_peak_bytes"] <= GPU_BYTES}
