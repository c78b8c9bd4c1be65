"""Fused (final) quantized blocks: what the fuse stage stores per block and how a block is rebuilt from it.

A fused block stores, for each of its projections, the weight already transformed (online Hadamard,
reassembly), merged with its low-rank correction and quantized, in integer form (`codes`, `scale`, `zero`;
rebuilding needs no training state), its ordered input transforms (`<name>.transforms.<i>.<kind>.<field>`), the
norm weights (they may have been trained) and every other parameter of the block outside its projections (q/k norms,
Gemma's post norms), a learned activation clip ratio per projection (`<name>.act_clip`,
when LRC learned one) and whether the attention rotates Q and K online (`self_attn.qk_hadamard`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from qllm_pipeline.model.arch import attention, block_family
from qllm_pipeline.quantized.attention import QK_HADAMARD_ATTR
from qllm_pipeline.quantized.blocks import quant_linears, quantize_block_linears
from qllm_pipeline.quantized.quantizer import QuantSpec
from qllm_pipeline.quantized.transforms import transforms_from_tensors, transforms_to_tensors


def fused_block_tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors of a block whose QuantLinears were fused (weight_is_quantized)."""
    tensors = {}
    for name, ql in quant_linears(block).items():
        if not ql.weight_is_quantized:
            raise ValueError(f"{name} is not fused; call fuse() first")
        if ql.codes is not None:  # integer form: exact, and what export packs
            tensors.update({f"{name}.{k}": v for k, v in ql.codes.items()})
        else:
            tensors[f"{name}.weight"] = ql.weight.detach()
        if ql.bias is not None:
            tensors[f"{name}.bias"] = ql.bias.detach()
        if ql.act_clip_learned:  # this projection's own activation clip ratio (learned with the correction)
            tensors[f"{name}.act_clip"] = torch.tensor(ql.act_spec.clip_ratio, dtype=torch.float32)
        tensors.update({f"{name}.transforms.{k}": v for k, v in transforms_to_tensors(ql.input_transforms).items()})
    family = block_family(block)
    if getattr(attention(block), QK_HADAMARD_ATTR, False):
        tensors[f"{family.attention}.{QK_HADAMARD_ATTR}"] = torch.ones(1, dtype=torch.int8)
    tensors.update({name: value.detach() for name, value in block_parameters(block).items()})
    return tensors


def block_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's parameters outside its projections: the norms that feed them, and the family's others (q/k norms,
    the norms after the attention and the MLP)."""
    inside = tuple(f"{name}." for name in block_family(block).linears)
    return {name: p for name, p in block.named_parameters() if not name.startswith(inside)}


def build_fused_block(
    fp_block: nn.Module,
    tensors: dict[str, torch.Tensor],
    act_spec: QuantSpec,
    weight_spec: QuantSpec,
    attn_spec: QuantSpec | None = None,
) -> nn.Module:
    """A copy of `fp_block` whose projections quantize activations per token and use the stored quantized weights."""
    block = copy.deepcopy(fp_block)
    family = block_family(block)
    setattr(attention(block), QK_HADAMARD_ATTR, f"{family.attention}.{QK_HADAMARD_ATTR}" in tensors)
    qlinears = quantize_block_linears(block, weight_spec, act_spec, attn_spec)
    for name in family.linears:
        ql = qlinears[name]
        prefix = f"{name}.transforms."
        ql.set_transforms(transforms_from_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}))
        if f"{name}.codes" in tensors:
            ql.load_codes({k: tensors[f"{name}.{k}"] for k in ("codes", "scale", "zero")})
        else:
            ql.weight = nn.Parameter(tensors[f"{name}.weight"].to(ql.weight.dtype).clone(), requires_grad=False)
        if f"{name}.bias" in tensors:
            ql.bias = nn.Parameter(tensors[f"{name}.bias"].clone(), requires_grad=False)
        if f"{name}.act_clip" in tensors and act_spec.enabled:
            ql.set_act_clip(float(tensors[f"{name}.act_clip"]))
        ql.weight_is_quantized = True
    with torch.no_grad():
        for name, param in block_parameters(block).items():
            param.copy_(tensors[name])
    block.requires_grad_(False)
    return block
