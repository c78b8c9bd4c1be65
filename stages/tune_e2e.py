"""tune_e2e: after the blocks are fused, tune the whole quantized model's weight scales and activation clip ratios
(the integer codes fixed) so its next-token distribution matches the FP model's on the calibration windows
(qllm_pipeline.e2e_tuning). Stored: the tuned scales, clip ratios and norms of every block, and the KL per epoch.
Evaluation and the written model use the tuned blocks.

The whole model is held on the device while it trains (the FP teacher beside it); the block stages before it need
one block at a time.
"""
from __future__ import annotations

import logging

from qllm_pipeline.blocks import decoder_layers
from qllm_pipeline.e2e_tuning import E2EConfig, swapped_layers, tune_model, tuned_tensors
from qllm_pipeline.errors import PipelineError
from qllm_pipeline.fused import build_fused_block
from qllm_pipeline.quantizer import per_bit_width
from qllm_pipeline.stage import FINAL, FinalStage, StageSpec

from .fuse import write_model

log = logging.getLogger(__name__)

CONFIG_FIELDS = ("epochs", "batch_size", "scale_lr", "act_clip_lr", "norm_lr", "seed")


class TuneE2E(FinalStage):
    spec = StageSpec("tune_e2e", version=2, config_keys=("tune_e2e",), upstream=("fuse",), kind=FINAL, label="e2e")

    def enabled(self, cfg) -> bool:
        return cfg["quant"].get("wbits") is not None or cfg["quant"].get("abits") is not None

    def disabled_reason(self, cfg) -> str:
        return "no quantization"

    def key_config(self, cfg: dict) -> dict:
        # The rate this bit width resolves to, not the map: adding a width to the map recomputes nothing.
        return {"tune_e2e": resolved_settings(cfg)}

    def validate(self, cfg: dict) -> None:
        e2e_config(cfg)

    def run(self, ctx, runner) -> None:
        key = runner.key("tune_e2e", {"model": ctx.keys["fuse"], "calibrate": ctx.keys["calibration_windows"]})
        artifact = runner.produce("tune_e2e", key, lambda writer: self._tune(ctx, runner, writer), timed=False)
        stats = artifact.json("stats.json")
        log.info("tune_e2e: KL to the FP model on the calibration windows %.4f -> %.4f over %d steps",
                 stats["kl_before"], stats["kl_after"], stats["steps"])
        tensors = artifact.tensors("tuned.safetensors")
        n = len(runner.artifacts["fuse"])
        runner.block_overrides = [{} for _ in range(n)]
        for name, value in tensors.items():
            index, _, field = name.partition(".")
            runner.block_overrides[int(index)][field] = value
        ctx.keys["tune_e2e"] = ctx.keys["model"] = key  # evaluation rows and the written model are the tuned model's
        write_model(ctx, runner)

    def _tune(self, ctx, runner, writer) -> None:
        cfg = e2e_config(ctx.cfg)
        windows = ctx.cache.get("calibrate", ctx.keys["calibrate"]).tensors("windows.safetensors")["input_ids"]
        layers, fp_layers = decoder_layers(ctx.model), decoder_layers(ctx.fp_model)
        blocks = [build_fused_block(layers[i], runner.block_tensors(i), ctx.act_spec, ctx.weight_spec, ctx.attn_spec)
                  for i in range(len(layers))]
        teacher_blocks = [fp_layers[i] for i in range(len(fp_layers))]  # a streamed model: every block read once
        with swapped_layers(ctx.model, blocks) as student, swapped_layers(ctx.fp_model, teacher_blocks) as teacher:
            stats = tune_model(student, teacher, windows, cfg, ctx.device, ctx.progress)
        tensors = {f"{i}.{name}": value for i, block in enumerate(tuned_tensors(blocks)) for name, value in block.items()}
        writer.save_tensors("tuned.safetensors", tensors)
        writer.save_json("stats.json", stats)
        ctx.tracker.log({"e2e/kl_before": stats["kl_before"], "e2e/kl_after": stats["kl_after"]})


def resolved_settings(cfg: dict) -> dict:
    """The stage's settings as they act: `scale_lr` may be a map {weight bits: rate} (a recipe's rate per bit width,
    each chosen on held-out windows); here it is the rate of this run's weight bit width."""
    settings = {k: cfg["tune_e2e"][k] for k in CONFIG_FIELDS if k in cfg["tune_e2e"]}
    scale_lr, wbits = settings.get("scale_lr"), cfg["quant"].get("wbits")
    if isinstance(scale_lr, dict):  # a width it does not list takes the nearest listed width's rate
        settings["scale_lr"] = 0.0 if wbits is None else per_bit_width(scale_lr, wbits)  # no weight grid: no scales
    return settings


def e2e_config(cfg: dict) -> E2EConfig:
    try:
        return E2EConfig(**resolved_settings(cfg))
    except (ValueError, TypeError) as exc:
        raise PipelineError(str(exc)) from exc
