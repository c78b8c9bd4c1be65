"""The input-transform kinds: what a kind provides (:class:`InputTransform`) and the registry of kinds by tag.

Its own module, importing none of the kinds, so the kinds (hadamard.py, channel_map.py) register here and
transforms.py, which stores and reads lists of them, imports the kinds without an import cycle.
"""
from __future__ import annotations

from typing import Protocol

from torch import Tensor

TRANSFORM_KINDS: dict[str, type] = {}


class InputTransform(Protocol):
    kind: str
    in_channels: int
    out_channels: int

    def apply_to_activation(self, x: Tensor) -> Tensor: ...

    def apply_to_weight(self, w: Tensor) -> Tensor: ...

    def to_tensors(self) -> dict[str, Tensor]: ...


def register_transform(cls: type) -> type:
    """Class decorator: make a transform kind loadable by its `kind` tag (the class needs `from_tensors`)."""
    TRANSFORM_KINDS[cls.kind] = cls
    return cls
