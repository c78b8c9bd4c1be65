"""Weight rounding of a block's projections when it is fused: round-to-nearest or GPTQ, chosen by config
(`quant.weight_algorithm`). The rounding sees the merged weight T(W) + B·A (after the input transforms and the
low-rank correction), so it composes with every method.

GPTQ needs each projection's Hessian from the inputs it really sees: the block's inputs on the quantized stream,
through the input transforms (online Hadamard, reassembly), before the activation quantizer. Projections are rounded
in four groups in forward order (q/k/v, o, gate/up, down; members of a group share one input, so one Hessian), and
each group's inputs are collected after the groups before it were rounded, so o_proj sees the rounded q/k/v, etc.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import quant_linears
from .gptq import HessianAccumulator, gptq_weight_codes
from .quantizer import weight_codes

WEIGHT_ALGORITHMS = ("rtn", "gptq")
GPTQ_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class GPTQConfig:
    damp: float = 0.01  # dampening, as a fraction of the Hessian's mean diagonal
    block_size: int = 128  # columns per lazy update
    act_order: bool = True  # columns in order of decreasing Hessian diagonal (static groups with group_size)

    def __post_init__(self):
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise ValueError(f"gptq.damp={self.damp!r} must be a number in [0, 1)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"gptq.block_size={self.block_size!r} must be a positive integer")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"gptq.act_order={self.act_order!r} must be true or false")


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ) / 2 = the mean over calibration tokens of ||x Wᵀ - x Ŵᵀ||² (H = 2/N Σ x xᵀ)."""
    delta = (weight.double() - rounded.double()).to(hessian.device)
    return float(((delta @ hessian) * delta).sum() / 2)


@torch.no_grad()
def gptq_fuse_block(block: nn.Module, run_block, inputs: torch.Tensor, device, batch_size: int, cfg: GPTQConfig) -> dict:
    """Fuse every QuantLinear of `block` (on `device`) with GPTQ-rounded weights; returns, per projection, the layer
    output error (on the Hessian's inputs) of RTN and of GPTQ."""
    from .quantizer import dequantize_weight

    qlinears = quant_linears(block)
    report = {}
    for group in GPTQ_GROUPS:
        first = qlinears[group[0]]
        acc = HessianAccumulator(first.effective_in_features)
        handle = first.register_forward_pre_hook(lambda module, args: acc.add(module.transform_input(args[0])))
        try:
            for start in range(0, inputs.shape[0], batch_size):
                run_block(block, inputs[start : start + batch_size].to(device, block_dtype(block)))
        finally:
            handle.remove()
        hessian = acc.hessian()
        for name in group:
            ql = qlinears[name]
            merged = ql.merged_weight().detach().float()
            codes = gptq_weight_codes(merged, hessian, ql.weight_spec, cfg.damp, cfg.block_size, cfg.act_order)
            rtn = dequantize_weight(**weight_codes(merged, ql.weight_spec))
            report[name] = {
                "rtn_error": output_error(merged, rtn, hessian),
                "gptq_error": output_error(merged, dequantize_weight(**codes), hessian),
            }
            ql.fuse(codes={k: v.to(ql.weight.device) for k, v in codes.items()})
    return report


def block_dtype(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype
