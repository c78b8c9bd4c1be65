"""Building a quantized copy of a decoder block, with optional channel reassembly at the three QLLM points."""
from __future__ import annotations

import copy

from torch import nn

from qllm_pipeline.model.arch import block_family
from qllm_pipeline.quantized.blocks import quantize_block_linears
from qllm_pipeline.quantized.quantizer import QuantSpec


def make_quant_block(
    fp_block: nn.Module,
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    reassemblies: dict | None = None,
    attn_spec: QuantSpec | None = None,
) -> nn.Module:
    """A deep copy of `fp_block` with quantized projections; `reassemblies` maps point name -> ChannelReassembly,
    appended after any input transform the block's projections already carry (e.g. an online Hadamard)."""
    block = copy.deepcopy(fp_block)
    qlinears = quantize_block_linears(block, weight_spec, act_spec, attn_spec)
    points = block_family(block).point_linears
    for point, reassembly in (reassemblies or {}).items():
        for name in points[point]:
            qlinears[name].set_reassembly(reassembly)
    block.requires_grad_(False)
    return block


def load_reassemblies(tensors: dict) -> dict:
    """Inverse of `reassembly_tensors`: {point: ChannelReassembly} from flat `<point>.<name>` tensors."""
    from qllm_pipeline.quantized.channel_map import ChannelReassembly

    points: dict[str, dict] = {}
    for key, value in tensors.items():
        point, _, name = key.partition(".")
        points.setdefault(point, {})[name] = value
    return {point: ChannelReassembly.from_tensors(parts) for point, parts in points.items()}


def reassembly_tensors(reassemblies: dict) -> dict:
    return {f"{point}.{k}": v for point, r in reassemblies.items() for k, v in r.to_tensors().items()}
