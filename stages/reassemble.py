"""reassemble: per block, build the channel-reassembly map of each point at its chosen θ (QLLM §3.1):
disassembly of channels above θ, then assembly of as many similar channel pairs as were added.
Stored per block: reassembly.safetensors (`<point>.<src|dst|coef|...>`) and summary.json.
The maps are built from the same tokens search-theta scored, so they are the maps it evaluated.
"""
from __future__ import annotations

from qllm_pipeline.qblock import reassembly_tensors
from qllm_pipeline.reassembly import build_reassembly
from qllm_pipeline.runner import StageSpec
from qllm_pipeline.subblock import point_weights

from .search_theta import POINT_STAT, channel_max, score_tokens, search_inputs

SPEC = StageSpec("reassemble", version=1, config_keys=("reassemble",), upstream=("search_theta",), per_block=True)


def is_enabled(cfg) -> bool:
    return bool(cfg["reassemble"].get("enabled", True)) and cfg["quant"].get("abits") is not None


def disabled_reason(cfg, selected) -> str:
    if "reassemble" not in selected:
        return "not in pipeline.stages"
    return "disabled by config"


def run(ctx, state, artifacts, writer) -> None:
    thetas = artifacts["search_theta"].json("theta.json")
    stats = channel_max(artifacts)
    inputs, block = search_inputs(ctx, state)
    try:
        maps = {}
        for point, found in thetas.items():
            r = build_reassembly(
                stats[POINT_STAT[point]], found["theta"], score_tokens(inputs[point]), point_weights(block, point),
                bool(ctx.cfg["reassemble"]["assemble"]),
            )
            if not r.is_identity:
                maps[point] = r
    finally:
        block.to("cpu")
    writer.save_tensors("reassembly.safetensors", reassembly_tensors(maps))
    writer.save_json("summary.json", {p: r.summary() for p, r in maps.items()})
