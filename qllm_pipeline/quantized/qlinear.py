"""QuantLinear: a drop-in for nn.Linear that fake-quantizes its input per token and its weight per channel.

Optional pieces, each owned by a method stage:
- `input_transforms`: an ordered list of input transforms (qllm_pipeline.quantized.transforms): each maps the input before the
  activation quantizer and is folded into the weight, e.g. an online Hadamard (rotate) then a channel reassembly (CRA);
- `lora_A`, `lora_B`: a low-rank correction trained with the base weight frozen; the weight that is quantized
  is T(W) + B·A, so merging it into the weight later is exact.
The stored `weight` is the untransformed one until `fuse`, which stores the quantized merged weight.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from qllm_pipeline.quantized.quantizer import (
    QuantSpec,
    dequantize_weight,
    quantize_activation,
    quantize_lastdim_learned_clip,
    quantize_weight,
    quantize_weight_with_params,
    weight_codes,
    weight_codes_with_params,
)


class QuantLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.input_transforms: list = []  # applied in order to the input; folded into the weight
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.weight_is_quantized = False  # set once the stored weight is already on the grid (fused models)
        # A base weight rounded elsewhere (GPTQ) that the low-rank correction refines: stored in the transformed
        # basis, and quantized on its own fixed grid (scale, zero) so that with B·A = 0 it stays exactly as rounded.
        self.base_qparams: dict[str, torch.Tensor] | None = None
        self.codes: dict[str, torch.Tensor] | None = None  # integer form of a fused weight
        # A clip ratio of this projection's activation quantizer learned with the low-rank correction (a 0-dim
        # parameter while training; `fuse` moves it into act_spec). None: the spec's ratio.
        self.act_clip: nn.Parameter | None = None
        self.act_clip_learned = False  # act_spec's clip ratio is this projection's own (stored with the fused block)
        # End-to-end tuning of a fused weight's grid: the integer codes stay, each row's (group's) scale is
        # multiplied by 1 + scale_delta (a trainable tensor shaped like the scale; None when not tuning).
        self.scale_delta: nn.Parameter | None = None
        self._qweight_cache: torch.Tensor | None = None

    @classmethod
    def from_module(cls, module: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec) -> "QuantLinear":
        """A QuantLinear for an nn.Linear, or a copy of a QuantLinear (its transforms kept) with the given specs."""
        if isinstance(module, QuantLinear):
            copy_ = copy.deepcopy(module)
            copy_.set_specs(weight_spec, act_spec)
            return copy_
        return cls(module, weight_spec, act_spec)

    @property
    def reassembly(self):
        """The channel-reassembly transform, if any (CRA's place in the list is last, next to the quantizer)."""
        return next((t for t in self.input_transforms if t.kind == "reassembly"), None)

    def set_reassembly(self, reassembly) -> None:
        """Replace the channel reassembly (None removes it); other transforms keep their place before it."""
        self.input_transforms = [t for t in self.input_transforms if t.kind != "reassembly"]
        if reassembly is not None:
            self.input_transforms.append(reassembly)
        self._qweight_cache = None

    def set_transforms(self, transforms: list) -> None:
        self.input_transforms = list(transforms)
        self._qweight_cache = None

    def set_specs(self, weight_spec: QuantSpec, act_spec: QuantSpec) -> None:
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self._qweight_cache = None

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the activation quantizer sees it: every input transform applied in order."""
        for transform in self.input_transforms:
            x = transform.apply_to_activation(x)
        return x

    def add_lora(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Attach A (r×in, small random) and B (out×r, zeros): the block output is unchanged at init."""
        in_features = self.effective_in_features
        a = torch.empty(rank, in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=5**0.5, generator=generator)
        self.lora_A = nn.Parameter(a.to(self.weight.device, self.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device, dtype=self.weight.dtype))
        self._qweight_cache = None

    @property
    def effective_in_features(self) -> int:
        return self.input_transforms[-1].out_channels if self.input_transforms else self.in_features

    def transformed_weight(self) -> torch.Tensor:
        """The weight with every input transform folded in (columns match `transform_input`)."""
        if self.weight_is_quantized or self.base_qparams is not None:  # stored already transformed
            return self.weight
        w = self.weight
        for transform in self.input_transforms:
            w = transform.apply_to_weight(w)
        return w

    def merged_weight(self) -> torch.Tensor:
        """The full-precision weight the quantizer sees: transformed W plus the low-rank correction."""
        w = self.transformed_weight()
        if self.lora_A is not None:
            w = w + self.lora_B @ self.lora_A
        return w

    def set_base(self, codes: dict[str, torch.Tensor]) -> None:
        """Use a weight already rounded in the transformed basis (e.g. by GPTQ) as the base the correction refines;
        it keeps its grid: quantizing it (plus B·A) uses `codes`' scale and zero, not a new min-max."""
        self.weight = nn.Parameter(dequantize_weight(**codes).to(self.weight.dtype), requires_grad=False)
        self.base_qparams = {"scale": codes["scale"], "zero": codes["zero"]}
        self._qweight_cache = None

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.base_qparams is None or not self.weight_spec.enabled:
            return quantize_weight(w, self.weight_spec)
        p = {k: v.to(w.device) for k, v in self.base_qparams.items()}
        return quantize_weight_with_params(w, p["scale"], p["zero"], self.weight_spec)

    def quantized_weight(self) -> torch.Tensor:
        if self.scale_delta is not None:  # a fused weight whose scales are being tuned: same codes, new scales
            return dequantize_weight(self.codes["codes"], self.codes["scale"] * (1 + self.scale_delta), self.codes["zero"])
        if self.weight_is_quantized:  # fused: the stored weight is already reassembled, merged and quantized
            return self.weight
        if self.lora_A is not None:  # being trained: recompute so gradients reach A and B
            return self._quantize(self.merged_weight())
        # Frozen weights: quantize once and reuse (evaluation runs many windows through the same block).
        if self._qweight_cache is None:
            with torch.no_grad():
                self._qweight_cache = self._quantize(self.merged_weight())
        return self._qweight_cache

    def add_act_clip(self) -> None:
        """A trainable clip ratio for the activation quantizer, starting at the spec's."""
        value = torch.tensor(float(self.act_spec.clip_ratio), dtype=torch.float32, device=self.weight.device)
        self.act_clip = nn.Parameter(value, requires_grad=False)

    def set_act_clip(self, ratio: float) -> None:
        """This projection's own activation clip ratio (a learned one, fixed from now on)."""
        self.act_spec = dataclasses.replace(self.act_spec, clip_ratio=float(ratio))
        self.act_clip = None
        self.act_clip_learned = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.act_clip is not None and self.act_spec.enabled:  # the clip ratio being learned
            x = quantize_lastdim_learned_clip(x, self.act_spec.bits, self.act_spec.symmetric, self.act_clip)
        else:
            x = quantize_activation(x, self.act_spec)
        return nn.functional.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def fuse(self, codes: dict[str, torch.Tensor] | None = None) -> None:
        """Store the quantized W' = Q(T(W) + B·A) as the weight and drop the LoRA parameters.

        `codes` keeps the integer form (codes, scale, zero) that export packs; the weight is its exact dequantization.
        By default the merged weight is rounded to nearest; a caller with another rounding (GPTQ) passes its codes.
        """
        with torch.no_grad():
            merged = self.merged_weight().detach()
            if self.weight_spec.enabled:
                if codes is None and self.base_qparams is not None:  # refined on a fixed grid: stay on it
                    p = {k: v.to(merged.device) for k, v in self.base_qparams.items()}
                    codes = weight_codes_with_params(merged, p["scale"], p["zero"], self.weight_spec)
                self.codes = weight_codes(merged, self.weight_spec) if codes is None else codes
                merged = dequantize_weight(**self.codes).to(merged.dtype)
        self.weight = nn.Parameter(merged.clone(), requires_grad=False)
        self.lora_A = self.lora_B = None
        if self.act_clip is not None:
            self.set_act_clip(float(self.act_clip))
        self.base_qparams = None
        self.weight_is_quantized = True
        self._qweight_cache = None

    def add_scale_tuning(self) -> None:
        """Make this fused weight's scales trainable (a multiplicative delta starting at 0: the output is unchanged)."""
        if not self.weight_is_quantized or self.codes is None:
            raise ValueError("scale tuning needs a fused weight in integer form (codes, scale, zero)")
        self.scale_delta = nn.Parameter(torch.zeros_like(self.codes["scale"]), requires_grad=False)

    def commit_scale_tuning(self) -> None:
        """Fold the tuned scales into the integer form and the stored weight; the codes are unchanged."""
        if self.scale_delta is None:
            return
        with torch.no_grad():
            scale = self.codes["scale"] * (1 + self.scale_delta.detach().to(self.codes["scale"].dtype))
        self.scale_delta = None
        self.load_codes({**self.codes, "scale": scale})

    def load_codes(self, codes: dict[str, torch.Tensor]) -> None:
        """Set a fused weight from its integer form (the inverse of what `fuse` stores)."""
        self.codes = codes
        self.weight = nn.Parameter(dequantize_weight(**codes).to(self.weight.dtype), requires_grad=False)
        self.weight_is_quantized = True
        self._qweight_cache = None

    def weight_changed(self) -> None:
        """The weight (or LoRA factors) was edited in place: drop the cached quantized weight."""
        self._qweight_cache = None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, w{self.weight_spec.bits}a{self.act_spec.bits}, "
            f"transforms={[t.kind for t in self.input_transforms]}, lora={self.lora_A is not None}"
        )


def weight_changed(linear: nn.Module) -> None:
    """After editing a linear's weight in place: a QuantLinear drops its cached quantized weight; nn.Linear has none."""
    if isinstance(linear, QuantLinear):
        linear.weight_changed()
