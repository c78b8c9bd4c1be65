"""compressed-tensors export (`fuse.format=compressed-tensors`): a Hugging Face model directory that stock
transformers loads with the `compressed-tensors` package installed, and that vLLM reads the same way.

The directory holds `config.json` with a `quantization_config` (`quant_method: compressed-tensors`, format
`pack-quantized` or `int-quantized`, one config group for the seven projections of every block: integer weights per channel or per
group, input activations per token, dynamic), `model.safetensors` with each projection's packed codes
(`weight_packed`, `weight_scale`, `weight_zero_point`, `weight_shape`, written by compressed-tensors' own compressor)
and everything else (embeddings, norms, lm_head) in the model's dtype, and the tokenizer files.

Our codes go over unchanged: compressed-tensors' asymmetric grid is signed ([-2^(b-1), 2^(b-1) - 1]) where ours is
unsigned ([0, 2^b - 1]), so the zero point shifts by 2^(b-1) and the dequantized weights are equal. Its dynamic
per-token activation quantizer is min-max over each token, as ours is without a clip ratio.

What stock compressed-tensors cannot run is refused before any work (`stock_blockers`): input transforms applied at
run time (QLLM's channel reassembly, the online Hadamard rotations), an activation clip ratio and quantized attention
inputs. Those methods export with `fuse.format=qllm-packed` until a checkpoint can ship its own modeling code.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .export import FORMAT as PACKED_FORMAT
from .quantizer import activation_clip_ratio

FORMAT_NAME = "compressed-tensors"
MODEL_FORMATS = (PACKED_FORMAT, FORMAT_NAME)  # fuse.format choices
PACK_FORMAT = "pack-quantized"  # codes packed into int32 (symmetric weights)
INT_FORMAT = "int-quantized"  # one int8 per code (asymmetric weights; see weight_format)
BLOCK_PREFIX = "model.layers."
WEIGHTS_FILE = "model.safetensors"


def stock_blockers(cfg: dict) -> list[str]:
    """The parts of a run's config that stock compressed-tensors cannot execute (empty: it can)."""
    quant, stages = cfg["quant"], cfg["pipeline"]["stages"]
    out = []
    if "reassemble" in stages:
        out.append("QLLM channel reassembly (gathers and merges input channels at run time)")
    if "rotate" in stages:
        rot = cfg.get("rotate", {})
        online = [k for k in ("online_down", "online_o", "online_qk") if rot.get(k)]
        if online:
            out.append("online Hadamard rotations (" + ", ".join(f"rotate.{k}" for k in online) + ")")
    if quant.get("abits") is not None and activation_clip_ratio(quant) != 1.0:
        out.append(f"an activation clip ratio ({activation_clip_ratio(quant)}; compressed-tensors' dynamic quantizer is min-max)")
    if quant.get("attn_bits") is not None:
        out.append("quantized attention inputs (quant.attn_bits)")
    if quant.get("wbits") is None:
        out.append("unquantized weights (nothing to pack)")
    elif int(quant["wbits"]) > 8:
        out.append(f"{quant['wbits']}-bit weights (pack-quantized holds 1 to 8 bits)")
    return out


def weight_format(quant: dict) -> str:
    """pack-quantized for symmetric weights; int-quantized (codes unpacked in int8) for asymmetric ones, because
    transformers (5.24, compressed-tensors 0.20) cannot load packed asymmetric zero points: it sizes them unpacked
    on load (llm-compressor issue #1618)."""
    return PACK_FORMAT if quant.get("w_symmetric", False) else INT_FORMAT


def quantization_config(quant: dict):
    """The compressed-tensors QuantizationConfig of our scheme (one group: every Linear except lm_head)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    group_size = quant.get("group_size")
    weights = QuantizationArgs(
        num_bits=int(quant["wbits"]), type="int", symmetric=bool(quant.get("w_symmetric", False)),
        strategy="group" if group_size else "channel", group_size=group_size, dynamic=False,
    )
    acts = None
    if quant.get("abits") is not None:
        acts = QuantizationArgs(
            num_bits=int(quant["abits"]), type="int", symmetric=bool(quant.get("a_symmetric", False)), strategy="token",
            dynamic=True,
        )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts, format=weight_format(quant))
    return QuantizationConfig(
        config_groups={"group_0": scheme}, format=weight_format(quant), quantization_status="compressed", ignore=["lm_head"],
    )


def compressed_projection(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme, dtype: torch.dtype) -> dict:
    """One projection's tensors in compressed-tensors' layout, written by its own compressor for the scheme's format."""
    from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor

    from .quantizer import dequantize_weight

    args = scheme.weights
    weight = dequantize_weight(codes, scale, zero)  # exactly on the grid, so the compressor recovers our codes
    state = {"weight": weight.to(dtype), "weight_scale": scale.to(dtype)}
    if not args.symmetric:
        # Our asymmetric grid is unsigned, theirs signed: shift the zero point. A row of one sign has its zero point
        # outside the code range; int-quantized stores it in int8 all the same (and only symmetric weights are packed).
        shifted = zero - 2 ** (args.num_bits - 1)
        if shifted.abs().max() > 127:
            raise ValueError("a zero point does not fit in int8; compressed-tensors cannot store it")
        state["weight_zero_point"] = shifted.to(torch.int8)
    compressor = PackedQuantizationCompressor if scheme.format == PACK_FORMAT else IntQuantizationCompressor
    return compressor.compress(state, scheme)


def save_compressed_tensors_model(model, tokenizer, block_tensors: list[dict[str, torch.Tensor]], quant: dict, out_dir) -> dict:
    """Write the compressed-tensors directory from the fused blocks; returns sizes in bytes (file, and FP16)."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = quantization_config(quant)
    scheme = config.config_groups["group_0"]
    dtype = next(model.parameters()).dtype
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(BLOCK_PREFIX)}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # tied: rebuilt from the embeddings on load
    for i, block in enumerate(block_tensors):
        prefix = f"{BLOCK_PREFIX}{i}."
        transforms = sorted({k.split(".transforms.")[0] for k in block if ".transforms." in k})
        if transforms or any(k.endswith("qk_hadamard") for k in block):
            raise ValueError(f"block {i} has run-time transforms ({', '.join(transforms) or 'Q/K Hadamard'}); "
                             f"compressed-tensors cannot run them: use fuse.format=qllm-packed")
        names = sorted({k.rsplit(".", 1)[0] for k in block if k.endswith(".codes")})
        for name in names:
            packed = compressed_projection(block[f"{name}.codes"], block[f"{name}.scale"], block[f"{name}.zero"], scheme, dtype)
            tensors.update({f"{prefix}{name}.{k}": v.contiguous() for k, v in packed.items()})
        for key, value in block.items():
            if key.rsplit(".", 1)[0] not in names:  # norms, biases
                tensors[prefix + key] = value.detach().to(dtype).contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    ModelCompressor(quantization_config=config).update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    fp16_bytes = sum(p.numel() for p in model.parameters()) * 2
    return {"file_bytes": (out_dir / WEIGHTS_FILE).stat().st_size, "fp16_bytes": fp16_bytes}
