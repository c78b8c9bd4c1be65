"""Real integer execution of fused projections: int8 × int8 → int32 GEMM (`torch._int_mm`) on CPU (and CUDA).

A fused QuantLinear holds integer weight codes with a scale and zero point per output channel. `IntLinear` keeps
those codes as int8 (4-bit codes too, one per byte), quantizes each token of its (transformed) input at run time to
int8 codes with its own scale and zero point, multiplies the codes in integers, and applies the scales and the zero
points afterwards with the usual correction terms. With x ≈ sx (qx - zx) per token and w ≈ sw (qw - zw) per row:

    x·w = sx sw [ Σ qx qw  -  zw Σ qx  -  zx Σ qw  +  K zx zw ]

Σ qx qw is the integer GEMM; Σ qw is precomputed per row, Σ qx per token. Asymmetric codes (unsigned, [0, 2^b - 1])
are shifted by 2^(b-1) into int8 together with their zero points, which leaves every difference unchanged. The
result equals the fake-quantized product up to float rounding (the codes are the same; only the summation differs).
"""
from __future__ import annotations

import torch
from torch import nn

from qllm_pipeline.quantized.blocks import decoder_layers, quant_linears, set_submodule
from qllm_pipeline.quantized.qlinear import QuantLinear
from qllm_pipeline.quantized.quantizer import activation_quant_params


def _signed(codes: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and zero points moved into int8's range (asymmetric codes shift by 2^(bits-1); symmetric ones already fit)."""
    if symmetric:
        return codes, zero
    return codes - 2 ** (bits - 1), zero - 2 ** (bits - 1)


class IntLinear(nn.Module):
    """A fused projection computed with integer GEMM. Built from a fused QuantLinear with per-channel integer codes."""

    def __init__(self, ql: QuantLinear):
        super().__init__()
        wspec, aspec = ql.weight_spec, ql.act_spec
        if ql.codes is None or not ql.weight_is_quantized:
            raise ValueError("IntLinear needs a fused QuantLinear with integer codes")
        if not (wspec.enabled and aspec.enabled) or wspec.bits > 8 or aspec.bits > 8:
            raise ValueError(f"integer GEMM needs weights and activations of at most 8 bits (got w{wspec.bits}a{aspec.bits})")
        if ql.codes["scale"].shape[-1] != 1:
            raise ValueError("integer GEMM supports per-channel weights only (quant.group_size=null)")
        codes, zero = _signed(ql.codes["codes"].float(), ql.codes["zero"].float().squeeze(-1), wspec.bits, wspec.symmetric)
        self.register_buffer("qweight_t", codes.to(torch.int8).t().contiguous())  # [in, out]: _int_mm's right operand
        self.register_buffer("w_rowsum", codes.sum(dim=1).to(torch.float32))  # Σ_k qw[o, k]
        self.register_buffer("w_scale", ql.codes["scale"].float().squeeze(-1))
        self.register_buffer("w_zero", zero.to(torch.float32))
        self.bias = None if ql.bias is None else nn.Parameter(ql.bias.detach().clone(), requires_grad=False)
        self.input_transforms = ql.input_transforms
        self.act_spec = aspec
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.input_transforms:
            x = transform.apply_to_activation(x)
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        spec = self.act_spec
        codes, scale, zero = activation_quant_params(x, spec.bits, spec.symmetric, spec.clip_ratio)  # per token
        qx, zx = _signed(codes, zero, spec.bits, spec.symmetric)
        qx = qx.to(torch.int8)
        acc = torch._int_mm(qx, self.qweight_t).to(torch.float32)  # [tokens, out], exact in int32
        xsum = qx.sum(dim=1, keepdim=True, dtype=torch.int32).to(torch.float32)
        acc = acc - xsum * self.w_zero - zx * self.w_rowsum + self.in_features * zx * self.w_zero
        y = acc * scale * self.w_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, a{self.act_spec.bits}, int8 GEMM"


def to_integer_model(model: nn.Module) -> nn.Module:
    """Replace every fused QuantLinear of the decoder blocks by an IntLinear, in place; returns the model."""
    for layer in decoder_layers(model):
        for name, ql in quant_linears(layer).items():
            set_submodule(layer, name, IntLinear(ql))
    return model
