"""Saving and loading the fake-quantized model.

Layout of a saved model directory: the usual `save_pretrained` files (config, tokenizer, safetensors weights,
where every decoder-block projection holds its quantized weight), `qllm_quant.json` (quantization settings), and
`qllm_reassembly.safetensors` (the channel-reassembly maps, if any). `load_quantized_model` rebuilds the
fake-quant model: activations quantized per token, weights used as stored.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .blocks import LINEAR_NAMES, decoder_layers
from .fused import NORM_NAMES, build_fused_block
from .quantizer import QuantSpec

QUANT_FILE = "qllm_quant.json"
REASSEMBLY_FILE = "qllm_reassembly.safetensors"


def specs_from_quant_cfg(quant: dict) -> tuple[QuantSpec, QuantSpec]:
    weight = QuantSpec(quant.get("wbits"), bool(quant.get("w_symmetric", False)), quant.get("group_size"))
    act = QuantSpec(quant.get("abits"), bool(quant.get("a_symmetric", False)))
    return weight, act


def save_quantized_model(model, tokenizer, block_tensors: list[dict[str, torch.Tensor]], quant: dict, out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    state = dict(model.state_dict())
    reassembly = {}
    for i, tensors in enumerate(block_tensors):
        prefix = f"model.layers.{i}."
        for key, value in tensors.items():
            if ".reassembly." in key:
                reassembly[prefix + key] = value.contiguous()
            else:
                state[prefix + key] = value
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if reassembly:
        save_file(reassembly, str(out_dir / REASSEMBLY_FILE))
    (out_dir / QUANT_FILE).write_text(json.dumps({"format": "qllm-fake-quant", "version": 1, "quant": quant}, indent=2))


def load_quantized_model(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    meta = json.loads((path / QUANT_FILE).read_text())
    weight_spec, act_spec = specs_from_quant_cfg(meta["quant"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    reassembly = load_file(str(path / REASSEMBLY_FILE)) if (path / REASSEMBLY_FILE).exists() else {}
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        prefix = f"model.layers.{i}."
        tensors = {k[len(prefix) :]: v for k, v in reassembly.items() if k.startswith(prefix)}
        for name in LINEAR_NAMES:
            tensors[f"{name}.weight"] = layer.get_submodule(name).weight.detach()
        for norm in NORM_NAMES:
            tensors[f"{norm}.weight"] = layer.get_submodule(norm).weight.detach()
        layers[i] = build_fused_block(layer, tensors, act_spec, weight_spec)
    return model
