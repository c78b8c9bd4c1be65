"""fuse: per block, merge the low-rank correction into the (reassembled) weight and quantize it: W' = Q(W + B·A).

The stored block has no LoRA modules left; after the last block the whole model is written with
packed integer weights plus our quantization metadata (see qllm_pipeline.export).
"""
from __future__ import annotations

import logging

from qllm_pipeline.export import save_quantized_model
from qllm_pipeline.fused import fused_block_tensors
from qllm_pipeline.lowrank import fuse_block, load_lora_state
from qllm_pipeline.qblock import load_reassemblies, make_quant_block
from qllm_pipeline.runner import StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec("fuse", version=2, config_keys=("quant",), per_block=True)


def is_enabled(cfg) -> bool:
    return True


def disabled_reason(cfg, selected) -> str:
    return "not in pipeline.stages"


def run(ctx, state, artifacts, writer) -> None:
    reassembled = artifacts.get("reassemble")
    reassemblies = load_reassemblies(reassembled.tensors("reassembly.safetensors")) if reassembled else None
    block = make_quant_block(state.fp_block, ctx.weight_spec, ctx.act_spec, reassemblies)
    trained = artifacts.get("train_lowrank")
    if trained is not None:
        load_lora_state(block, trained.tensors("lora.safetensors"))
    fuse_block(block)
    writer.save_tensors("block.safetensors", fused_block_tensors(block))


def finalize(ctx, runner, artifacts) -> None:
    """Write the whole quantized model once per final key (cached like any artifact)."""
    if not ctx.cfg["fuse"].get("save_model", True):
        return
    key = ctx.keys["fuse"]
    model_dir = ctx.cache.get("model", key)
    if model_dir is None:
        with ctx.cache.writer("model", key) as writer:
            sizes = save_quantized_model(
                ctx.model, ctx.tokenizer, [a.tensors("block.safetensors") for a in artifacts["fuse"]], ctx.cfg["quant"], writer.tmp
            )
            writer.save_json("sizes.json", sizes)
        model_dir = ctx.cache.get("model", key)
    link = ctx.run_dir / "quantized_model"
    if link.is_symlink():  # a re-used run directory: point at this run's model
        link.unlink()
    if not link.exists():
        link.symlink_to(model_dir.path, target_is_directory=True)
    sizes = model_dir.json("sizes.json")
    log.info("quantized model: %s (%.1f MB; the same model in FP16: %.1f MB)", model_dir.path, sizes["file_bytes"] / 1e6, sizes["fp16_bytes"] / 1e6)
