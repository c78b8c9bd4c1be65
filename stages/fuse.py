"""fuse: per block, merge the low-rank correction into the transformed weight and quantize it: W' = Q(T(W) + B·A),
with Q round-to-nearest or GPTQ (`quant.weight_algorithm`, see qllm_pipeline.weight_rounding).

The stored block has no LoRA modules left; after the last block the whole model is written (`fuse.format`): as a
compressed-tensors checkpoint that stock transformers loads (qllm_pipeline.export_ct), or with our packed layout and
loader (qllm_pipeline.export), which also holds the run-time transforms compressed-tensors cannot run.
"""
from __future__ import annotations

import importlib.util
import logging

from qllm_pipeline.cache import artifact_key
from qllm_pipeline.errors import PipelineError
from qllm_pipeline.export import save_quantized_model
from qllm_pipeline.export_ct import FORMAT_NAME as CT_FORMAT
from qllm_pipeline.export_ct import PACKED_FORMAT, export_blockers, runtime_parts, save_compressed_tensors_model
from qllm_pipeline.fused import fused_block_tensors
from qllm_pipeline.lowrank import fuse_block, load_lora_state
from qllm_pipeline.stage import BlockStage, StageSpec
from qllm_pipeline.streaming import is_streamed
from qllm_pipeline.weight_rounding import (GPTQ_ARITHMETIC_VERSION, WEIGHT_ALGORITHMS, GPTQConfig, gptq_fuse_block,
                                           load_base_tensors)

from .reassemble import quant_block

log = logging.getLogger(__name__)


def uses_gptq(cfg: dict) -> bool:
    return cfg["quant"].get("weight_algorithm", "rtn") == "gptq"


def model_format(cfg: dict) -> str:
    return cfg["fuse"].get("format", PACKED_FORMAT)


def gptq_key(cfg: dict) -> dict:
    """GPTQ's settings as they go into cache keys (fp_target at its default 0 is left out), with the version of its
    arithmetic: 2 sums the Hessians in float32 and factorizes in place, which can move a code at a rounding tie, so
    no block rounded by the earlier arithmetic is reused."""
    settings = {k: v for k, v in cfg["gptq"].items() if not (k == "fp_target" and not v)}
    return {**settings, "arithmetic": GPTQ_ARITHMETIC_VERSION}


def uses_fp_stream(cfg: dict) -> bool:
    """GPTQ matching the FP model's layers (gptq.fp_target > 0) reads each block's FP-stream inputs."""
    return uses_gptq(cfg) and bool(cfg["gptq"].get("fp_target") or 0)


def gptq_config(cfg: dict) -> GPTQConfig:
    try:
        return GPTQConfig(**cfg["gptq"])
    except (TypeError, ValueError) as exc:
        raise PipelineError(str(exc)) from exc


class Fuse(BlockStage):
    spec = StageSpec("fuse", version=3, config_keys=("quant",))

    def key_config(self, cfg: dict) -> dict:
        # GPTQ's settings matter only when GPTQ rounds the weights.
        part = super().key_config(cfg)
        if uses_gptq(cfg):
            part["gptq"] = gptq_key(cfg)
        return part

    def needs_fp_stream(self, cfg: dict) -> bool:
        return super().needs_fp_stream(cfg) or uses_fp_stream(cfg)

    def validate(self, cfg: dict) -> None:
        algorithm = cfg["quant"].get("weight_algorithm", "rtn")
        if algorithm not in WEIGHT_ALGORITHMS:
            raise PipelineError(f"quant.weight_algorithm={algorithm!r} is not one of {list(WEIGHT_ALGORITHMS)}")
        if algorithm == "gptq":
            gptq_config(cfg)
        fmt = model_format(cfg)
        if fmt == CT_FORMAT and cfg["fuse"].get("save_model", True):
            blockers = export_blockers(cfg)
            if blockers:
                raise PipelineError(f"fuse.format={CT_FORMAT} cannot hold {'; '.join(blockers)}; use fuse.format={PACKED_FORMAT}")
            if importlib.util.find_spec("compressed_tensors") is None:  # found, not imported: its import costs seconds
                raise PipelineError(f"fuse.format={CT_FORMAT} needs the compressed-tensors package: "
                                    "pip install 'compressed-tensors>=0.20,<1'")

    def run(self, ctx, state, writer) -> None:
        block = quant_block(ctx, state)
        trained = state.artifacts.get("train_lowrank")
        if trained is not None:
            if trained.has("base.safetensors"):  # LRC refined a GPTQ-rounded base: stay on its grid
                load_base_tensors(block, trained.tensors("base.safetensors"))
            load_lora_state(block, trained.tensors("lora.safetensors"))
        if uses_gptq(ctx.cfg) and ctx.weight_spec.enabled and trained is None:
            block.to(ctx.device)
            report = gptq_fuse_block(
                block, ctx.block_runner, state.x_q, ctx.device, ctx.cfg["pipeline"]["batch_size"], gptq_config(ctx.cfg),
                fp=fp_inputs(state),
            )
            block.to("cpu")
            writer.save_json("gptq.json", report)
        else:
            fuse_block(block)
        writer.save_tensors("block.safetensors", fused_block_tensors(block))

    def finalize(self, ctx, runner) -> None:
        if runner.enabled("tune_e2e"):  # the blocks change once more: the model is written after that stage
            return
        write_model(ctx, runner)


def write_model(ctx, runner) -> None:
    """Write the whole final quantized model once per final key (cached like any artifact)."""
    if not ctx.cfg["fuse"].get("save_model", True):
        return
    fmt = model_format(ctx.cfg)
    # version 2: 8-bit symmetric weights are written int-quantized (were pack-quantized)
    key = artifact_key("model", 2, {"format": fmt}, {"fuse": ctx.keys["model"]})

    def write(writer):
        # Read one block at a time; a streamed model is written one shard per block, so the export never holds it whole.
        blocks = (runner.block_tensors(i) for i in range(len(runner.artifacts["fuse"])))
        sharded = is_streamed(ctx.fp_model)  # the model as loaded (a rotated view of an in-memory one is not streamed)
        if fmt == CT_FORMAT:
            parts = runtime_parts(ctx.cfg)
            if parts:
                log.info("the checkpoint ships modeling_qllm.py (load it with trust_remote_code=True) for: %s",
                         "; ".join(parts))
            sizes = save_compressed_tensors_model(ctx.model, ctx.tokenizer, blocks, ctx.cfg["quant"], writer.tmp,
                                                  runtime=bool(parts), sharded=sharded)
        else:
            sizes = save_quantized_model(ctx.model, ctx.tokenizer, blocks, ctx.cfg["quant"], writer.tmp, sharded=sharded)
        writer.save_json("sizes.json", sizes)

    model_dir, _ = ctx.cache.produce("model", key, write)
    link = ctx.run_dir / "quantized_model"
    if link.is_symlink():  # a re-used run directory: point at this run's model
        link.unlink()
    if not link.exists():
        link.symlink_to(model_dir.path, target_is_directory=True)
    sizes = model_dir.json("sizes.json")
    log.info("quantized model (%s): %s (%.1f MB; the same model in FP16: %.1f MB)", fmt, model_dir.path, sizes["file_bytes"] / 1e6,
             sizes["fp16_bytes"] / 1e6)


def fp_inputs(state):
    """(the FP block, its FP-stream inputs) for GPTQ's fp_target; called before the block's targets are computed,
    which replace the FP inputs."""
    if state.x_fp is None:
        return None
    return state.fp_block, state.x_fp
