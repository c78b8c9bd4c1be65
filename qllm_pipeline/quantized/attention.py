"""Quantized attention inputs: Q and K after RoPE, and V, fake-quantized per token and head before the attention
matmuls (the QLLM reference's QuantMatMul inputs; QuaRot/SpinQuant's KV quantization). The softmax output stays in
full precision.

transformers computes RoPE inside the attention module and then calls the function registered for
`config._attn_implementation`; we register one more, `qllm_sdpa`, that quantizes its inputs and calls SDPA. A block
opts in through `set_attention_quant`, which gives its attention module a private config naming that function, so
the model the block was copied from is untouched.

Optionally (`qk_hadamard`, set by the rotate stage on the rotated model's attention modules) Q and K are first
rotated per head by a Hadamard matrix H, as QuaRot does online before quantizing K: exact in FP because
(q H)(k H)ᵀ = q kᵀ, while it spreads the outlier channels of Q and K before the quantizer.
"""
from __future__ import annotations

import copy
import functools

from torch import nn

from qllm_pipeline.model.arch import attention
from qllm_pipeline.quantized.quantizer import QuantSpec, quantize_activation

ATTN_IMPLEMENTATION = "qllm_sdpa"
_QUANT_ATTR = "qkv_quant_spec"
QK_HADAMARD_ATTR = "qk_hadamard"


def _quantized_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    spec: QuantSpec | None = getattr(module, _QUANT_ATTR, None)
    if spec is not None:
        if getattr(module, QK_HADAMARD_ATTR, False):
            from qllm_pipeline.quantized.hadamard import OnlineHadamard

            rotate = OnlineHadamard(query.shape[-1]).apply_to_activation
            query, key = rotate(query), rotate(key)
        # [batch, heads, tokens, head_dim]: one (scale, zero) per token and head, over head_dim.
        query, key, value = (quantize_activation(t, spec) for t in (query, key, value))
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def _register() -> None:
    """Register `qllm_sdpa` with transformers on first use: importing its modeling code costs seconds, which a run
    refused by its settings should not pay."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _quantized_sdpa)


def set_attention_quant(block: nn.Module, spec: QuantSpec | None) -> None:
    """Quantize the attention inputs of `block` with `spec` (None or bits=None: leave them in full precision).
    The online QK Hadamard, when the block carries one, is applied only with quantized inputs (in FP it changes nothing)."""
    attn = attention(block)
    enabled = spec is not None and spec.enabled
    setattr(attn, _QUANT_ATTR, spec if enabled else None)
    if enabled and attn.config._attn_implementation != ATTN_IMPLEMENTATION:
        _register()
        attn.config = copy.copy(attn.config)  # private: the FP model's config keeps plain sdpa
        attn.config._attn_implementation = ATTN_IMPLEMENTATION


def attention_spec(quant: dict) -> QuantSpec:
    """The attention-input quantizer of a `quant` config: `attn_bits` (null = off), activation symmetry."""
    return QuantSpec(quant.get("attn_bits"), bool(quant.get("a_symmetric", False)))


def attention_quantized(block: nn.Module) -> bool:
    return getattr(attention(block), _QUANT_ATTR, None) is not None


__all__ = ["ATTN_IMPLEMENTATION", "QK_HADAMARD_ATTR", "set_attention_quant", "attention_spec", "attention_quantized"]
