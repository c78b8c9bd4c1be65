"""reassemble: per block, build the channel-reassembly map of each point at its chosen θ (QLLM §3.1):
disassembly of channels above θ, then assembly of as many similar channel pairs as were added.
Stored per block: reassembly.safetensors (`<point>.<src|dst|coef|...>`) and summary.json.
The maps are built from the same tokens search-theta scored, so they are the maps it evaluated.
"""
from __future__ import annotations

from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.methods.reassembly_inputs import channel_max, score_tokens, search_inputs
from qllm_pipeline.model.arch import block_family, family_of
from qllm_pipeline.quantized.qblock import reassembly_tensors
from qllm_pipeline.quantized.reassembly import build_reassembly
from qllm_pipeline.quantized.subblock import point_activations, point_weights


class Reassemble(BlockStage):
    spec = StageSpec("reassemble", version=1, config_keys=("reassemble",), upstream=("search_theta",), label="cra")

    def enabled(self, cfg) -> bool:
        return bool(cfg["reassemble"]["enabled"]) and cfg["quant"].get("abits") is not None

    def run(self, ctx, state, writer) -> None:
        thetas = state.artifacts["search_theta"].json("theta.json")
        stats = channel_max(state.artifacts, family_of(ctx.model))
        inputs, block = search_inputs(ctx, state)
        try:
            maps = {}
            for point, found in thetas.items():
                r = build_reassembly(
                    stats[block_family(block).stat_key(point)], found["theta"], score_tokens(point_activations(block, point, inputs[point])),
                    point_weights(block, point), bool(ctx.cfg["reassemble"]["assemble"]),
                )
                if not r.is_identity:
                    maps[point] = r
        finally:
            block.to("cpu")
        writer.save_tensors("reassembly.safetensors", reassembly_tensors(maps))
        writer.save_json("summary.json", {p: r.summary() for p, r in maps.items()})

