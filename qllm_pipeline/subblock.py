"""The three QLLM reassembly points of a LLaMA block and the sub-block output each θ is scored on.

For a block input x (from the quantized stream), with full-precision weights:
- qkv:     input h1 = input_layernorm(x);   scored output: attention output before o_proj
- gate_up: input h2 = post_attention_layernorm(x + attn(h1)); scored output: act(gate(h2)) · up(h2)
- down:    input z = act(gate(h2)) · up(h2);  scored output: down_proj(z)
The quantized side replaces the projections of the point by QuantLinear with the candidate reassembly.
A projection may already carry input transforms (a rotated model's down_proj has its online Hadamard): the
reassembly is built on the transformed input and weight (`point_activations`, `point_weights`) and appended after them.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .attention import set_attention_quant
from .blocks import BlockRunner
from .qblock import POINT_LINEARS
from .qlinear import QuantLinear
from .quantizer import QuantSpec

POINTS = tuple(POINT_LINEARS)


def _attention(attn: nn.Module, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    length = h.shape[1]
    out = attn(hidden_states=h, position_embeddings=(runner.cos[:, :length], runner.sin[:, :length]), attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def point_inputs(block: nn.Module, x: torch.Tensor, runner: BlockRunner) -> dict[str, torch.Tensor]:
    """Full-precision inputs of the three points for block input x (block and x on the same device)."""
    with torch.no_grad():
        h1 = block.input_layernorm(x)
        attn_out = block.self_attn.o_proj(_attention_pre_o(block.self_attn, h1, runner))
        h2 = block.post_attention_layernorm(x + attn_out)
        z = block.mlp.act_fn(block.mlp.gate_proj(h2)) * block.mlp.up_proj(h2)
    return {"qkv": h1, "gate_up": h2, "down": z}


def _attention_pre_o(attn: nn.Module, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    saved = attn.o_proj
    attn.o_proj = nn.Identity()
    try:
        return _attention(attn, h, runner)
    finally:
        attn.o_proj = saved


def _point_output(block: nn.Module, point: str, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    if point == "qkv":
        return _attention_pre_o(block.self_attn, h, runner)
    if point == "gate_up":
        return block.mlp.act_fn(block.mlp.gate_proj(h)) * block.mlp.up_proj(h)
    return block.mlp.down_proj(h)


def _transformed_weight(module: nn.Module) -> torch.Tensor:
    return module.transformed_weight().detach() if isinstance(module, QuantLinear) else module.weight.detach()


def point_weights(block: nn.Module, point: str) -> list[torch.Tensor]:
    """The point's projection weights with their existing input transforms folded in (what a reassembly maps)."""
    return [_transformed_weight(block.get_submodule(name)) for name in POINT_LINEARS[point]]


def point_activations(block: nn.Module, point: str, h: torch.Tensor) -> torch.Tensor:
    """The point's input `h` after its projections' existing input transforms (they share them)."""
    first = block.get_submodule(POINT_LINEARS[point][0])
    with torch.no_grad():
        return first.transform_input(h) if isinstance(first, QuantLinear) else h


def point_loss_fn(
    block: nn.Module,
    point: str,
    h: torch.Tensor,
    runner: BlockRunner,
    weight_spec: QuantSpec,
    act_spec: QuantSpec,
    attn_spec: QuantSpec | None = None,
) -> Callable:
    """loss(reassembly) = MSE between the FP sub-block output and the one with reassembled, quantized projections
    (and, at the qkv point, quantized attention inputs when `attn_spec` is on)."""
    with torch.no_grad():
        target = _point_output(block, point, h, runner)
    qblock = copy.deepcopy(block)
    set_attention_quant(qblock, attn_spec)
    qlinears = []
    for name in POINT_LINEARS[point]:
        parent, _, attr = name.rpartition(".")
        ql = QuantLinear.from_module(qblock.get_submodule(name), weight_spec, act_spec)
        setattr(qblock.get_submodule(parent), attr, ql)
        qlinears.append(ql)

    def loss(reassembly) -> float:
        for ql in qlinears:
            ql.set_reassembly(None if reassembly is None or reassembly.is_identity else reassembly)
        with torch.no_grad():
            out = _point_output(qblock, point, h, runner)
        return nn.functional.mse_loss(out.float(), target.float()).item()

    return loss
