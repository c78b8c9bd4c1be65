"""SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438) as an exact full-precision transform of one decoder block.

Per-token activation quantization suffers from a few input channels with very large magnitudes; per-output-channel
weight quantization does not mind a few large input columns nearly as much. SmoothQuant migrates the difficulty:
for a linear ``y = x Wᵀ`` it picks per-input-channel scales ``s`` and rewrites

    y = (x / s) (W · s)ᵀ            (x / s: divide channel j by s_j;  W · s: multiply column j by s_j)

with ``s_j = max|X_j|^α / max|W_{:,j}|^(1-α)`` (α = 0.5 balances the two). In a LLaMA block the inputs of q/k/v
(and of gate/up) are RMSNorm outputs, ``x = g ⊙ x̂``, so ``x / s`` is folded into the norm weight ``g ← g / s`` and
nothing runs at inference time. All linears sharing one input share one ``s`` (max over their weights' columns).

This module mirrors the reference implementation (mit-han-lab/smoothquant, ``smooth_ln_fcs``): weight column maxima
and the scales are both clamped to >= 1e-5.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qllm_pipeline.model.arch import Family, Point, block_family
from qllm_pipeline.quantized.qlinear import weight_changed

__all__ = ["smoothing_points", "smoothing_scales", "block_smoothing_scales", "apply_smoothing", "smooth_block",
           "smooth_norm_linears", "smoothed_channel_max"]

_CLAMP = 1e-5


def smoothing_points(block: nn.Module) -> dict[str, Point]:
    """The points whose input is a norm's output (q/k/v, gate/up): SmoothQuant folds x / s into that norm. The
    activation maximum of a point is its first projection's input's (`act_max[point.linears[0]]`)."""
    return {p.name: p for p in block_family(block).points if p.norm is not None}


def smoothing_scales(act_channel_max: Tensor, weights: Sequence[Tensor], alpha: float = 0.5) -> Tensor:
    """Per-input-channel smoothing factors s (float32, shape [in_features]).

    act_channel_max: max |x_j| over calibration tokens, one per input channel.
    weights: the [out, in] weights of every linear that reads this input; their column maxima are max-reduced.
    s_j = act_max_j^α / w_max_j^(1-α), with w_max clamped to >= 1e-5 and s clamped to >= 1e-5.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    if len(weights) == 0:
        raise ValueError("smoothing_scales needs at least one weight")
    act = act_channel_max.detach().float().abs().flatten()
    w_max = torch.stack([w.detach().float().abs().amax(dim=0).to(act.device) for w in weights]).amax(dim=0)
    if w_max.shape != act.shape:
        raise ValueError(f"act_channel_max has {act.numel()} channels but the weights have {w_max.numel()} input columns")
    w_max = w_max.clamp(min=_CLAMP)
    return (act.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=_CLAMP)


@torch.no_grad()
def smooth_norm_linears(norm: nn.Module, linears: Sequence[nn.Module], scales: Tensor, offset: float = 0.0) -> None:
    """In place: the norm's scale g /= s, and every linear's weight columns *= s (computed in float64, cast back).

    Exact in full precision: (x̂ ⊙ g / s) (W · s)ᵀ = (x̂ ⊙ g) Wᵀ. A norm bias (LayerNorm) is divided by s as well.
    The norm scales by g = offset + weight (`arch.Family.norm_offset`: 1 for Gemma's (1 + w) norms).
    """
    s = scales.detach().double()
    g = norm.weight.data.double() + offset
    norm.weight.data.copy_((g / s.to(norm.weight.device) - offset).to(norm.weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.data.copy_((bias.data.double() / s.to(bias.device)).to(bias.dtype))
    for linear in linears:
        w = linear.weight
        w.data.copy_((w.data.double() * s.to(w.device).unsqueeze(0)).to(w.dtype))
        weight_changed(linear)


def block_smoothing_scales(block: nn.Module, act_max: dict[str, Tensor], alpha: float = 0.5) -> dict[str, Tensor]:
    """The scales {"qkv": s1, "gate_up": s2} of one decoder layer, without changing it.

    act_max["self_attn.q_proj"] / act_max["mlp.gate_proj"]: per-channel max |x| of the inputs of those linears (the
    input_layernorm / post_attention_layernorm outputs), measured on the block *before* smoothing.
    """
    points = smoothing_points(block)
    missing = [p.linears[0] for p in points.values() if p.linears[0] not in act_max]
    if missing:
        raise KeyError(f"act_max lacks {missing}; record the per-channel max |x| of those linears' inputs (forward pre-hooks)")
    return {
        name: smoothing_scales(act_max[p.linears[0]], [block.get_submodule(path).weight for path in p.linears], alpha)
        for name, p in points.items()
    }


def apply_smoothing(block: nn.Module, scales: dict[str, Tensor]) -> None:
    """In place: fold each point's scales into its norm (÷ s) and the linears it feeds (× s)."""
    points, offset = smoothing_points(block), block_family(block).norm_offset
    for name, s in scales.items():
        p = points[name]
        smooth_norm_linears(block.get_submodule(p.norm), [block.get_submodule(path) for path in p.linears], s, offset)


def smooth_block(block: nn.Module, act_max: dict[str, Tensor], alpha: float = 0.5) -> dict[str, Tensor]:
    """Apply SmoothQuant in place to one decoder layer; return the scales {"qkv": s1, "gate_up": s2}.

    The block's full-precision output is unchanged up to float rounding.
    """
    scales = block_smoothing_scales(block, act_max, alpha)
    apply_smoothing(block, scales)
    return scales


def smoothed_channel_max(act_max: dict[str, Tensor], scales: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """Per-channel max |x| of every linear's input after smoothing: the inputs of a smoothed point are x / s."""
    out = dict(act_max)
    for point, s in scales.items():
        for path in family.point(point).linears:
            if path in out:
                out[path] = out[path] / s.to(out[path].dtype)
    return out
