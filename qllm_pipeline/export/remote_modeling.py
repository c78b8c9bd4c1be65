"""Modeling code shipped inside a compressed-tensors checkpoint (as `modeling_qllm.py`, loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`) for the methods whose parts run at run time:
QLLM's channel reassembly, the online Hadamard rotations, the activation clip ratio and quantized attention inputs.

It imports only torch and transformers (never qllm_pipeline): a user of the checkpoint needs neither our package nor
our config. compressed-tensors stores and decompresses the integer weights (already transformed: the reassembly and
the Hadamards are folded into their columns); this file applies, before each projection, its ordered input transforms
and the per-token activation quantizer, and quantizes Q, K (after RoPE and the optional per-head Hadamard) and V
when the checkpoint says so. A tied model's head, untied by the residual rotation, is left out of the checkpoint and
rebuilt from the embeddings before its first use (`qllm_head.*`: the rotation and the folded norm scale). Everything
it needs is in `config.json` (`qllm_runtime`) and in the weights file (`model.layers.<i>.qllm_transforms.*`). One class per family (`QLLM<its transformers class>`), all sharing
`install_runtime`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from transformers import (
    AttentionInterface,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "qllm_runtime_sdpa"


def fake_quantize(x: torch.Tensor, bits: int, symmetric: bool, clip: float = 1.0) -> torch.Tensor:
    """Per-vector (last dimension) min-max quantization, the range shrunk by `clip`; returns the dequantized values.
    Asymmetric: compressed-tensors' arithmetic (the range includes 0; codes round(x/s + z) on the signed grid), so
    a clip of 1 gives exactly what its own dynamic quantizer gives."""
    xf = x.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (xf.abs().amax(dim=-1, keepdim=True) * clip / qmax).clamp(min=1e-8)
        return (torch.clamp(torch.round(xf / scale), -qmax - 1, qmax) * scale).to(x.dtype)
    half = 2 ** (bits - 1)
    lo = torch.clamp(xf.amin(dim=-1, keepdim=True) * clip, max=0.0)
    hi = torch.clamp(xf.amax(dim=-1, keepdim=True) * clip, min=0.0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    zero = torch.round(torch.clamp(-half - lo / scale, -half, half - 1))
    return ((torch.round(torch.clamp(xf / scale + zero, -half, half - 1)) - zero) * scale).to(x.dtype)


def hadamard(x: torch.Tensor, sylvester: torch.Tensor, paley: torch.Tensor | None) -> torch.Tensor:
    """x ↦ x (S ⊗ P) / √n with the scaled Sylvester factor S and the Paley factor P (or S alone)."""
    if paley is None:
        return x @ sylvester
    s, m = sylvester.shape[0], paley.shape[0]
    grid = x.reshape(*x.shape[:-1], s, m) @ paley
    return (grid.transpose(-1, -2) @ sylvester).transpose(-1, -2).reshape(x.shape)


class InputTransforms(nn.Module):
    """A projection's ordered input transforms; buffers `t<i>_<field>` as the checkpoint stores them."""

    def __init__(self, kinds: list[str], shapes: dict[str, list[int]], prefix_dtypes: dict[str, str]):
        super().__init__()
        self.kinds = list(kinds)
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=getattr(torch, prefix_dtypes[name])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, kind in enumerate(self.kinds):
            if kind not in RUNTIME_KINDS:
                raise ValueError(f"unknown input transform {kind!r} in this checkpoint")
            x = RUNTIME_KINDS[kind](x, {name[len(f"t{i}_"):]: buffer for name, buffer in self.named_buffers()
                                        if name.startswith(f"t{i}_")})
        return x


@functools.lru_cache(maxsize=16)
def sylvester_factor(order: int, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The Sylvester factor S/√n of order `order` (a power of two) of an n-wide Hadamard, built in float64 as the
    pipeline builds it, once per order, device and dtype (every layer shares it)."""
    h, h2 = torch.ones(1, 1, dtype=torch.float64), torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.kron(h2, h)
    return (h * (1.0 / math.sqrt(n))).to(torch.float32).to(device=device, dtype=dtype)


def apply_hadamard(x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """The Hadamard on the last axis, or with a `block` b (o_proj after R2) across its blocks of b channels only."""
    paley, block = buffers.get("paley"), buffers.get("block")
    b = 1 if block is None else int(block.reshape(-1)[0])
    grid = x if b == 1 else x.reshape(*x.shape[:-1], x.shape[-1] // b, b).transpose(-1, -2)
    sylvester = sylvester_factor(int(buffers["sylvester_order"].reshape(-1)[0]), grid.shape[-1], x.device, x.dtype)
    out = hadamard(grid, sylvester, None if paley is None else paley.to(x.dtype))
    return out if b == 1 else out.transpose(-1, -2).reshape(x.shape)


def apply_reassembly(x: torch.Tensor, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
    """Output k = Σ coef[e] x[src[e]] over the entries e with dst[e] = k (the first n entries: one per output)."""
    src, dst, coef, n = buffers["src"], buffers["dst"], buffers["coef"].to(x.dtype), int(buffers["out_channels"])
    take = lambda index: torch.gather(x, -1, index.expand(*x.shape[:-1], index.numel()))  # noqa: E731
    out = take(src[:n]) * coef[:n]
    return out.index_add(-1, dst[n:], take(src[n:]) * coef[n:]) if src.numel() > n else out


# The kinds this file runs, by the tag the export writes (each kind's `runtime_buffers` in qllm_pipeline gives the
# buffers its function reads).
RUNTIME_KINDS = {"hadamard": apply_hadamard, "reassembly": apply_reassembly}


def _quantized_attention(module, query, key, value, attention_mask, **kwargs):
    spec = getattr(module, "qllm_attention", None)
    if spec is not None:
        if spec["qk"] is not None:  # the online per-head Hadamard of Q and K, before their quantizer
            query, key = spec["qk"](query), spec["qk"](key)
        # [batch, heads, tokens, head_dim]: one (scale, zero) per token and head
        query, key, value = (fake_quantize(t, spec["bits"], spec["symmetric"]) for t in (query, key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, _quantized_attention)


def prepare_config(config) -> None:
    """Before the model is built: the attention function that quantizes Q, K and V when the checkpoint asks for it."""
    if config.qllm_runtime.get("attn_bits") is not None:
        config._attn_implementation = ATTENTION


class HeadFromEmbeddings(nn.Module):
    """What lm_head is rebuilt from when the checkpoint leaves it out (a tied model after the residual rotation Q,
    the final norm's scale g folded into the head): W = (E Qᵀ) diag(g) Q, E the (rotated) embeddings."""

    def __init__(self, hidden: int):
        super().__init__()
        self.register_buffer("rotation", torch.zeros(hidden, hidden))
        self.register_buffer("norm", torch.zeros(hidden))

    @torch.no_grad()
    def rebuild(self, head: nn.Linear, embed: torch.Tensor, rows: int = 4096) -> None:
        """In place, a slice of the vocabulary at a time (a whole one in float64 is GBs at 70B)."""
        work = torch.float64 if embed.device.type == "cpu" else torch.float32
        q, norm = self.rotation.to(embed.device, work), self.norm.to(embed.device, work)
        weight = torch.empty(embed.shape, dtype=head.weight.dtype, device=embed.device)
        for start in range(0, embed.shape[0], rows):
            weight[start:start + rows] = (((embed[start:start + rows].to(work) @ q.T) * norm) @ q).to(weight.dtype)
        head.weight.data = weight


def _rebuild_head_once(model: nn.Module):
    """A pre-hook on lm_head: its weight is rebuilt from the loaded embeddings before its first use."""
    def hook(module, args):
        if not getattr(module, "qllm_rebuilt", False):
            model.qllm_head.rebuild(module, model.get_input_embeddings().weight)
            module.qllm_rebuilt = True

    return hook


def install_runtime(model: nn.Module) -> None:
    """After the model is built: every projection runs its input transforms and activation quantizer first, and a
    head the checkpoint leaves out is rebuilt from the embeddings."""
    runtime = model.config.qllm_runtime
    act = runtime["activations"]
    if runtime.get("head"):
        model.qllm_head = HeadFromEmbeddings(model.config.hidden_size)
        model.get_output_embeddings().register_forward_pre_hook(_rebuild_head_once(model))
    for i, layer in enumerate(model.model.layers):
        spec = runtime["layers"][i]
        transforms = nn.ModuleDict()
        if "qk" in spec:
            transforms["qk"] = InputTransforms(spec["qk"]["kinds"], spec["qk"]["buffers"], spec["qk"]["dtypes"])
        for path, entry in spec["projections"].items():
            linear = layer.get_submodule(path)
            if entry["in_features"] != linear.in_features:  # disassembly without assembly widens the input
                parent, _, name = path.rpartition(".")
                wide = nn.Linear(entry["in_features"], linear.out_features, bias=linear.bias is not None)
                setattr(layer.get_submodule(parent), name, wide)
                linear = wide
            key = path.replace(".", "__")
            if entry["kinds"]:
                transforms[key] = InputTransforms(entry["kinds"], entry["buffers"], entry["dtypes"])
            # a projection may carry its own (learned) activation clip ratio
            linear.register_forward_pre_hook(_input_hook(transforms, key, {**act, "clip": entry.get("clip", act["clip"])}))
        layer.qllm_transforms = transforms
        if runtime.get("attn_bits") is not None:
            layer.self_attn.qllm_attention = {"bits": runtime["attn_bits"], "symmetric": act["symmetric"],
                                              "qk": transforms["qk"] if "qk" in transforms else None}


def _input_hook(transforms: nn.ModuleDict, key: str, act: dict):
    def hook(module, args):
        x = args[0]
        if key in transforms:
            x = transforms[key](x)
        if act["bits"] is not None:
            x = fake_quantize(x, act["bits"], act["symmetric"], act["clip"])
        return (x, *args[1:])

    return hook


def _with_runtime(base: type) -> type:
    """`QLLM<base>`: the family's transformers class whose projections run their input transforms and activation
    quantizer before the matmul (the name `auto_map` points at)."""
    def __init__(self, config):
        prepare_config(config)
        base.__init__(self, config)
        install_runtime(self)

    name = f"QLLM{base.__name__}"
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name,
                                # a head rebuilt from the embeddings is not in the checkpoint
                                "_keys_to_ignore_on_load_missing": [r"lm_head\.weight"],
                                "__doc__": f"{base.__name__} with the checkpoint's run-time parts (qllm_runtime)."})


QLLMLlamaForCausalLM = _with_runtime(LlamaForCausalLM)
QLLMMistralForCausalLM = _with_runtime(MistralForCausalLM)
QLLMQwen2ForCausalLM = _with_runtime(Qwen2ForCausalLM)
QLLMQwen3ForCausalLM = _with_runtime(Qwen3ForCausalLM)
QLLMGemma3ForCausalLM = _with_runtime(Gemma3ForCausalLM)
