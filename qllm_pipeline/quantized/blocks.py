"""Decoder-block plumbing: calling one block on its own, and swapping its linears (the layout: `arch.Family`).

Only one block needs to live on the compute device: callers move a block there, run it over the cached
hidden states in mini-batches, and move it back.
"""
from __future__ import annotations

import torch
from torch import nn

from qllm_pipeline.model.arch import (
    block_family,
    decoder_layers,
    family_of,
    layer_type,
    rotary_embedding,
    set_path,
    sliding_window,
)
from qllm_pipeline.quantized.attention import set_attention_quant
from qllm_pipeline.quantized.qlinear import QuantLinear
from qllm_pipeline.quantized.quantizer import QuantSpec

__all__ = ["BlockRunner", "decoder_layers", "get_submodule", "linear_names", "quant_linears", "quantize_block_linears",
           "set_submodule"]


def linear_names(block: nn.Module) -> tuple[str, ...]:
    """The block's projections in forward order, as attribute paths (e.g. ``self_attn.q_proj``)."""
    return block_family(block).linears


def get_submodule(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path)


def set_submodule(block: nn.Module, path: str, module: nn.Module) -> None:
    set_path(block, path, module)


def quantize_block_linears(
    block: nn.Module, weight_spec: QuantSpec, act_spec: QuantSpec, attn_spec: QuantSpec | None = None
) -> dict[str, QuantLinear]:
    """Replace the projections of `block` by QuantLinear (in place); return them by name.

    A projection that is a QuantLinear already (e.g. a rotated model's down_proj with its online Hadamard) keeps its
    input transforms and takes the given specs. `attn_spec` quantizes the attention inputs (Q, K after RoPE, V).
    """
    set_attention_quant(block, attn_spec)
    out = {}
    for name in linear_names(block):
        linear = get_submodule(block, name)
        if isinstance(linear, QuantLinear):
            linear.set_specs(weight_spec, act_spec)
            out[name] = linear
            continue
        qlinear = QuantLinear(linear, weight_spec, act_spec)
        set_submodule(block, name, qlinear)
        out[name] = qlinear
    return out


def quant_linears(block: nn.Module) -> dict[str, QuantLinear]:
    return {name: get_submodule(block, name) for name in linear_names(block)
            if isinstance(get_submodule(block, name), QuantLinear)}


class BlockRunner:
    """Runs a single decoder block on [batch, seq, hidden] inputs with the model's rotary embeddings.

    Attention is causal through SDPA's `is_causal` (no explicit mask), which the model is loaded with; a block whose
    attention has a sliding window shorter than the input gets the banded causal mask transformers would build
    (token i sees tokens i - window < j <= i). A family with a rotary embedding per layer type (Gemma-3's local and
    global layers) gets each block's own cos/sin.
    """

    def __init__(self, model: nn.Module, seq_len: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        hidden = model.config.hidden_size
        self.position_ids = torch.arange(seq_len, device=self.device).unsqueeze(0)
        rotary = rotary_embedding(model).to(self.device)
        kinds = sorted(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
        with torch.no_grad():
            probe = torch.zeros(1, seq_len, hidden, device=self.device, dtype=dtype)
            if family_of(model).rotary_per_layer_type:
                self._rope = {kind: rotary(probe, self.position_ids, kind) for kind in kinds}
            else:
                self._rope = dict.fromkeys(kinds, rotary(probe, position_ids=self.position_ids))
        self.cos, self.sin = self._rope.get("full_attention", next(iter(self._rope.values())))
        if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "flash_attention_2"):
            raise ValueError("BlockRunner needs the model loaded with attn_implementation='sdpa' (causal without a mask)")

    def position_embeddings(self, block: nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._rope[layer_type(block)]
        return cos[:, :length], sin[:, :length]

    def attention_mask(self, block: nn.Module, length: int) -> torch.Tensor | None:
        """None (SDPA's causal path) unless the block's sliding window is shorter than the input."""
        window = sliding_window(block)
        if window is None or window >= length:
            return None
        i = torch.arange(length, device=self.device)
        return ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window))[None, None]

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        length = hidden.shape[1]
        out = block(
            hidden,
            attention_mask=self.attention_mask(block, length),
            position_ids=self.position_ids[:, :length],
            position_embeddings=self.position_embeddings(block, length),
        )
        return out[0] if isinstance(out, tuple) else out

    def run_batched(self, block: nn.Module, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Run `block` (already on self.device) over CPU-resident `hidden` in mini-batches; result on CPU.
        The result is written into one preallocated tensor (a list of chunks and a cat would hold it twice)."""
        out = torch.empty_like(hidden, device="cpu")
        with torch.no_grad():
            for start in range(0, hidden.shape[0], batch_size):
                chunk = hidden[start : start + batch_size].to(self.device, self.dtype)
                out[start : start + batch_size] = self(block, chunk).to("cpu", hidden.dtype)
        return out

