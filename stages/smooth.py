"""smooth (optional baseline, SmoothQuant): per block, migrate activation outliers into the weights with
s_j = max|X_j|^α / max|W_j|^(1-α) at the two norm-fed points (q/k/v and gate/up), folded into the norms.

Stored per block: scales.safetensors ({qkv, gate_up}). `apply` replaces the block the later stages see by the
smoothed copy (exact in full precision), so RTN, CRA and LRC all run on smoothed weights and activations.
"""
from __future__ import annotations

import copy

from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.methods.smoothquant import apply_smoothing, block_smoothing_scales


class Smooth(BlockStage):
    spec = StageSpec("smooth", version=1, config_keys=("smooth",), upstream=("collect_activations",), label="smoothquant")

    def run(self, ctx, state, writer) -> None:
        stats = state.artifacts["collect_activations"].tensors("channel_max.safetensors")
        scales = block_smoothing_scales(state.fp_block, stats, float(ctx.cfg["smooth"]["alpha"]))
        writer.save_tensors("scales.safetensors", scales)
        writer.save_json("summary.json", {p: {"min": float(s.min()), "max": float(s.max())} for p, s in scales.items()})

    def apply(self, ctx, state, artifact) -> None:
        block = copy.deepcopy(state.fp_block)
        apply_smoothing(block, artifact.tensors("scales.safetensors"))
        state.fp_block = block
