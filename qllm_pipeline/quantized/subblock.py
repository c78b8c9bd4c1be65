"""The three QLLM reassembly points of a block and the sub-block output each θ is scored on (LLaMA's names below;
the family's layout, `arch.Family`, gives each model's).

For a block input x (from the quantized stream), with full-precision weights:
- qkv:     input h1 = input_layernorm(x);   scored output: attention output before o_proj
- gate_up: input h2 = post_attention_layernorm(x + attn(h1)); scored output: act(gate(h2)) · up(h2)
  (Gemma: h2 = pre_feedforward_layernorm(x + post_attention_layernorm(attn(h1))))
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

from qllm_pipeline.core.distributed import world
from qllm_pipeline.model.arch import POINT_NAMES, attention, block_family, get_path
from qllm_pipeline.quantized.attention import set_attention_quant
from qllm_pipeline.quantized.blocks import BlockRunner
from qllm_pipeline.quantized.qlinear import QuantLinear
from qllm_pipeline.quantized.quantizer import QuantSpec

POINTS = POINT_NAMES


def _attention(block: nn.Module, attn: nn.Module, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    length = h.shape[1]
    out = attn(hidden_states=h, position_embeddings=runner.position_embeddings(block, length),
               attention_mask=runner.attention_mask(block, length))
    return out[0] if isinstance(out, tuple) else out


def point_inputs(block: nn.Module, x: torch.Tensor, runner: BlockRunner) -> dict[str, torch.Tensor]:
    """Full-precision inputs of the three points for block input x (block and x on the same device)."""
    family = block_family(block)
    with torch.no_grad():
        h1 = get_path(block, family.point("qkv").norm)(x)
        attn_out = get_path(block, family.attention_output)(_attention_pre_o(block, h1, runner))
        if family.attention_out_norm is not None:  # Gemma's sandwich norm, before the residual add
            attn_out = get_path(block, family.attention_out_norm)(attn_out)
        h2 = get_path(block, family.point("gate_up").norm)(x + attn_out)
        z = _gated(block, h2)
    return {"qkv": h1, "gate_up": h2, "down": z}


def _gated(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The gated MLP's hidden activation act(gate(h)) · up(h): the input of down_proj."""
    family = block_family(block)
    gate, up = (get_path(block, name) for name in family.point("gate_up").linears)
    return get_path(block, family.act_fn)(gate(h)) * up(h)


def _attention_pre_o(block: nn.Module, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    attn = attention(block)
    name = block_family(block).attention_output.rpartition(".")[2]
    saved = getattr(attn, name)
    setattr(attn, name, nn.Identity())
    try:
        return _attention(block, attn, h, runner)
    finally:
        setattr(attn, name, saved)


def _point_output(block: nn.Module, point: str, h: torch.Tensor, runner: BlockRunner) -> torch.Tensor:
    if point == "qkv":
        return _attention_pre_o(block, h, runner)
    if point == "gate_up":
        return _gated(block, h)
    return get_path(block, block_family(block).point("down").linears[0])(h)


def _transformed_weight(module: nn.Module) -> torch.Tensor:
    return module.transformed_weight().detach() if isinstance(module, QuantLinear) else module.weight.detach()


def point_weights(block: nn.Module, point: str) -> list[torch.Tensor]:
    """The point's projection weights with their existing input transforms folded in (what a reassembly maps)."""
    return [_transformed_weight(block.get_submodule(name)) for name in block_family(block).point(point).linears]


def point_activations(block: nn.Module, point: str, h: torch.Tensor) -> torch.Tensor:
    """The point's input `h` after its projections' existing input transforms (they share them)."""
    first = block.get_submodule(block_family(block).stat_key(point))
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
    (and, at the qkv point, quantized attention inputs when `attn_spec` is on), over the windows of `h`.

    The squared errors are summed in float64: under torchrun each rank scores its share of the windows and the sums
    are added (one collective per candidate), giving the one-process loss whatever the split."""
    part = world().shard(h.shape[0], 1)
    h = h[part]
    with torch.no_grad():
        target = _point_output(block, point, h, runner) if h.shape[0] else None
    qblock = copy.deepcopy(block)
    set_attention_quant(qblock, attn_spec)
    qlinears = []
    for name in block_family(block).point(point).linears:
        parent, _, attr = name.rpartition(".")
        ql = QuantLinear.from_module(qblock.get_submodule(name), weight_spec, act_spec)
        setattr(qblock.get_submodule(parent), attr, ql)
        qlinears.append(ql)

    def loss(reassembly) -> float:
        for ql in qlinears:
            ql.set_reassembly(None if reassembly is None or reassembly.is_identity else reassembly)
        sums = torch.zeros(2, dtype=torch.float64)
        if target is not None:
            with torch.no_grad():
                out = _point_output(qblock, point, h, runner)
            sums[0] = (out.float() - target.float()).pow(2).sum(dtype=torch.float64).item()
            sums[1] = out.numel()
        total, count = world().all_reduce_(sums).tolist()
        return total / count

    return loss
