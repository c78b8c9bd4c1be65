"""What the θ search and the reassembly maps are computed from, the same for both stages (so the maps built are the
maps the search scored): the collected per-channel maxima (divided by the smoothing scales if smooth ran), every
point's FP inputs on the first windows of the quantized stream, and the tokens that score channel similarity."""
from __future__ import annotations

import torch

from qllm_pipeline.methods.smoothquant import smoothed_channel_max
from qllm_pipeline.quantized.subblock import point_inputs

MAX_SCORE_TOKENS = 4096


def channel_max(artifacts, family) -> dict[str, torch.Tensor]:
    """Collected per-channel max |x| of every projection's input, divided by the smoothing scales if smooth ran."""
    stats = artifacts["collect_activations"].tensors("channel_max.safetensors")
    smooth = artifacts.get("smooth")
    return smoothed_channel_max(stats, smooth.tensors("scales.safetensors"), family) if smooth is not None else stats


def search_inputs(ctx, state) -> tuple[dict, torch.Tensor]:
    """FP inputs of every point for the first n_samples windows of the quantized stream (on the device); under
    torchrun the ranks holding them share them, and every rank scores the same windows."""
    n = int(ctx.cfg["search_theta"]["n_samples"])
    x = ctx.world.gather_windows(state.x_q, ctx.n_windows, ctx.cfg["pipeline"]["batch_size"], n).to(ctx.device)
    block = state.fp_block.to(ctx.device)
    return point_inputs(block, x, ctx.block_runner), block


def score_tokens(h: torch.Tensor) -> torch.Tensor:
    tokens = h.flatten(0, -2)
    if tokens.shape[0] > MAX_SCORE_TOKENS:
        tokens = tokens[torch.linspace(0, tokens.shape[0] - 1, MAX_SCORE_TOKENS).long()]
    return tokens
