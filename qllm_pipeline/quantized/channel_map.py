"""The channel map of QLLM's channel reassembly (qllm_pipeline.quantized.reassembly builds it): which input
channels feed which reassembled channel, with what coefficient, applied to activations and weight columns.

Representation
--------------
A :class:`ChannelReassembly` is a sparse map from ``in_channels`` input channels to ``out_channels`` output channels,
stored as entries ``(src[e], dst[e], coef[e])``:

    x'[..., k] = Σ_{e: dst[e] = k} coef[e] · x[..., src[e]]
    W'[:, k]   = Σ_{e: dst[e] = k}          W[:, src[e]]          (the weight coefficient is always 1)

The first ``out_channels`` entries are the *primary* ones, with ``dst == arange(out_channels)``, so applying a map is a
gather and a scale, plus one ``index_add`` for the few extra members of merged channels.
``Σ_k x'_k W'_k`` then equals ``x Wᵀ`` exactly for disassembly (copies carry ``x_c/T_c`` and the whole column ``W_c``);
a merged group ``g`` contributes ``mean_{i∈g}(x_i) · Σ_{i∈g} W_i`` instead of ``Σ_{i∈g} x_i W_i``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qllm_pipeline.quantized.transform_kinds import register_transform

__all__ = ["ChannelReassembly"]


def _take(x: Tensor, index: Tensor) -> Tensor:
    """``x[..., index]`` as a gather with a broadcast index (much faster than index_select on the last dim on CPU)."""
    return torch.gather(x, -1, index.expand(*x.shape[:-1], index.numel()))


@register_transform
class ChannelReassembly:
    """A channel map ``x [..., in_channels] -> x' [..., out_channels]`` with its weight counterpart.

    Output channel ``k`` is ``Σ coef[e] · x[src[e]]`` over the entries ``e`` with ``dst[e] == k``; its weight column is
    ``Σ W[:, src[e]]`` over the same entries. Disassembled copies of channel ``c`` are single entries
    ``(c, k, 1/T_c)``; a merged channel of ``g`` members has ``g`` entries with coefficient ``1/g`` (their mean).
    """

    kind = "reassembly"  # its tag in a projection's list of input transforms (qllm_pipeline.quantized.transforms)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        src: Tensor,
        dst: Tensor,
        coef: Tensor,
        n_disassembled_extra: int = 0,
        n_merged: int = 0,
        theta: float | None = None,
    ):
        src = torch.as_tensor(src).detach().to("cpu", torch.long).contiguous()
        dst = torch.as_tensor(dst).detach().to("cpu", torch.long).contiguous()
        coef = torch.as_tensor(coef).detach().to("cpu", torch.float32).contiguous()
        in_channels, out_channels = int(in_channels), int(out_channels)
        if not (src.ndim == dst.ndim == coef.ndim == 1 and src.numel() == dst.numel() == coef.numel()):
            raise ValueError("src, dst and coef must be 1-D tensors of the same length")
        if src.numel() < out_channels or out_channels < 1 or in_channels < 1:
            raise ValueError(
                f"need at least one entry per output channel ({src.numel()} entries, {out_channels} outputs)"
            )
        if not torch.equal(dst[:out_channels], torch.arange(out_channels)):
            raise ValueError(
                "the first out_channels entries must be the primary ones, with dst == arange(out_channels)"
            )
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= in_channels):
            raise ValueError(f"src indices must lie in [0, {in_channels})")
        if int(dst.min()) < 0 or int(dst.max()) >= out_channels:
            raise ValueError(f"dst indices must lie in [0, {out_channels})")
        if torch.bincount(src, minlength=in_channels).min() == 0:
            raise ValueError("every input channel must feed at least one output channel")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.src, self.dst, self.coef = src, dst, coef
        self.n_disassembled_extra = int(n_disassembled_extra)
        self.n_merged = int(n_merged)
        self.theta = None if theta is None or (isinstance(theta, float) and math.isnan(theta)) else float(theta)
        self._device_cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    # -- construction helpers ------------------------------------------------------------------------------------------
    @classmethod
    def identity(cls, channels: int, theta: float | None = None) -> "ChannelReassembly":
        idx = torch.arange(int(channels))
        return cls(channels, channels, idx, idx.clone(), torch.ones(int(channels)), theta=theta)

    def runtime_buffers(self) -> dict[str, Tensor]:
        """What the shipped modeling code (remote_modeling.apply_reassembly) applies: output k = Σ coef[e] x[src[e]]
        over the entries e with dst[e] = k (the first out_channels entries are one per output, in order)."""
        src, dst, coef = self._cpu()
        return {"src": src, "dst": dst, "coef": coef, "out_channels": torch.tensor(self.out_channels)}

    def _cpu(self) -> tuple[Tensor, Tensor, Tensor]:
        """(src, dst, coef) on the CPU, wherever this map's tensors live."""
        return self._tensors_on(torch.device("cpu"))

    @property
    def n_entries(self) -> int:
        return int(self.src.numel())

    @property
    def is_identity(self) -> bool:
        src, _, coef = self._cpu()
        return (
            self.in_channels == self.out_channels == self.n_entries
            and torch.equal(src, torch.arange(self.in_channels))
            and bool((coef == 1).all())
        )

    def copies(self) -> Tensor:
        """Number of output channels each input channel feeds ([in_channels], int64, CPU)."""
        return torch.bincount(self._cpu()[0], minlength=self.in_channels)

    def group_sizes(self) -> Tensor:
        """Number of entries (members) of each output channel ([out_channels], int64, CPU)."""
        return torch.bincount(self._cpu()[1], minlength=self.out_channels)

    def summary(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "n_disassembled_extra": self.n_disassembled_extra,
            "n_merged": self.n_merged,
            "theta": self.theta,
        }

    def __repr__(self) -> str:
        s = self.summary()
        return "ChannelReassembly(" + ", ".join(f"{k}={v}" for k, v in s.items()) + ")"

    # -- application ---------------------------------------------------------------------------------------------------
    def _tensors_on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        device = torch.device(device)
        cached = self._device_cache.get(device)
        if cached is None:
            cached = (self.src.to(device), self.dst.to(device), self.coef.to(device))
            self._device_cache[device] = cached
        return cached

    def apply_to_activation(self, x: Tensor) -> Tensor:
        """``[..., in_channels] -> [..., out_channels]`` by gather, scale and (for merged channels) index_add."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"activation has {x.shape[-1]} channels, the reassembly expects {self.in_channels}")
        src, dst, coef = self._tensors_on(x.device)
        coef = coef.to(x.dtype)
        n = self.out_channels
        out = _take(x, src[:n]) * coef[:n]
        if self.n_entries > n:
            out = out.index_add(-1, dst[n:], _take(x, src[n:]) * coef[n:])
        return out

    def apply_to_weight(self, w: Tensor) -> Tensor:
        """``[out, in_channels] -> [out, out_channels]`` (any leading shape): columns gathered, merged ones summed."""
        if w.shape[-1] != self.in_channels:
            raise ValueError(f"weight has {w.shape[-1]} input channels, the reassembly expects {self.in_channels}")
        src, dst, _ = self._tensors_on(w.device)
        n = self.out_channels
        out = _take(w, src[:n])
        if self.n_entries > n:
            out = out.index_add(-1, dst[n:], _take(w, src[n:]))
        return out

    # -- persistence ---------------------------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Contiguous CPU tensors, suitable for ``safetensors.torch.save_file``."""
        meta = torch.tensor([self.in_channels, self.out_channels, self.n_disassembled_extra, self.n_merged])
        theta = torch.tensor([math.nan if self.theta is None else self.theta], dtype=torch.float64)
        src, dst, coef = self._cpu()
        return {
            "src": src.clone().contiguous(),
            "dst": dst.clone().contiguous(),
            "coef": coef.clone().contiguous(),
            "meta": meta.contiguous(),
            "theta": theta.contiguous(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "ChannelReassembly":
        missing = {"src", "dst", "coef", "meta"} - set(tensors)
        if missing:
            raise ValueError(f"reassembly tensors are missing {sorted(missing)}")
        meta = [int(v) for v in tensors["meta"].tolist()]
        if len(meta) != 4:
            raise ValueError(f"reassembly 'meta' must hold 4 integers, got {meta}")
        theta = float(tensors["theta"].reshape(-1)[0]) if "theta" in tensors else None
        return cls(
            meta[0], meta[1], tensors["src"], tensors["dst"], tensors["coef"],
            n_disassembled_extra=meta[2], n_merged=meta[3], theta=theta,
        )

    def to(self, device) -> "ChannelReassembly":
        """A copy whose index/coef tensors live on ``device`` (application also works from any device)."""
        other = ChannelReassembly(
            self.in_channels, self.out_channels, self.src, self.dst, self.coef,
            self.n_disassembled_extra, self.n_merged, self.theta,
        )
        device = torch.device(device)
        other.src, other.dst, other.coef = (t.to(device) for t in (self.src, self.dst, self.coef))
        other._device_cache[device] = (other.src, other.dst, other.coef)
        return other
