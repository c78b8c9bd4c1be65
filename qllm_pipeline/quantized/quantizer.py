"""Uniform fake quantizers: per-output-channel (optionally grouped) weights, per-token dynamic activations.

All functions return tensors of the input's dtype on the quantization grid ("fake quant"), with a
straight-through estimator so gradients pass unchanged (needed by low-rank error correction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 16
# Part of every cache key of the stages that run quantized forwards: results made by an earlier activation quantizer
# are never reused. 2: compressed-tensors' arithmetic (activation_quant_params).
ACTIVATION_QUANTIZER_VERSION = 2
# Likewise for the weights' grid. 2: a row whose zero point compressed-tensors cannot store (a row of one sign) takes
# its range widened to include 0 (`_storable`); every other row is as in 1.
WEIGHT_GRID_VERSION = 2


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. bits=None (or >= 16 with `full_precision_at_16`) means no quantization."""

    bits: int | None
    symmetric: bool = False
    group_size: int | None = None  # weights only: quantize each row in groups of this many input channels
    # activations only: each token's range is shrunk by this factor before its grid is set (QuaRot's a_clip_ratio),
    # trading a few clipped outliers for a finer grid; 1.0 = min-max
    clip_ratio: float = 1.0

    def __post_init__(self):
        if self.bits is not None and not (MIN_BITS <= int(self.bits) <= MAX_BITS):
            raise ValueError(f"bits={self.bits} is outside {MIN_BITS}..{MAX_BITS}; choose a bit width in that range")
        if self.group_size is not None and int(self.group_size) <= 0:
            raise ValueError(f"group_size={self.group_size} must be a positive integer or null")
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"a_clip_ratio={self.clip_ratio} must be in (0, 1]; 1.0 means no clipping")

    @property
    def enabled(self) -> bool:
        return self.bits is not None


def per_bit_width(setting, bits: int | None, default: float | None = None) -> float:
    """A setting given as one number or as a map {bit width: number} (a recipe's choice per bit width, each chosen on
    held-out windows). A width the map does not list gets `default`, or with no default the nearest listed width's
    value (the smaller width on a tie)."""
    if not isinstance(setting, dict):
        return float(setting)
    by_bits = {int(b): value for b, value in setting.items()}
    if bits in by_bits:
        return float(by_bits[bits])
    if default is not None:
        return float(default)
    nearest = min(by_bits, key=lambda b: (abs(b - bits), b))
    return float(by_bits[nearest])


def activation_clip_ratio(quant: dict) -> float:
    """`quant.a_clip_ratio`: one ratio, or a map {activation bits: ratio} (widths it does not list stay min-max)."""
    return per_bit_width(quant.get("a_clip_ratio", 1.0), quant.get("abits"), default=1.0)


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # Forward: q. Backward: identity (straight-through estimator). Without autograd return q itself, so stored
    # weights sit exactly on the grid (x + (q - x) can be one rounding step off).
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q
    return x + (q - x).detach()


def quant_params(
    x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes, scale and zero point per vector along the last dimension (min-max calibration, the range
    optionally shrunk by `clip_ratio`; values outside it clamp to the end codes).

    codes are integral float32 values: in [0, 2^bits - 1] (asymmetric) or [-2^(bits-1), 2^(bits-1) - 1] (symmetric,
    zero = 0). `dequantize(codes, scale, zero)` gives the fake-quantized tensor.
    """
    xf = x.detach().float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax).clamp(min=1e-8)
        zero = torch.zeros_like(scale)
        codes = torch.clamp(torch.round(x.float() / scale), -qmax - 1, qmax)
    else:
        qmax = 2**bits - 1
        lo = xf.amin(dim=-1, keepdim=True) * clip_ratio
        hi = xf.amax(dim=-1, keepdim=True) * clip_ratio
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = torch.round(-lo / scale)
        codes = torch.clamp(torch.round(x.float() / scale) + zero, 0, qmax)
        codes, scale, zero = _storable(xf, bits, codes, scale, zero, clip_ratio)
    return codes, scale, zero


def _storable(xf: torch.Tensor, bits: int, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric grids whose zero point a checkpoint can store. compressed-tensors keeps it in int8 on its signed
    grid (z - 2^(b-1) in [-128, 127]); a vector of one sign, whose min-max range leaves 0 out, can fall outside (at 8
    bits always). Those vectors take their range widened to include 0, as compressed-tensors' own observers always
    do; every other vector is unchanged."""
    offset = 2 ** (bits - 1)
    bad = (zero - offset < -128) | (zero - offset > 127)
    if not bool(bad.any()):
        return codes, scale, zero
    qmax = 2**bits - 1
    lo = (xf.amin(dim=-1, keepdim=True) * clip_ratio).clamp(max=0)
    hi = (xf.amax(dim=-1, keepdim=True) * clip_ratio).clamp(min=0)
    wide_scale = ((hi - lo) / qmax).clamp(min=1e-8)
    wide_zero = torch.round(-lo / wide_scale)
    wide_codes = torch.clamp(torch.round(xf / wide_scale) + wide_zero, 0, qmax)
    return torch.where(bad, wide_codes, codes), torch.where(bad, wide_scale, scale), torch.where(bad, wide_zero, zero)


def activation_quant_params(
    x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quant_params` for per-token activations: codes, scale and zero point in the same conventions (unsigned codes
    when asymmetric), with the asymmetric grid computed in compressed-tensors' arithmetic, the quantizer stock
    transformers runs on our exported checkpoints. Three differences from the weights' `quant_params`: the range
    always includes 0, the zero point is rounded on the signed grid (round(-2^(b-1) - lo/s)), and each code is
    round(x/s + z) in one float expression instead of round(x/s) + z. The last two only move values near a rounding
    tie, but a real model carries such one-code flips through its later blocks (±0.3 % perplexity on SmolLM2 at
    W8A8): matching them bit for bit is what makes a reloaded checkpoint give the pipeline's perplexity.

    Symmetric activations keep amax / (2^(b-1) - 1), vLLM's int8 kernels' scale (compressed-tensors' own dynamic
    quantizer divides by (2^b - 1) / 2 instead).
    """
    if symmetric:
        return quant_params(x, bits, True, clip_ratio)
    codes, scale, zero = _signed_token_grid(x.detach().float(), bits, clip_ratio, torch.round)
    half = 2 ** (bits - 1)
    return codes + half, scale, zero + half


def _signed_token_grid(xf: torch.Tensor, bits: int, clip, round_fn):
    """compressed-tensors' asymmetric per-token grid of float32 `xf`: signed codes, scale and signed zero point.
    `round_fn` is torch.round, or a straight-through rounding when the clip is trained."""
    half = 2 ** (bits - 1)
    lo = torch.clamp(xf.detach().amin(dim=-1, keepdim=True) * clip, max=0.0)
    hi = torch.clamp(xf.detach().amax(dim=-1, keepdim=True) * clip, min=0.0)
    # compressed-tensors' guard for an all-zero token: a zero scale becomes float32's eps
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    zero = round_fn(torch.clamp(-half - lo / scale, -half, half - 1))
    codes = round_fn(torch.clamp(xf / scale + zero, -half, half - 1))
    return codes, scale, zero


def clipped_quant_params(
    x: torch.Tensor, bits: int, symmetric: bool = False, grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `quant_params`, but each vector's range [min, max] is shrunk by the factor p ∈ {1, 1 - 1/grid, …,
    1 - max_shrink} that minimises Σ|x - q(x)|^norm: clipping a few extreme weights buys a finer grid for all the
    others (the GPTQ reference's `mse` option and QuaRot's weight clipping; norm 2.4 as there)."""
    xf = x.detach().float()
    best_codes, best_scale, best_zero = quant_params(xf, bits, symmetric)
    best_err = (dequantize(best_codes, best_scale, best_zero) - xf).abs().pow(norm).sum(-1, keepdim=True)
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    for i in range(1, int(max_shrink * grid) + 1):
        p = 1 - i / grid
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scale = (torch.maximum(-lo, hi) * p / qmax).clamp(min=1e-8)
            zero = torch.zeros_like(scale)
            codes = torch.clamp(torch.round(xf / scale), -qmax - 1, qmax)
        else:
            qmax = 2**bits - 1
            scale = ((hi - lo) * p / qmax).clamp(min=1e-8)
            zero = torch.round(-lo * p / scale)
            codes = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
        err = (dequantize(codes, scale, zero) - xf).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_codes = torch.where(better, codes, best_codes)
    if not symmetric:  # a shrunk candidate of a one-sign vector has the same unstorable zero point
        best_codes, best_scale, best_zero = _storable(xf, bits, best_codes, best_scale, best_zero)
    return best_codes, best_scale, best_zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes - zero) * scale


def quantize_lastdim(x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantize `x` with one (scale, zero) per vector along the last dimension (min-max calibration)."""
    q = dequantize(*quant_params(x, bits, symmetric, clip_ratio))
    return _ste(x, q.to(x.dtype))


def quantize_tokens(x: torch.Tensor, bits: int, symmetric: bool = False, clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantize `x` per vector along the last dimension with the activation quantizer (`activation_quant_params`)."""
    q = dequantize(*activation_quant_params(x, bits, symmetric, clip_ratio))
    return _ste(x, q.to(x.dtype))


def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-output-channel (row) fake quantization of a [out, in] weight, optionally in groups of input channels."""
    if not spec.enabled:
        return w
    out_features, in_features = w.shape
    if spec.group_size:
        if in_features % spec.group_size:
            raise ValueError(
                f"quant.group_size={spec.group_size} does not divide in_features={in_features}; "
                "pick a group size that divides every layer's input width, or null for per-channel"
            )
        grouped = w.reshape(out_features, in_features // spec.group_size, spec.group_size)
        return quantize_lastdim(grouped, spec.bits, spec.symmetric).reshape(out_features, in_features)
    return quantize_lastdim(w, spec.bits, spec.symmetric)


def weight_codes(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The integer form of `quantize_weight`: codes [out, in], scale and zero [out, in / group_size] (float32).

    `dequantize_weight(**weight_codes(w, spec), group_size=spec.group_size)` equals `quantize_weight(w, spec)` bit for bit.
    """
    out_features, in_features = w.shape
    group = spec.group_size or in_features
    if in_features % group:
        raise ValueError(f"quant.group_size={spec.group_size} does not divide in_features={in_features}")
    codes, scale, zero = quant_params(w.reshape(out_features, in_features // group, group), spec.bits, spec.symmetric)
    return {"codes": codes.reshape(out_features, in_features), "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    out_features, in_features = codes.shape
    groups = scale.shape[-1]
    grouped = codes.float().reshape(out_features, groups, in_features // groups)
    return dequantize(grouped, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(out_features, in_features)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # round(x) exactly in the forward (x - x.detach() is exactly 0), the identity in the backward
    return torch.round(x).detach() + (x - x.detach())


def quantize_lastdim_learned_clip(x: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor) -> torch.Tensor:
    """`quantize_tokens` with the clip ratio a trainable tensor: the same forward values as with
    `clip_ratio=float(clip)`, and gradients for `clip` through the scale and the zero point (rounding
    straight-through, clamped values pass no gradient to x: LSQ / OmniQuant's learnable clipping)."""
    xf = x.float()
    c = clip.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.detach().abs().amax(dim=-1, keepdim=True) * c / qmax).clamp(min=1e-8)
        q = torch.clamp(_round_ste(xf / scale), -qmax - 1, qmax) * scale
    else:  # activation_quant_params' grid, with straight-through rounding
        codes, scale, zero = _signed_token_grid(xf, bits, c, _round_ste)
        q = (codes - zero) * scale
    return q.to(x.dtype)


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-token dynamic fake quantization: one (scale, zero) per token over its channels."""
    if not spec.enabled:
        return x
    return quantize_tokens(x, spec.bits, spec.symmetric, spec.clip_ratio)


def _grouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    out_features, in_features = w.shape
    if in_features % groups:
        raise ValueError(f"{groups} weight groups do not divide in_features={in_features}")
    return w.reshape(out_features, groups, in_features // groups)


def weight_codes_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Integer codes of a [out, in] weight on a *given* grid (scale, zero [out, groups]) instead of its min-max one:
    how a weight refined on top of a fixed rounding (GPTQ, then LRC) keeps that rounding's grid."""
    qmin, qmax = (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1) if spec.symmetric else (0, 2**spec.bits - 1)
    grouped = _grouped(w.float(), scale.shape[-1])
    codes = torch.clamp(torch.round(grouped / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qmin, qmax)
    return {"codes": codes.reshape(w.shape), "scale": scale, "zero": zero}


def quantize_weight_with_params(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize `w` on the given grid, with the straight-through estimator."""
    q = dequantize_weight(**weight_codes_with_params(w, scale, zero, spec))
    return _ste(w, q.to(w.dtype))
