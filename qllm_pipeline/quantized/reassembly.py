"""Adaptive Channel Reassembly (CRA) of QLLM (arXiv 2310.08041), as pure tensor maths.

A reassembly rewrites the input of one or more linear layers, ``y = x Wᵀ``, into an equivalent (or nearly
equivalent) input with a different set of channels, chosen so that per-token activation quantization loses less:

* **Channel disassembly.** Channel ``c`` whose calibration max ``M_c = max|x_c|`` exceeds a threshold θ is split into
  ``T_c = max(1, ceil(M_c / θ))`` copies that each carry ``x_c / T_c``; its weight column is repeated ``T_c`` times.
  ``Σ_t (x_c / T_c) W_c = x_c W_c``, so this is exact, and (on the calibration data) no channel's magnitude exceeds
  θ any more.
* **Channel assembly.** To keep the width unchanged, as many pairs of *similar* ordinary channels are merged as
  disassembly added. A merged channel carries the mean of its members' values and the sum of their weight columns.
* **Adaptive θ.** θ is grid-searched downwards from the largest channel max, keeping the extra channels within
  ``channel_ratio · C``, minimizing a caller-supplied loss (e.g. the MSE of a quantized block part): theta_search.py.

The map itself (entries, applying it to activations and weights): qllm_pipeline.quantized.channel_map.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from qllm_pipeline.quantized.channel_map import ChannelReassembly

__all__ = [
    "ChannelPairScorer",
    "copies_per_channel",
    "disassemble",
    "merge_channels",
    "assemble",
    "build_reassembly",
]

SCORES = ("output_error", "reference")


# ----------------------------------------------------------------------------------------------------------------------
# Disassembly
# ----------------------------------------------------------------------------------------------------------------------
def checked_channel_max(channel_max: Tensor) -> Tensor:
    """Per-channel max |x| as a flat float64 CPU tensor; empty or non-finite maxima are refused."""
    m = torch.as_tensor(channel_max).detach().reshape(-1).to("cpu", torch.float64)
    if m.numel() == 0:
        raise ValueError("channel_max is empty")
    if not torch.isfinite(m).all():
        raise ValueError("channel_max has non-finite values; collect it on finite activations")
    return m.abs()


def copies_per_channel(channel_max: Tensor, theta: float) -> Tensor:
    """``T_c = max(1, ceil(M_c / θ))`` as int64 (M = |channel_max|)."""
    theta = float(theta)
    if not theta > 0 or not math.isfinite(theta):
        raise ValueError(f"theta must be a positive finite number, got {theta}")
    m = checked_channel_max(channel_max)
    return torch.ceil(m / theta).clamp(min=1).to(torch.long)


def disassemble(channel_max: Tensor, theta: float) -> ChannelReassembly:
    """Split channel ``c`` into ``T_c = max(1, ceil(M_c/θ))`` adjacent copies carrying ``x_c / T_c`` each.

    The weight column is repeated ``T_c`` times, so ``apply_to_activation(x) @ apply_to_weight(W)ᵀ == x @ Wᵀ`` up to
    floating-point rounding. Copies stay adjacent and in the original channel order.
    """
    t = copies_per_channel(channel_max, theta)
    c = t.numel()
    src = torch.repeat_interleave(torch.arange(c), t)
    coef = torch.repeat_interleave(1.0 / t.to(torch.float64), t).to(torch.float32)
    out = int(src.numel())
    return ChannelReassembly(c, out, src, torch.arange(out), coef, n_disassembled_extra=out - c, theta=theta)


# ----------------------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------------------
class ChannelPairScorer:
    """Cost of merging two ordinary input channels ``i`` and ``j``, for all pairs, computed once ([C, C] matrix).

    ``score="output_error"`` (default): merging ``x_i, x_j`` into ``(x_i + x_j)/2`` with weight column ``W_i + W_j``
    changes the output of every linear fed by this point by ``-(x_i - x_j)(W_i - W_j)ᵀ / 2`` (a rank-1 matrix over
    tokens × output features), whose squared Frobenius norm factorizes exactly:

        S[i, j] = ¼ · ‖x_i − x_j‖² · ‖W_i − W_j‖²     (x over the sampled tokens, W over the concatenated weights)

    ``score="reference"`` reproduces what the public reference code computes
    instead: ``‖x_i − x_j‖² · (Σ_o W_oi + Σ_o W_oj)²`` (signed column sums of the weights; kept for comparison only).

    Both are computed from Gram matrices (``Xᵀ X``, ``Wᵀ W``) in row blocks, in float32 on the activations' device;
    at most ``max_tokens`` evenly spaced tokens are used.
    """

    def __init__(
        self,
        activations: Tensor,
        weights: Tensor | Sequence[Tensor],
        score: str = "output_error",
        max_tokens: int | None = 4096,
        block_size: int = 2048,
    ):
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not one of {SCORES}")
        x = activations.detach().reshape(-1, activations.shape[-1])
        c = x.shape[1]
        if isinstance(weights, Tensor):
            weights = [weights]
        weights = list(weights)
        if not weights:
            raise ValueError("assembly needs the weights of the linear layer(s) fed by this point")
        for w in weights:
            if w.ndim != 2 or w.shape[1] != c:
                raise ValueError(f"weight of shape {tuple(w.shape)} does not take {c} input channels")
        if max_tokens is not None and x.shape[0] > max_tokens:
            keep = torch.linspace(0, x.shape[0] - 1, int(max_tokens), device=x.device).round().long()
            x = x.index_select(0, keep)
        self.channels = c
        self.score = score
        self.device = x.device
        self._x = x.float()
        self._w = torch.cat([w.detach().to(self.device, torch.float32) for w in weights], dim=0)
        self._block = int(block_size)
        self._matrix: Tensor | None = None

    @staticmethod
    def _sq_dist_rows(a: Tensor, rows: slice, sq: Tensor) -> Tensor:
        # ‖a_i − a_j‖² for i in rows, all j, from the Gram matrix (columns of `a` are the channels).
        g = a[:, rows].T @ a
        return (sq[rows, None] + sq[None, :] - 2.0 * g).clamp_(min=0.0)

    @property
    def matrix(self) -> Tensor:
        if self._matrix is None:
            with torch.no_grad():
                x, w = self._x, self._w
                sx, sw = (x * x).sum(0), (w * w).sum(0)
                colsum = w.sum(0)
                out = torch.empty(self.channels, self.channels, device=self.device, dtype=torch.float32)
                for start in range(0, self.channels, self._block):
                    rows = slice(start, min(start + self._block, self.channels))
                    dx2 = self._sq_dist_rows(x, rows, sx)
                    if self.score == "output_error":
                        out[rows] = dx2 * self._sq_dist_rows(w, rows, sw) * 0.25
                    else:
                        out[rows] = dx2 * (colsum[rows, None] + colsum[None, :]).square()
                self._matrix = out
                self._x = self._w = None  # no longer needed
        return self._matrix

    def pair_scores(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Scores between input channels ``rows`` and ``cols`` ([len(rows), len(cols)])."""
        m = self.matrix
        return m.index_select(0, rows.to(m.device)).index_select(1, cols.to(m.device))


def merge_channels(reassembly: ChannelReassembly, absorbed: Tensor, into: Tensor) -> ChannelReassembly:
    """Merge output channel ``absorbed[i]`` of ``reassembly`` into output channel ``into[i]`` for every ``i``.

    Several channels may be merged into the same target; a target must not itself be absorbed. Each resulting group
    carries the mean of its members' values and the sum of their weight columns. Kept channels keep their order.
    """
    absorbed = torch.as_tensor(absorbed).to("cpu", torch.long).reshape(-1)
    into = torch.as_tensor(into).to("cpu", torch.long).reshape(-1)
    if absorbed.numel() != into.numel():
        raise ValueError("absorbed and into must have the same length")
    src, dst, coef = reassembly._cpu()
    if absorbed.numel() == 0:
        return ChannelReassembly(
            reassembly.in_channels, reassembly.out_channels, src, dst, coef,
            reassembly.n_disassembled_extra, reassembly.n_merged, reassembly.theta,
        )
    c1 = reassembly.out_channels
    if int(absorbed.min()) < 0 or int(absorbed.max()) >= c1 or int(into.min()) < 0 or int(into.max()) >= c1:
        raise ValueError(f"channel positions must lie in [0, {c1})")
    if torch.unique(absorbed).numel() != absorbed.numel():
        raise ValueError("a channel can be absorbed only once")
    keep = torch.ones(c1, dtype=torch.bool)
    keep[absorbed] = False
    if not keep[into].all():
        raise ValueError("a merge target must not itself be absorbed")

    target = torch.arange(c1)
    target[absorbed] = into  # where each old channel's entries end up (in old positions)
    group = torch.ones(c1, dtype=torch.float64).index_add_(0, into, torch.ones(into.numel(), dtype=torch.float64))
    new_pos = torch.cumsum(keep.long(), 0) - 1

    old_target = target[dst]
    new_dst = new_pos[old_target]
    new_coef = (coef.double() / group[old_target]).float()
    primary = torch.zeros(reassembly.n_entries, dtype=torch.bool)
    primary[:c1] = keep  # primary entries of kept channels stay primary, in order
    order = torch.cat([primary.nonzero().view(-1), (~primary).nonzero().view(-1)])
    return ChannelReassembly(
        reassembly.in_channels,
        int(keep.sum()),
        src[order],
        new_dst[order],
        new_coef[order],
        n_disassembled_extra=reassembly.n_disassembled_extra,
        n_merged=reassembly.n_merged + int(absorbed.numel()),
        theta=reassembly.theta,
    )


def _mergeable(reassembly: ChannelReassembly, outlier_mask: Tensor | None) -> Tensor:
    """Output channels that are plain copies of one unsplit input channel (bool [out_channels])."""
    n = reassembly.out_channels
    src, _, coef = reassembly._cpu()
    plain = reassembly.group_sizes() == 1
    plain &= reassembly.copies()[src[:n]] == 1  # disassembled (split) channels are outliers
    plain &= coef[:n] == 1
    if outlier_mask is not None:
        mask = torch.as_tensor(outlier_mask).to("cpu", torch.bool).reshape(-1)
        if mask.numel() != n:
            raise ValueError(f"outlier_mask has {mask.numel()} entries, expected out_channels={n}")
        plain &= ~mask
    return plain


def assemble(
    reassembly: ChannelReassembly,
    n_merge: int,
    activations: Tensor,
    weights: Tensor | Sequence[Tensor],
    outlier_mask: Tensor | None = None,
    *,
    score: str = "output_error",
    scorer: ChannelPairScorer | None = None,
) -> ChannelReassembly:
    """Merge ``n_merge`` channel pairs of ``reassembly``'s output (usually a disassembled representation).

    Merge rule (the reference's greedy bipartite soft matching, ToMe-style):

    1. Only *ordinary* channels take part: output channels that are an untouched copy of one input channel that was
       not split (disassembled copies, i.e. outliers, are never merged), minus any ``outlier_mask`` (bool over
       ``reassembly.out_channels``).
    2. Channels are split by position in the (disassembled) channel order into set A (even positions) and set B (odd).
    3. Each A channel picks its best partner in B: ``j*(i) = argmin_j S[i, j]`` (ties as torch.min breaks them),
       with the pair cost ``S`` of :class:`ChannelPairScorer` (default ``¼‖x_i − x_j‖²‖W_i − W_j‖²`` over the
       sampled tokens ``activations`` and the row-concatenation of ``weights``).
    4. The ``n_merge`` A channels with the smallest ``S[i, j*(i)]`` (stable order) are merged into their partners.
       Several A channels may join the same B channel; each group then carries the mean of its members' values and
       the sum of their weight columns (the A channel's position disappears, the B channel's stays).

    Why this preserves the output best: replacing ``x_i W_iᵀ + x_j W_jᵀ`` by ``½(x_i + x_j)(W_i + W_j)ᵀ`` is off by
    exactly ``−½(x_i − x_j)(W_i − W_j)ᵀ``, so ``S[i, j]`` is the exact squared output error (summed over the sampled
    tokens and every output feature of every linear fed by this point) that the merge introduces; greedily taking the
    cheapest pairs minimizes the sum of these per-pair errors among the bipartite candidates. Merging similar,
    ordinary (small-magnitude) channels also keeps the per-token range unchanged.

    ``activations``: ``[N, in_channels]`` (any leading shape) sample of the un-reassembled input tokens;
    ``weights``: the ``[out, in_channels]`` weights of every linear fed by this point. ``scorer`` lets a caller reuse
    precomputed pair costs across many calls (``score`` is then ignored).
    """
    n_merge = int(n_merge)
    if n_merge < 0:
        raise ValueError(f"n_merge must be >= 0, got {n_merge}")
    if n_merge == 0:
        return merge_channels(reassembly, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    if activations.shape[-1] != reassembly.in_channels:
        raise ValueError(f"activations have {activations.shape[-1]} channels, expected {reassembly.in_channels}")
    if scorer is None:
        scorer = ChannelPairScorer(activations, weights, score=score)
    elif scorer.channels != reassembly.in_channels:
        raise ValueError(f"scorer is for {scorer.channels} channels, expected {reassembly.in_channels}")

    plain = _mergeable(reassembly, outlier_mask)
    pos = torch.arange(reassembly.out_channels)
    a_pos = pos[(pos % 2 == 0) & plain]
    b_pos = pos[(pos % 2 == 1) & plain]
    if n_merge > a_pos.numel() or b_pos.numel() == 0:
        raise ValueError(
            f"cannot merge {n_merge} pairs: only {a_pos.numel()} mergeable even-position and {b_pos.numel()} "
            "odd-position ordinary channels; lower channel_ratio (or theta's range) so fewer channels are split"
        )
    src = reassembly._cpu()[0]
    with torch.no_grad():
        s = scorer.pair_scores(src[a_pos], src[b_pos])
        best, partner = s.min(dim=1)
        chosen = torch.argsort(best.cpu(), stable=True)[:n_merge]
        partner = partner.cpu()
    return merge_channels(reassembly, a_pos[chosen], b_pos[partner[chosen]])


def build_reassembly(
    channel_max: Tensor,
    theta: float,
    activations: Tensor,
    weights: Tensor | Sequence[Tensor],
    assemble_channels: bool = True,
    *,
    score: str = "output_error",
    scorer: ChannelPairScorer | None = None,
) -> ChannelReassembly:
    """Disassemble at θ, then (if ``assemble_channels``) merge as many pairs as disassembly added (width unchanged)."""
    r = disassemble(channel_max, theta)
    if assemble_channels and r.n_disassembled_extra > 0:
        r = assemble(r, r.n_disassembled_extra, activations, weights, score=score, scorer=scorer)
    return r
