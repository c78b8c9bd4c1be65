"""Saving and loading the quantized model with packed integer weights.

A saved model directory holds:
- `config.json`, `generation_config.json`, tokenizer files (as `save_pretrained` writes them);
- `model.safetensors` (a streamed model: one shard per block and `model.safetensors.index.json`): for every
  decoder-block projection the weight codes packed into bytes (`<name>.qweight`:
  two 4-bit codes per byte for bits <= 4, one byte for bits <= 8, int32 above), per-channel (or per-group) `scales`
  and `zeros`, the input transforms (`<name>.transforms.<i>.<kind>.<field>`: reassembly maps, online Hadamard sizes),
  and everything else (embeddings, norms,
  lm_head) in the model's dtype;
- `qllm_quant.json`: bit widths, symmetry, group size and the format version.
`load_quantized_model` rebuilds the fake-quant model; its weights are the exact dequantization of the codes, so it
reproduces the pipeline's perplexity exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qllm_pipeline.export.shards import ShardWriter, read_checkpoint_tensors, skeleton_tensors
from qllm_pipeline.model.arch import family_of
from qllm_pipeline.quantized.attention import attention_spec
from qllm_pipeline.quantized.blocks import decoder_layers, linear_names
from qllm_pipeline.quantized.fused import build_fused_block
from qllm_pipeline.quantized.quantizer import QuantSpec, activation_clip_ratio

QUANT_FILE = "qllm_quant.json"
FORMAT = "qllm-packed"
FORMAT_VERSION = 2  # 2: ordered input transforms instead of one reassembly map


def specs_from_quant_cfg(quant: dict) -> tuple[QuantSpec, QuantSpec]:
    weight = QuantSpec(quant.get("wbits"), bool(quant.get("w_symmetric", False)), quant.get("group_size"))
    act = QuantSpec(quant.get("abits"), bool(quant.get("a_symmetric", False)), clip_ratio=activation_clip_ratio(quant))
    return weight, act


def pack_codes(codes: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Integral float codes [out, in] -> bytes. Symmetric codes are offset to be non-negative first."""
    if symmetric:
        codes = codes + 2 ** (bits - 1)
    ints = codes.to(torch.int32)
    if bits > 8:
        return ints
    ints = ints.to(torch.uint8)
    if bits > 4:
        return ints
    if ints.shape[-1] % 2:
        ints = torch.nn.functional.pad(ints, (0, 1))
    return ints[..., 0::2] | (ints[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, symmetric: bool, in_features: int) -> torch.Tensor:
    if bits <= 4:
        low, high = packed & 0x0F, packed >> 4
        ints = torch.stack([low, high], dim=-1).flatten(-2)[..., :in_features]
    else:
        ints = packed
    codes = ints.to(torch.float32)
    return codes - 2 ** (bits - 1) if symmetric else codes


def save_quantized_model(model, tokenizer, block_tensors, quant: dict, out_dir: str | Path, sharded: bool = False) -> dict:
    """Write the packed model; returns sizes in bytes (file, and the same model in FP16). `block_tensors`: block i's
    fused tensors in order (any iterable); `sharded`: one safetensors shard per block (the writer holds one block)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_spec, _ = specs_from_quant_cfg(quant)
    block_prefix = f"{family_of(model).layers}."
    writer = ShardWriter(out_dir, parts=model.config.num_hidden_layers + 1 if sharded else None)
    skeleton = skeleton_tensors(model, block_prefix)
    writer.add(skeleton)
    block_params = 0
    for i, block in enumerate(block_tensors):
        tensors = {}
        prefix = f"{block_prefix}{i}."
        for key, value in block.items():
            name, _, field = key.rpartition(".")
            if field == "codes":
                tensors[f"{prefix}{name}.qweight"] = pack_codes(value, weight_spec.bits, weight_spec.symmetric).contiguous()
                tensors[f"{prefix}{name}.in_features"] = torch.tensor([value.shape[1]], dtype=torch.int32)
                block_params += value.numel()
            elif field in ("scale", "zero"):
                tensors[f"{prefix}{name}.{field}s"] = value.contiguous()
            else:
                tensors[prefix + key] = value.detach().contiguous()
                block_params += value.numel() if ".transforms." not in key and not key.endswith(".act_clip") else 0
        writer.add(tensors)
    file_bytes = writer.close()
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "quant": quant, "dtype": str(next(model.parameters()).dtype)}
    (out_dir / QUANT_FILE).write_text(json.dumps(meta, indent=2))
    fp16_bytes = (sum(v.numel() for v in skeleton.values()) + block_params) * 2
    return {"file_bytes": file_bytes, "fp16_bytes": fp16_bytes}


def load_quantized_model(path: str | Path, dtype: torch.dtype | None = None):
    """Rebuild the fake-quant model from a directory written by `save_quantized_model`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} model directory (format={meta.get('format')})")
    weight_spec, act_spec = specs_from_quant_cfg(meta["quant"])
    dtype = dtype or getattr(torch, meta["dtype"].removeprefix("torch."))
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    tensors = read_checkpoint_tensors(path)
    block_prefix = f"{family_of(config).layers}."
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(block_prefix)}, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        prefix = f"{block_prefix}{i}."
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        block = {}
        for key, value in mine.items():
            name, _, field = key.rpartition(".")
            if field == "qweight":
                block[f"{name}.codes"] = unpack_codes(value, weight_spec.bits, weight_spec.symmetric, int(mine[f"{name}.in_features"]))
            elif field in ("scales", "zeros"):
                block[f"{name}.{field[:-1]}"] = value
            elif field != "in_features":
                block[key] = value
        for name in linear_names(layer):
            if f"{name}.codes" not in block and f"{name}.weight" not in block:
                raise ValueError(f"{path}: layer {i} has no weight for {name}")
        layers[i] = build_fused_block(layer, block, act_spec, weight_spec, attention_spec(meta["quant"]))
    model.eval().requires_grad_(False)
    return model
