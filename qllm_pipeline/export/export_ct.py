"""compressed-tensors export (`fuse.format=compressed-tensors`): a Hugging Face model directory that stock
transformers loads with the `compressed-tensors` package installed (the format vLLM reads; not tested here).

The directory holds `config.json` with a `quantization_config` (`quant_method: compressed-tensors`, format
`pack-quantized` below 8 bits or `int-quantized` at 8, config groups for the seven projections of every block: integer
weights per channel or per group, input activations per token, dynamic), `model.safetensors` with each projection's
codes (`weight_packed` or `weight`, `weight_scale`, `weight_zero_point`, `weight_shape`, written by compressed-tensors'
own compressor)
and everything else (embeddings, norms, lm_head) in the model's dtype, and the tokenizer files. A streamed model is
written as one shard per block (`model.safetensors.index.json`), so the export holds one block at a time. Full-precision
weights (`quant.wbits=null`) give a plain checkpoint without a quantization_config.

Our codes go over unchanged: compressed-tensors' asymmetric grid is signed ([-2^(b-1), 2^(b-1) - 1]) where ours is
unsigned ([0, 2^b - 1]), so the zero point shifts by 2^(b-1) and the dequantized weights are equal. Its dynamic
per-token asymmetric activation quantizer is ours without a clip ratio, bit for bit: we compute it in its arithmetic
(quantizer.activation_quant_params).

Methods with parts that run at run time (`runtime_parts`: QLLM's channel reassembly, the online Hadamard rotations,
an activation clip ratio, quantized attention inputs) get the same weights plus a modeling file in the checkpoint
(`modeling_qllm.py`, from qllm_pipeline/export/remote_modeling.py; `auto_map`, loaded with `trust_remote_code=True`) that
applies them; their transform tensors sit in the weights file and their layout in `config.json` (`qllm_runtime`).
There compressed-tensors holds the weights only and the modeling file quantizes the activations (our quantizer, with
the clip). What cannot be written at all is refused before any work (`export_blockers`).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.export.packed import FORMAT as PACKED_FORMAT
from qllm_pipeline.model.arch import family_of
from qllm_pipeline.quantized.quantizer import activation_clip_ratio

FORMAT_NAME = "compressed-tensors"
MODEL_FORMATS = (PACKED_FORMAT, FORMAT_NAME)  # fuse.format choices
EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # fuse.export_dtype
PACK_FORMAT = "pack-quantized"  # codes packed into int32 (weights below 8 bits)
INT_FORMAT = "int-quantized"  # one int8 per code (8-bit weights; see weight_format)


REMOTE_FILE = "modeling_qllm.py"


def remote_class(family) -> str:
    """The class of modeling_qllm.py a family's checkpoint loads as: its transformers class with our run-time parts."""
    return f"QLLM{family.causal_lm_class}"


def export_blockers(cfg: dict) -> list[str]:
    """What a compressed-tensors checkpoint cannot hold at all (empty: it can be written)."""
    quant = cfg["quant"]
    if quant.get("wbits") is not None and int(quant["wbits"]) > 8:
        return [f"{quant['wbits']}-bit weights (compressed-tensors' integer formats hold 1 to 8 bits)"]
    return []


def runtime_parts(cfg: dict) -> list[str]:
    """The parts of a run that stock compressed-tensors cannot execute, so its checkpoint ships modeling code."""
    quant, stages = cfg["quant"], cfg["pipeline"]["stages"]
    out = []
    if "reassemble" in stages:
        out.append("QLLM channel reassembly (gathers and merges input channels at run time)")
    if "rotate" in stages:
        rot = cfg.get("rotate", {})
        online = [k for k in ("online_down", "online_o", "online_qk", "online_inputs") if rot.get(k)]
        if online:
            out.append("online Hadamard rotations (" + ", ".join(f"rotate.{k}" for k in online) + ")")
    if quant.get("abits") is not None and activation_clip_ratio(quant) != 1.0:
        out.append(f"an activation clip ratio ({activation_clip_ratio(quant)}; compressed-tensors' dynamic quantizer is min-max)")
    lrc = cfg.get("train_lowrank") or {}
    if quant.get("abits") is not None and "train_lowrank" in stages and lrc.get("enabled", True) and lrc.get("learn_act_clip"):
        out.append("activation clip ratios learned per projection (train_lowrank.learn_act_clip)")
    if quant.get("abits") is not None and "tune_e2e" in stages and (cfg.get("tune_e2e") or {}).get("act_clip_lr"):
        out.append("activation clip ratios tuned per projection (tune_e2e.act_clip_lr)")
    if quant.get("attn_bits") is not None:
        out.append("quantized attention inputs (quant.attn_bits)")
    if quant.get("wbits") is None and quant.get("abits") is not None:
        out.append("quantized activations beside full-precision weights")
    return out


def weight_format(quant: dict) -> str:
    """pack-quantized below 8 bits (codes packed into int32); int-quantized (one int8 per code) for 8-bit weights,
    whose codes packing cannot shrink: int-quantized is the W8A8 layout of llm-compressor, and the one vLLM maps to its
    int8 kernels (packed, it looks for mixed-precision kernels instead)."""
    return PACK_FORMAT if int(quant.get("wbits") or 16) < 8 else INT_FORMAT


def rows_as_blocks(quant: dict) -> bool:
    """Asymmetric weights below 8 bits are written with compressed-tensors' block strategy, one block a row (or a
    row's group): the same numbers as per channel (or per group), but its zero points are stored unpacked. The
    channel and group strategies pack them, and transformers (5.24, compressed-tensors 0.20.1) sizes them unpacked
    on load, so such a checkpoint does not load (llm-compressor issue #1618)."""
    return not quant.get("w_symmetric", False) and weight_format(quant) == PACK_FORMAT


def weight_args(quant: dict, in_features: int):
    """The compressed-tensors QuantizationArgs of one projection's weights (its width matters only for a whole row
    written as one block)."""
    from compressed_tensors.quantization import QuantizationArgs

    group_size = quant.get("group_size")
    common = {"num_bits": int(quant["wbits"]), "type": "int", "symmetric": bool(quant.get("w_symmetric", False)),
              "dynamic": False}
    if rows_as_blocks(quant):
        return QuantizationArgs(**common, strategy="block", block_structure=[1, group_size or in_features])
    return QuantizationArgs(**common, strategy="group" if group_size else "channel", group_size=group_size)


def quantization_config(quant: dict, widths: dict[str, int], activations: bool = True, head: str = "lm_head"):
    """The compressed-tensors QuantizationConfig of our scheme: every quantized projection's weights per channel (or
    group), and, with `activations`, its inputs per token, dynamic (without them the shipped modeling code quantizes
    the activations). `widths`: each quantized projection's module name -> in_features. One config group targets every
    Linear but the head, unless whole rows written as blocks differ in width: then one group per width, each naming
    its projections (by a suffix where every block agrees)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    acts = None
    if activations and quant.get("abits") is not None:
        acts = QuantizationArgs(
            num_bits=int(quant["abits"]), type="int", symmetric=bool(quant.get("a_symmetric", False)), strategy="token",
            dynamic=True,
        )
    by_args: dict[str, list[str]] = {}  # weight args (as JSON) -> the projections written with them
    for name, width in widths.items():
        by_args.setdefault(weight_args(quant, width).model_dump_json(), []).append(name)
    groups = {
        f"group_{i}": QuantizationScheme(targets=["Linear"] if len(by_args) == 1 else _targets(names, widths),
                                         weights=QuantizationArgs.model_validate_json(args), input_activations=acts,
                                         format=weight_format(quant))
        for i, (args, names) in enumerate(sorted(by_args.items(), key=lambda item: min(widths[n] for n in item[1])))
    }
    return QuantizationConfig(config_groups=groups, format=weight_format(quant), quantization_status="compressed",
                              ignore=[head])


def _targets(names: list[str], widths: dict[str, int]) -> list[str]:
    """compressed-tensors targets naming exactly `names`: a suffix regex for a projection whose every block is among
    them, its full module names otherwise."""
    import re

    def suffix(name: str) -> str:  # model.layers.3.mlp.down_proj -> mlp.down_proj
        return re.sub(r"^.*?\.\d+\.", "", name)

    chosen, out = set(names), []
    for tail in sorted({suffix(n) for n in names}):
        every = [n for n in widths if suffix(n) == tail]
        if all(n in chosen for n in every):
            out.append(f"re:.*\\.{re.escape(tail)}$")
        else:
            out.extend(sorted(n for n in every if n in chosen))
    return out


def compressed_projection(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, args, fmt: str,
                          dtype: torch.dtype) -> dict:
    """One projection's tensors in compressed-tensors' layout, written by its own compressor for the format (from
    float32, so it recovers our codes exactly), its scale then stored in `dtype`."""
    from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from qllm_pipeline.quantized.quantizer import dequantize_weight

    weight = dequantize_weight(codes.float(), scale.float(), zero.float())  # on the grid: the compressor recovers the codes
    state = {"weight": weight, "weight_scale": scale.float()}
    if not args.symmetric:
        # Our asymmetric grid is unsigned, theirs signed: shift the zero point. A row of one sign has its zero point
        # outside the code range; compressed-tensors stores it in int8 all the same.
        shifted = zero - 2 ** (args.num_bits - 1)
        if shifted.min() < -128 or shifted.max() > 127:
            raise ValueError("a zero point does not fit in int8; compressed-tensors cannot store it")
        state["weight_zero_point"] = shifted.to(torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    compressor = PackedQuantizationCompressor if fmt == PACK_FORMAT else IntQuantizationCompressor
    packed = compressor.compress(state, scheme)
    packed["weight_scale"] = packed["weight_scale"].to(dtype)
    return packed


HEAD_KEY = "qllm_head"  # the rotation and norm lm_head is rebuilt from (`head_from_embeddings`)
HEAD_CHECK_ROWS = 4096  # vocabulary rows compared at a time


def rebuilt_head(embed: torch.Tensor, rotation: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """lm_head of a tied model after the residual rotation Q with the final norm's scale g folded in: E diag(g) Q,
    where E = (E Q) Qᵀ comes back from the rotated embeddings (modeling_qllm.py computes the same on load)."""
    q = rotation.double()
    return ((embed.double() @ q.T) * norm.double()) @ q


def _omit_rebuildable_head(skeleton: dict, family, head_from_embeddings: dict | None) -> dict[str, torch.Tensor]:
    """Drop lm_head from the skeleton when the shipped modeling code can rebuild it from the embeddings (the tied
    head the residual rotation had to untie: half the floating-point bytes of a small model); returns the tensors
    it is rebuilt from, or {} when it is written as it is. Checked here: the head must be what the rebuild gives."""
    head = skeleton.get(f"{family.head}.weight")
    if head_from_embeddings is None or head is None:
        return {}
    rotation, norm = head_from_embeddings["rotation"].float(), head_from_embeddings["norm"].float()
    embed, atol = skeleton[f"{family.embeddings}.weight"], 1e-5 * float(head.abs().max())
    for rows in range(0, head.shape[0], HEAD_CHECK_ROWS):  # a slice at a time: float64 copies of a whole vocabulary
        part = slice(rows, rows + HEAD_CHECK_ROWS)      # are GBs at 70B
        if not torch.allclose(rebuilt_head(embed[part], rotation, norm), head[part].double(), rtol=1e-5, atol=atol):
            return {}  # the head changed after the rotation: written as it is
    del skeleton[f"{family.head}.weight"]
    return {f"{HEAD_KEY}.rotation": rotation, f"{HEAD_KEY}.norm": norm}


def _transform_buffers(transforms: list) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Kinds and tensors (`t<i>_<field>`) of an ordered list of input transforms, as remote_modeling reads them:
    each kind gives its own (`runtime_buffers`)."""
    kinds, tensors = [], {}
    for i, t in enumerate(transforms):
        kinds.append(t.kind)
        tensors.update({f"t{i}_{field}": value for field, value in t.runtime_buffers().items()})
    return kinds, tensors


def _runtime_layer(block: dict[str, torch.Tensor], names: list[str], head_dim: int, attn_bits) -> tuple[dict, dict]:
    """One layer's `qllm_runtime` entry and its tensors (relative to the layer)."""
    from qllm_pipeline.quantized.hadamard import OnlineHadamard
    from qllm_pipeline.quantized.transforms import transforms_from_tensors

    entry, tensors = {"projections": {}}, {}

    def add(key: str, kinds: list[str], buffers: dict[str, torch.Tensor]) -> dict:
        tensors.update({f"qllm_transforms.{key}.{k}": v for k, v in buffers.items()})
        return {"kinds": kinds, "buffers": {k: list(v.shape) for k, v in buffers.items()},
                "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in buffers.items()}}

    for name in names:
        prefix = f"{name}.transforms."
        transforms = transforms_from_tensors({k[len(prefix):]: v for k, v in block.items() if k.startswith(prefix)})
        kinds, buffers = _transform_buffers(transforms)
        weight = block[f"{name}.codes"] if f"{name}.codes" in block else block[f"{name}.weight"]
        entry["projections"][name] = {"in_features": int(weight.shape[1]),
                                      **add(name.replace(".", "__"), kinds, buffers)}
        if f"{name}.act_clip" in block:  # a clip ratio learned for this projection (train_lowrank.learn_act_clip)
            entry["projections"][name]["clip"] = float(block[f"{name}.act_clip"])
    if attn_bits is not None and any(k.endswith("qk_hadamard") for k in block):
        kinds, buffers = _transform_buffers([OnlineHadamard(head_dim)])
        entry["qk"] = add("qk", kinds, buffers)
    return entry, tensors


def save_compressed_tensors_model(model, tokenizer, block_tensors, quant: dict, out_dir, runtime: bool = False,
                                  sharded: bool = False, dtype: torch.dtype | None = None,
                                  head_from_embeddings: dict | None = None) -> dict:
    """Write the compressed-tensors directory from the fused blocks; returns sizes in bytes (file, and FP16).
    `block_tensors`: block i's fused tensors in order (any iterable: a streamed model's are read one at a time);
    `runtime`: the method has run-time parts (see `runtime_parts`), so the checkpoint ships modeling_qllm.py;
    `sharded`: one safetensors shard per block (plus one for the rest), so the writer holds one block at a time;
    `dtype` (fuse.export_dtype; default: the model's): what the floating-point tensors outside the integer codes are
    written in (embeddings, norms, biases, the head, weight scales) and what config.json says to load the model in.
    The run-time parts' buffers (reassembly maps, Hadamard factors) stay as computed: the shipped modeling code
    applies them in float32, and they are a few kB.
    `head_from_embeddings` ({"rotation": Q, "norm": g}; with `runtime` only): the model's lm_head is its embeddings
    rotated back, scaled by g and rotated again (a tied model after the residual rotation); then the head is not
    written, and the shipped modeling code rebuilds it on load (`rebuilt_head`)."""
    import shutil

    from compressed_tensors.compressors import ModelCompressor

    from qllm_pipeline.export.shards import ShardWriter, skeleton_tensors
    from qllm_pipeline.quantized.quantizer import activation_clip_ratio

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_of(model)
    quantized = quant.get("wbits") is not None  # full-precision weights (quant.wbits=null): a plain checkpoint
    widths: dict[str, int] = {}  # each quantized projection's module name -> in_features (for the config's groups)
    dtype = dtype or next(model.parameters()).dtype
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    n_blocks = model.config.num_hidden_layers
    writer = ShardWriter(out_dir, parts=n_blocks + 1 if sharded else None, metadata={"format": "pt"})
    block_prefix = f"{family.layers}."
    skeleton = skeleton_tensors(model, block_prefix)
    head_tensors = _omit_rebuildable_head(skeleton, family, head_from_embeddings if runtime else None)
    writer.add({**{k: v.to(dtype) if v.is_floating_point() else v for k, v in skeleton.items()}, **head_tensors})
    layers, block_params = [], 0
    for i, block in enumerate(block_tensors):
        tensors = {}
        prefix = f"{block_prefix}{i}."
        names = sorted({k.rsplit(".", 1)[0] for k in block if k.endswith(".codes")})
        dense = sorted(name for name in family.linears if f"{name}.weight" in block)  # full-precision projections
        has_runtime = any(".transforms." in k or k.endswith(("qk_hadamard", ".act_clip")) for k in block)
        if has_runtime and not runtime:
            raise ValueError(f"block {i} has run-time transforms, but the checkpoint is being written without its modeling code")
        for name in names:
            try:
                codes = block[f"{name}.codes"]
                packed = compressed_projection(codes, block[f"{name}.scale"], block[f"{name}.zero"],
                                               weight_args(quant, codes.shape[1]), weight_format(quant), dtype)
            except ValueError as exc:
                # A weight row of one sign: min-max without 0 puts its zero point off the grid (the stages' artifacts
                # are kept, so writing another format resumes from the cache)
                raise PipelineError(
                    f"block {i} {name}: a weight row's zero point is outside compressed-tensors' int8 range (a row of one "
                    f"sign); write fuse.format={PACKED_FORMAT} (the run resumes from the cache) or quantize the weights "
                    "symmetrically (quant.w_symmetric=true)") from exc
            tensors.update({f"{prefix}{name}.{k}": v.contiguous() for k, v in packed.items()})
            widths[prefix + name] = int(codes.shape[1])
            block_params += block[f"{name}.codes"].numel()
        for key, value in block.items():
            if key.rsplit(".", 1)[0] not in names and ".transforms." not in key and not key.endswith("qk_hadamard"):
                tensors[prefix + key] = value.detach().to(dtype).contiguous()  # norms, biases
                block_params += value.numel()
        if runtime:
            entry, extra = _runtime_layer(block, names or dense, head_dim, quant.get("attn_bits"))
            layers.append(entry)
            tensors.update({prefix + k: v.contiguous() for k, v in extra.items()})
        writer.add(tensors)
    file_bytes = writer.close()
    hf_config = copy.deepcopy(model.config)
    hf_config.dtype = dtype  # what from_pretrained(dtype="auto") loads it in
    if runtime:
        abits = quant.get("abits")
        hf_config.qllm_runtime = {
            "activations": {"bits": abits, "symmetric": bool(quant.get("a_symmetric", False)),
                            "clip": activation_clip_ratio(quant) if abits is not None else 1.0},
            "attn_bits": quant.get("attn_bits"), "layers": layers,
            **({"head": {"from_embeddings": HEAD_KEY}} if head_tensors else {}),
        }
        hf_config.architectures = [remote_class(family)]
        hf_config.auto_map = {"AutoModelForCausalLM": f"{REMOTE_FILE.removesuffix('.py')}.{remote_class(family)}"}
        shutil.copyfile(Path(__file__).with_name("remote_modeling.py"), out_dir / REMOTE_FILE)
    hf_config.save_pretrained(out_dir)
    if quantized:
        config = quantization_config(quant, widths, not runtime, family.head)
        ModelCompressor(quantization_config=config).update_config(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    fp16_bytes = (sum(v.numel() for v in skeleton.values()) + block_params) * 2
    return {"file_bytes": file_bytes, "fp16_bytes": fp16_bytes}
