"""train-lowrank: per block, LoRA-style A·B on every projection, trained so the quantized block matches the
full-precision block's output (QLLM §3.3). Inputs come from the already-quantized blocks; targets are the FP
block's outputs on the FP stream. Stored per block: the A/B (and trained norm) tensors and the losses.
"""
from __future__ import annotations

import logging
from dataclasses import fields

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.methods.lowrank import LowRankConfig, lora_state, train_block
from qllm_pipeline.methods.weight_rounding import base_tensors, weight_rounding

log = logging.getLogger(__name__)

CONFIG_FIELDS = tuple(f.name for f in fields(LowRankConfig))  # the group's settings but `enabled`


class TrainLowrank(BlockStage):
    spec = StageSpec("train_lowrank", version=2, config_keys=("train_lowrank", "quant"), needs_fp_targets=True, label="lrc")

    def key_config(self, cfg: dict) -> dict:
        part = super().key_config(cfg)
        if not part["train_lowrank"]["learn_act_clip"]:  # off: the keys of runs made before it existed
            part["train_lowrank"] = {k: v for k, v in part["train_lowrank"].items() if k not in ("learn_act_clip", "act_clip_lr", "act_clip_shared")}
        return {**part, **weight_rounding(cfg).key(cfg)}  # GPTQ rounds the base LRC refines

    def enabled(self, cfg) -> bool:
        return bool(cfg["train_lowrank"]["enabled"]) and cfg["quant"].get("wbits") is not None

    def disabled_reason(self, cfg) -> str:
        return "disabled by config (train_lowrank.enabled=false or no quantization)"

    def validate(self, cfg: dict) -> None:
        lowrank_config(cfg["train_lowrank"], 0)

    def run(self, ctx, state, writer) -> None:
        block = state.quant_block().to(ctx.device)
        rounding = weight_rounding(ctx.cfg)
        if rounding.reads_inputs and ctx.weight_spec.enabled:
            # GPTQ first: LRC refines GPTQ's rounding on its grid (see qllm_pipeline.methods.weight_rounding).
            report = rounding.round_block(block, ctx.block_runner, state.x_q, ctx.device, ctx.cfg["pipeline"]["batch_size"],
                                          ctx.cfg, fp=state.fp_stream, as_base=True)
            writer.save_tensors("base.safetensors", base_tensors(block))
            writer.save_json(f"{rounding.name}.json", report)
        cfg = lowrank_config(ctx.cfg["train_lowrank"], state.index)
        stats = train_block(
            block, ctx.block_runner, state.x_q, state.targets, cfg, ctx.device, progress=ctx.progress, desc=f"lrc block {state.index}"
        )
        writer.save_tensors("lora.safetensors", lora_state(block))
        writer.save_json("losses.json", stats)
        ctx.tracker.log({"lrc/block": state.index, "lrc/loss_before": stats["loss_before"], "lrc/loss_after": stats["loss_after"]})
        log.debug("block %d LRC loss %.4g -> %.4g", state.index, stats["loss_before"], stats["loss_after"])


def lowrank_config(cfg: dict, block_index: int) -> LowRankConfig:
    try:
        lrc = LowRankConfig(**{k: cfg[k] for k in CONFIG_FIELDS if k in cfg})
    except (ValueError, TypeError) as exc:
        raise PipelineError(str(exc)) from exc
    lrc.seed = int(lrc.seed) + block_index  # a different but reproducible init per block
    return lrc
