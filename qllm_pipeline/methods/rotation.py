"""QuaRot-style rotations (Ashkboos et al. 2024, arXiv 2404.00456; SpinQuant's R1-R4 without learning): the residual
stream (R1, :func:`rotate_model`) and the value heads (R2, :func:`rotate_value_heads`) folded into the weights, and
online Hadamards of the down_proj input (R4, :func:`add_online_hadamard`) and of Q/K (:func:`add_online_qk_hadamard`).

For an orthogonal Q (Q Qᵀ = I) the residual stream h can be carried as h Q instead of h without changing the model:

* the token embeddings become E Q;
* every linear that *reads* the residual stream (q/k/v, gate/up, lm_head; ``y = x Wᵀ``) gets W ← W Q, since
  (x Q)(W Q)ᵀ = x Wᵀ;
* every linear that *writes* into it (o_proj, down_proj) gets W ← Qᵀ W (and a bias b ← b Q), so its output is y Q;
* RMSNorm commutes with Q — RMSNorm(x Q) = RMSNorm(x) Q — because ‖x Q‖ = ‖x‖, but only when its weight is all
  ones. So the norm weights are first folded into the following linears' input columns
  (:func:`fuse_norms_into_linears`), which is exact as well.

With a randomized Hadamard Q, an outlier channel of the residual stream is spread evenly over all channels, which
makes per-token activation quantization (and per-channel weight quantization) much easier. The model's logits are
unchanged up to float rounding; all maths is done in float64 and cast back to each weight's dtype.

Hadamard matrices for any width, and the fallback where none is built, are in :mod:`qllm_pipeline.quantized.hadamard`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qllm_pipeline.model.arch import (
    attention,
    block_family,
    decoder_layers,
    embeddings,
    family_of,
    final_norm,
    set_decoder_layers,
)
from qllm_pipeline.quantized.hadamard import (  # noqa: F401  (hadamard_matrix, random_orthogonal: re-exported)
    OnlineHadamard,
    hadamard_factors,
    hadamard_matrix,
    random_hadamard,
    random_orthogonal,
)
from qllm_pipeline.quantized.qlinear import weight_changed

__all__ = [
    "hadamard_matrix",
    "random_orthogonal",
    "random_hadamard",
    "untie_lm_head",
    "fuse_norms_into_linears",
    "rotate_model",
    "rotate_value_heads",
    "add_online_hadamard",
    "o_proj_block",
    "add_online_qk_hadamard",
    "rotate_layer",
    "rotate_skeleton",
    "rotated_view",
]

# Which linears read and write the residual stream, and which norm feeds which: the family's layout (arch.Family).


# ----------------------------------------------------------------------------------------------------------------------
# Folding into a model


def _set(param: Tensor, value: Tensor) -> None:
    param.data.copy_(value.to(param.device, param.dtype))


def untie_lm_head(model: nn.Module) -> bool:
    """Give lm_head its own copy of the weight if it shares it with embed_tokens; return whether it was tied."""
    head, embed = model.get_output_embeddings(), embeddings(model)
    tied = head.weight is embed.weight or (
        head.weight.device == embed.weight.device
        and head.weight.shape == embed.weight.shape
        and head.weight.data_ptr() == embed.weight.data_ptr()
    )
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so save_pretrained / tie_weights keep them apart
    return tied


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Module], offset: float = 0.0) -> None:
    """The norm's scale g = offset + weight (`arch.Family.norm_offset`) moves into the linears; g becomes 1."""
    if getattr(norm, "bias", None) is not None:
        raise NotImplementedError("folding a norm with a bias (LayerNorm) is not supported; LLaMA's RMSNorm has none")
    g = norm.weight.data.double() + offset
    for linear in linears:
        w = linear.weight
        _set(w, w.data.double() * g.to(w.device).unsqueeze(0))
        weight_changed(linear)
    norm.weight.data.fill_(1.0 - offset)


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module) -> None:
    """In place: fold one decoder block's RMSNorm weights into the linears they feed (input_layernorm -> q/k/v,
    post_attention_layernorm -> gate/up) and set them to ones."""
    family = block_family(layer)
    for norm_path, linear_paths in family.norm_linears.items():
        _fold_norm(layer.get_submodule(norm_path), [layer.get_submodule(p) for p in linear_paths], family.norm_offset)


@torch.no_grad()
def fuse_final_norm(model: nn.Module) -> None:
    """In place: fold the final norm into lm_head (untied from embed_tokens first if tied)."""
    untie_lm_head(model)
    _fold_norm(final_norm(model), [model.get_output_embeddings()], family_of(model).norm_offset)


@torch.no_grad()
def fuse_norms_into_linears(model: nn.Module) -> None:
    """In place: fold every RMSNorm weight into the input columns of the linears it feeds and set it to ones.

    input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, the final norm -> lm_head (untied from
    embed_tokens first if tied). Exact in full precision (up to rounding); idempotent.
    """
    for layer in decoder_layers(model):
        fuse_layer_norms(layer)
    fuse_final_norm(model)


def _read(linear: nn.Module, q: Tensor) -> None:
    w = linear.weight
    _set(w, w.data.double() @ q.to(w.device))
    weight_changed(linear)


def _write(linear: nn.Module, q: Tensor) -> None:
    w = linear.weight
    _set(w, q.to(w.device).T @ w.data.double())
    if getattr(linear, "bias", None) is not None:
        _set(linear.bias, linear.bias.data.double() @ q.to(linear.bias.device))
    weight_changed(linear)


def _check_rotation(q: Tensor, hidden: int) -> Tensor:
    if q.shape != (hidden, hidden):
        raise ValueError(f"rotation has shape {tuple(q.shape)} but the model's hidden size is {hidden}")
    return q.double().cpu()


@torch.no_grad()
def rotate_layer(layer: nn.Module, q: Tensor) -> None:
    """In place: one decoder block's part of :func:`rotate_model` (norms folded, readers W Q, writers Qᵀ W)."""
    fuse_layer_norms(layer)
    q = q.double().cpu()
    family = block_family(layer)
    for path in family.readers:
        _read(layer.get_submodule(path), q)
    for path in family.writers:
        _write(layer.get_submodule(path), q)


@torch.no_grad()
def rotate_skeleton(model: nn.Module, q: Tensor) -> None:
    """In place: the parts of :func:`rotate_model` outside the decoder blocks (final norm folded into lm_head,
    embeddings E Q, lm_head W Q), so that blocks can be rotated one at a time (:func:`rotate_layer`)."""
    q = _check_rotation(q, model.config.hidden_size)
    fuse_final_norm(model)
    embed = embeddings(model).weight
    _set(embed, embed.data.double() @ q.to(embed.device))
    _read(model.get_output_embeddings(), q)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, q: Tensor | None = None) -> Tensor:
    """In place: rotate the residual stream by Q = random_hadamard(hidden_size, seed) (or the given orthogonal q);
    return Q (float64, CPU).

    Norm weights are fused into the linears first (:func:`fuse_norms_into_linears`), which rotation needs to be exact.
    Then embed_tokens E ← E Q, readers (q/k/v/gate/up, lm_head) W ← W Q, writers (o_proj, down_proj) W ← Qᵀ W and
    their biases b ← b Q. The model's logits are unchanged up to float rounding.
    """
    hidden = model.config.hidden_size
    q = random_hadamard(hidden, seed, torch.float64) if q is None else _check_rotation(q, hidden)
    rotate_skeleton(model, q)
    for layer in decoder_layers(model):
        rotate_layer(layer, q)
    return q


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def rotate_value_heads(model: nn.Module) -> None:
    """In place: QuaRot/SpinQuant's R2, a Hadamard rotation H (head_dim × head_dim, normalized) of every attention
    head's values, folded offline into the weights: v_proj's rows of each KV head W_h ← Hᵀ W_h (so v_h ↦ v_h H), and
    o_proj's input columns of each attention head W_o[:, h] ← W_o[:, h] H. Softmax weights mix tokens, not channels,
    so every head's output is rotated by the same H and o_proj undoes it: exact in FP, also with grouped KV heads.
    It spreads outliers of the o_proj input (the attention output) over each head's channels.
    """
    for layer in decoder_layers(model):
        rotate_layer_value_heads(layer, _head_dim(model.config))


@torch.no_grad()
def rotate_layer_value_heads(layer: nn.Module, head_dim: int) -> None:
    """One decoder block's part of :func:`rotate_value_heads`."""
    h = OnlineHadamard(head_dim).matrix(torch.float64)
    v, o = layer.get_submodule(block_family(layer).value_proj), layer.get_submodule(block_family(layer).attention_output)
    wv = v.weight.data.double()
    heads = wv.shape[0] // head_dim
    _set(v.weight, (h.T.to(wv.device) @ wv.reshape(heads, head_dim, -1)).reshape(wv.shape))
    if getattr(v, "bias", None) is not None:
        b = v.bias.data.double().reshape(heads, head_dim)
        _set(v.bias, (b @ h.to(b.device)).reshape(-1))
    wo = o.weight.data.double()
    _set(o.weight, (wo.reshape(wo.shape[0], -1, head_dim) @ h.to(wo.device)).reshape(wo.shape))
    weight_changed(v)
    weight_changed(o)


def add_online_hadamard(model: nn.Module, path: str | None = None, block: int = 1) -> None:
    """In place: an online Hadamard on the input of projection `path` of every block: QuaRot's R4 for down_proj (the
    SwiGLU output); for o_proj one across heads (the attention output's incoherence, where R2 only mixes within a
    head: `block` = head_dim after R2, see :func:`o_proj_block`). The projection becomes a full-precision QuantLinear
    whose input transform is the Hadamard, so its weight is used as W H and the output is unchanged; quantized copies
    of the block keep the transform before their activation quantizer."""
    path = path or family_of(model).point("down").linears[0]
    for layer in decoder_layers(model):
        add_layer_online_hadamard(layer, path, block)


def o_proj_block(config, value_heads: bool) -> int:
    """The block size of the online Hadamard at o_proj's input (`rotate.online_o`): head_dim after R2 when the head
    count has a Hadamard order, so that R2 (``I ⊗ H_hd``) and it (``H_heads ⊗ I``) make the full Hadamard
    ``H_heads ⊗ H_hd`` (QuaRot's construction); otherwise 1, the full-width one. A full-width Hadamard after R2 is
    not a full one: for Sylvester orders it is ``H_heads ⊗ I`` (R2 undoes its within-head half), which left the
    o_proj input of Gemma-3 and Llama-2 unmixed within each head. Without a Hadamard of the head count (SmolLM2's 9
    heads) the full-width one stays: its product with R2 is not flat either (largest entry 7.75/√n, against 1/√n)."""
    head_dim, heads = _head_dim(config), config.num_attention_heads
    return head_dim if value_heads and heads > 1 and hadamard_factors(heads) is not None else 1


def add_layer_online_hadamard(layer: nn.Module, path: str, block: int = 1) -> None:
    """One decoder block's part of :func:`add_online_hadamard`."""
    from qllm_pipeline.quantized.qlinear import QuantLinear
    from qllm_pipeline.quantized.quantizer import QuantSpec

    linear = layer.get_submodule(path)
    if isinstance(linear, QuantLinear) and any(t.kind == "hadamard" for t in linear.input_transforms):
        return
    online = QuantLinear.from_module(linear, QuantSpec(None), QuantSpec(None))
    online.set_transforms([OnlineHadamard(online.in_features, block), *online.input_transforms])
    parent, _, name = path.rpartition(".")
    setattr(layer.get_submodule(parent), name, online)


def add_online_qk_hadamard(model: nn.Module) -> None:
    """Mark every attention module to rotate Q and K per head by a Hadamard online before quantizing them
    (QuaRot's online rotation for K; exact in FP). Only takes effect in blocks whose attention inputs are quantized."""
    for layer in decoder_layers(model):
        mark_layer_qk_hadamard(layer)


def mark_layer_qk_hadamard(layer: nn.Module) -> None:
    from qllm_pipeline.quantized.attention import QK_HADAMARD_ATTR

    setattr(attention(layer), QK_HADAMARD_ATTR, True)


def rotated_view(model: nn.Module, q: Tensor | None = None, value_heads: bool = False, online: tuple[str, ...] = (),
                 online_qk: bool = False, blocks: dict[str, int] | None = None) -> nn.Module:
    """The model with the rotations applied, without a rotated copy of its blocks: the skeleton (embeddings, final
    norm, lm_head) is copied and rotated now, and block i is rotated when a stage asks for it
    (:class:`qllm_pipeline.model.streaming.TransformedLayers`), so memory holds one rotated block at a time. The same
    numbers as applying :func:`rotate_model`, :func:`rotate_value_heads`, :func:`add_online_hadamard` (for each
    path in `online`, with its block size in `blocks`, 1 if absent) and :func:`add_online_qk_hadamard` to a copy of
    the whole model, in that order."""
    from qllm_pipeline.model.streaming import TransformedLayers, skeleton_copy

    view = skeleton_copy(model)
    if q is not None:
        q = _check_rotation(q, model.config.hidden_size)
        rotate_skeleton(view, q)
    head_dim = _head_dim(model.config)

    def transform(layer: nn.Module, index: int) -> nn.Module:
        if q is not None:
            rotate_layer(layer, q)
        if value_heads:
            rotate_layer_value_heads(layer, head_dim)
        for path in online:
            add_layer_online_hadamard(layer, path, (blocks or {}).get(path, 1))
        if online_qk:
            mark_layer_qk_hadamard(layer)
        return layer

    set_decoder_layers(view, TransformedLayers(decoder_layers(model), transform))
    return view
