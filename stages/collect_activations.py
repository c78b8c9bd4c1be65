"""collect-activations: per block, the per-channel max |x| of the inputs of every projection.

Measured on the quantized stream (the inputs this block will really see, coming from the already-quantized
blocks before it) through the block's full-precision weights.
"""
from __future__ import annotations

import torch

from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.quantized.blocks import get_submodule, linear_names
from qllm_pipeline.quantized.qlinear import QuantLinear


class CollectActivations(BlockStage):
    spec = StageSpec("collect_activations", version=1, config_keys=("pipeline.batch_size",))

    def run(self, ctx, state, writer) -> None:
        stats = channel_max(state.fp_block, ctx.block_runner, state.x_q, ctx.device, ctx.cfg["pipeline"]["batch_size"])
        for name in sorted(stats):  # each rank measured its own windows: the maxima over all of them
            ctx.world.all_reduce_(stats[name], "max")
        writer.save_tensors("channel_max.safetensors", stats)
        # Summary that later plots and logs use: how extreme the outliers are at each input.
        writer.save_json(
            "summary.json",
            {name: {"max": float(v.max()), "median": float(v.median()), "ratio": float(v.max() / v.median().clamp(min=1e-8))}
             for name, v in stats.items()},
        )


def channel_max(block, run_block, inputs: torch.Tensor, device, batch_size: int) -> dict[str, torch.Tensor]:
    """max |x| per input channel of each projection over all tokens of `inputs`, after the projection's own input
    transforms (a rotated down_proj's online Hadamard): the channels its activation quantizer will see."""
    stats: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = module.transform_input(args[0]) if isinstance(module, QuantLinear) else args[0]
            m = x.detach().abs().flatten(0, -2).amax(dim=0).float().cpu()
            stats[name] = m if name not in stats else torch.maximum(stats[name], m)

        return record

    handles = [get_submodule(block, n).register_forward_pre_hook(hook(n)) for n in linear_names(block)]
    try:
        block.to(device)
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                run_block(block, inputs[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        block.to("cpu")
    return stats

