"""QLLM's adaptive θ (arXiv 2310.08041 §3.2): the grid of thresholds searched downwards from the largest channel max,
capped at ``channel_ratio · C`` extra channels, and the search that keeps the θ whose reassembly (reassembly.py)
minimizes a caller-supplied loss (e.g. the MSE of a quantized block part)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from qllm_pipeline.quantized.channel_map import ChannelReassembly
from qllm_pipeline.quantized.reassembly import (
    ChannelPairScorer,
    build_reassembly,
    checked_channel_max,
    copies_per_channel,
)

__all__ = ["GRID_SPACINGS", "ThetaSearchResult", "reference_steps", "search_theta", "theta_grid"]


def reference_steps(channel_max: Tensor) -> int:
    """The reference's grid size: ``max(100, int(max(M) / 0.5))``."""
    return max(100, int(float(checked_channel_max(channel_max).max()) / 0.5))


GRID_SPACINGS = ("linear", "log")


def theta_grid(channel_max: Tensor, steps: int | None, channel_ratio: float, spacing: str = "linear") -> list[float]:
    """Candidates ``θ_i = max(M) − i·(max(M) − min(M))/steps`` for ``i = 0 … steps−1`` (descending, first = max(M)),
    truncated before the first θ whose extra channels ``Σ_c (T_c − 1)`` exceed ``channel_ratio · C``.

    ``steps=None`` uses the reference's rule :func:`reference_steps`. ``spacing="log"`` spaces the candidates
    geometrically instead, ``θ_i = max(M)·(min(M)/max(M))^(i/steps)``: the same number of steps, but fine where the
    budget usually stops (near the typical channel maxima) rather than uniform across a range that one massive
    activation (|x| ≈ 2500) stretches. Returns ``[]`` if every channel max is 0.
    """
    if spacing not in GRID_SPACINGS:
        raise ValueError(f"spacing={spacing!r} is not one of {GRID_SPACINGS}")
    m = checked_channel_max(channel_max)
    steps = reference_steps(m) if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= float(channel_ratio):
        raise ValueError(f"channel_ratio must be >= 0, got {channel_ratio}")
    hi, lo = float(m.max()), float(m.min())
    if hi <= 0:
        return []
    budget = float(channel_ratio) * m.numel()
    step = (hi - lo) / steps
    floor = lo if lo > 0 else hi * 1e-3  # a geometric grid needs a positive end
    grid: list[float] = []
    for i in range(steps):
        theta = hi - i * step if spacing == "linear" else hi * (floor / hi) ** (i / steps)
        if theta <= 0:  # min(M) == 0: the last candidate would be 0
            break
        extra = int((torch.ceil(m / theta).clamp(min=1) - 1).sum())
        if extra > budget:
            break
        grid.append(theta)
    return grid


@dataclass
class ThetaSearchResult:
    theta: float
    loss: float
    n_extra: int
    curve: list[dict]  # [{"theta", "n_extra", "loss"}] in grid order
    reassembly: ChannelReassembly | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "theta": self.theta,
            "loss": self.loss,
            "n_extra": self.n_extra,
            "curve": [dict(p) for p in self.curve],
        }


def search_theta(
    channel_max: Tensor,
    activations: Tensor,
    weights: Tensor | Sequence[Tensor],
    loss_fn: Callable[[ChannelReassembly], float],
    steps: int | None = 100,
    channel_ratio: float = 0.2,
    assemble_channels: bool = True,
    progress: bool = False,
    desc: str = "theta",
    *,
    score: str = "output_error",
    spacing: str = "linear",
) -> ThetaSearchResult:
    """Grid-search θ (see :func:`theta_grid`), returning the argmin of ``loss_fn(build_reassembly(θ))``.

    The first grid point is θ = max(M): no channel is split, i.e. the "no reassembly" baseline (``loss_fn`` gets an
    identity map). Grid points whose copy counts ``T`` equal an earlier point's produce the same reassembly, so their
    loss is reused rather than recomputed; every grid point still appears in ``curve``. Ties go to the earliest
    (largest) θ; NaN losses are never chosen unless all are NaN. The result's ``loss`` is exactly the minimum of its
    ``curve`` and ``reassembly`` is the chosen map.
    """
    m = checked_channel_max(channel_max)
    grid = theta_grid(m, steps, channel_ratio, spacing)
    if not grid:  # all-zero channel maxima: nothing can be reassembled
        grid = [1.0]
    scorer: ChannelPairScorer | None = None
    if assemble_channels and len(grid) > 1:
        scorer = ChannelPairScorer(activations, weights, score=score)

    iterator: Iterable[float] = grid
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(grid, desc=desc, leave=False)

    seen: dict[bytes, tuple[float, int]] = {}  # copy counts T -> (loss, n_extra)
    curve: list[dict] = []
    best_i, best_r = -1, None
    for theta in iterator:
        key = copies_per_channel(m, theta).numpy().tobytes()
        if key in seen:
            loss, n_extra = seen[key]
            r = None
        else:
            r = build_reassembly(m, theta, activations, weights, assemble_channels, score=score, scorer=scorer)
            loss, n_extra = float(loss_fn(r)), r.n_disassembled_extra
            seen[key] = (loss, n_extra)
        curve.append({"theta": float(theta), "n_extra": n_extra, "loss": loss})
        best_loss = math.inf if best_i < 0 else curve[best_i]["loss"]
        if best_i < 0 or loss < best_loss or (math.isnan(best_loss) and not math.isnan(loss)):
            best_i, best_r = len(curve) - 1, r  # r is new here: a repeated key never beats its first occurrence
    best = curve[best_i]
    return ThetaSearchResult(
        theta=best["theta"], loss=best["loss"], n_extra=best["n_extra"], curve=curve, reassembly=best_r
    )

