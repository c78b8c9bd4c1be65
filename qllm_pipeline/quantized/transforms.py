"""Input transforms of a projection: the ordered list a QuantLinear applies to its input before the activation
quantizer, and folds into its weight columns so the product is unchanged (or nearly, for merged channels).

A transform maps ``x [..., in] -> x' [..., out]`` and ``W [o, in] -> W' [o, out]`` with ``x' W'ᵀ ≈ x Wᵀ``. Kinds:

* ``reassembly`` — QLLM channel disassembly/assembly (:class:`qllm_pipeline.quantized.channel_map.ChannelReassembly`);
* ``hadamard`` — an online (run-time) Hadamard rotation (:class:`qllm_pipeline.quantized.hadamard.OnlineHadamard`), QuaRot's R4.

Every kind registers under its tag (transform_kinds.py), so a fused block, the export and its loader can store the
list as flat tensors (``<i>.<kind>.<field>``) and read it back without knowing the kinds.
"""
from __future__ import annotations

from torch import Tensor

from qllm_pipeline.quantized import channel_map, hadamard  # noqa: F401 - the kinds register themselves on import
from qllm_pipeline.quantized.transform_kinds import TRANSFORM_KINDS


def transforms_to_tensors(transforms: list) -> dict[str, Tensor]:
    """Flat tensors ``<i>.<kind>.<field>`` for an ordered list of transforms (the order is the index)."""
    return {f"{i}.{t.kind}.{k}": v for i, t in enumerate(transforms) for k, v in t.to_tensors().items()}


def transforms_from_tensors(tensors: dict[str, Tensor]) -> list:
    """Inverse of :func:`transforms_to_tensors`."""
    parts: dict[int, tuple[str, dict]] = {}
    for key, value in tensors.items():
        index, kind, field = key.split(".", 2)
        parts.setdefault(int(index), (kind, {}))[1][field] = value
    out = []
    for index in sorted(parts):
        kind, fields = parts[index]
        if kind not in TRANSFORM_KINDS:
            raise ValueError(f"unknown input transform kind '{kind}'; known kinds are {sorted(TRANSFORM_KINDS)}")
        out.append(TRANSFORM_KINDS[kind].from_tensors(fields))
    return out
