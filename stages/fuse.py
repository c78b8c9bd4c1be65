"""fuse: per block, merge the low-rank correction into the transformed weight and quantize it: W' = Q(T(W) + B·A),
with Q round-to-nearest or GPTQ (`quant.weight_algorithm`, see qllm_pipeline.methods.weight_rounding).

The stored block has no LoRA modules left; after the last block the whole model is written (`fuse.format`): as a
compressed-tensors checkpoint that stock transformers loads (qllm_pipeline.export.export_ct), or with our packed layout and
loader (qllm_pipeline.export.packed), which also holds the run-time transforms compressed-tensors cannot run.
"""
from __future__ import annotations

import importlib.util
import logging

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.export.export_ct import FORMAT_NAME as CT_FORMAT
from qllm_pipeline.export.export_ct import PACKED_FORMAT, export_blockers
from qllm_pipeline.export.model_writer import model_format, write_model
from qllm_pipeline.methods.lowrank import fuse_block, load_lora_state
from qllm_pipeline.methods.weight_rounding import load_base_tensors, weight_rounding
from qllm_pipeline.quantized.fused import fused_block_tensors

log = logging.getLogger(__name__)


class Fuse(BlockStage):
    spec = StageSpec("fuse", version=3, config_keys=("quant",))

    def key_config(self, cfg: dict) -> dict:
        # The rounding's settings (GPTQ's) matter only when it rounds the weights.
        return {**super().key_config(cfg), **weight_rounding(cfg).key(cfg)}

    def needs_fp_stream(self, cfg: dict) -> bool:
        return super().needs_fp_stream(cfg) or weight_rounding(cfg).needs_fp_stream(cfg)

    def validate(self, cfg: dict) -> None:
        weight_rounding(cfg).validate(cfg)
        fmt = model_format(cfg)
        if fmt == CT_FORMAT and cfg["fuse"]["save_model"]:
            blockers = export_blockers(cfg)
            if blockers:
                raise PipelineError(f"fuse.format={CT_FORMAT} cannot hold {'; '.join(blockers)}; use fuse.format={PACKED_FORMAT}")
            if importlib.util.find_spec("compressed_tensors") is None:  # found, not imported: its import costs seconds
                raise PipelineError(f"fuse.format={CT_FORMAT} needs the compressed-tensors package: "
                                    "pip install 'compressed-tensors>=0.20,<1'")

    def run(self, ctx, state, writer) -> None:
        block = state.quant_block()
        trained = state.artifacts.get("train_lowrank")
        if trained is not None:
            if trained.has("base.safetensors"):  # LRC refined a GPTQ-rounded base: stay on its grid
                load_base_tensors(block, trained.tensors("base.safetensors"))
            load_lora_state(block, trained.tensors("lora.safetensors"))
        rounding = weight_rounding(ctx.cfg)
        # From the block's inputs (GPTQ), unless LRC trained on a base it already rounded; else at fuse time (RTN).
        if rounding.reads_inputs and ctx.weight_spec.enabled and trained is None:
            block.to(ctx.device)
            report = rounding.round_block(block, ctx.block_runner, state.x_q, ctx.device, ctx.cfg["pipeline"]["batch_size"],
                                          ctx.cfg, fp=state.fp_stream)
            block.to("cpu")
            writer.save_json(f"{rounding.name}.json", report)
        else:
            fuse_block(block)
        writer.save_tensors("block.safetensors", fused_block_tensors(block))

    def finalize(self, ctx, runner) -> None:
        if runner.enabled("tune_e2e"):  # the blocks change once more: the model is written after that stage
            return
        write_model(ctx, runner)
