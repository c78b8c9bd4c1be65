"""Paired bootstrap intervals over evaluation windows: how sure a perplexity ratio, or a difference between two
variants evaluated on the same windows, is. Windows are resampled with replacement, the same resample for both
variants (paired), so what both find hard or easy cancels; a seeded generator makes the interval reproducible.

A lead is a lead only when the interval of the difference excludes zero; otherwise it is a tie (`verdict`).
"""
from __future__ import annotations

import torch

RESAMPLES = 2000
LEVEL = 0.95


def _resampled_mean_nll(nll: list[float], tokens_per_window: int, index: torch.Tensor) -> torch.Tensor:
    return torch.tensor(nll, dtype=torch.float64)[index].sum(1) / (index.shape[1] * tokens_per_window)


def _index(n: int, resamples: int, seed: int) -> torch.Tensor:
    if n < 2:
        raise ValueError(f"a bootstrap over windows needs at least 2 windows, got {n}")
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def _quantiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    lo, hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)).tolist()
    return lo, hi


def ratio_interval(nll: list[float], reference: list[float], tokens_per_window: int, resamples: int = RESAMPLES,
                   seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """The interval of ppl / ppl_reference (e.g. × FP), both on the same windows."""
    if len(nll) != len(reference):
        raise ValueError(f"paired windows differ in number: {len(nll)} and {len(reference)}")
    index = _index(len(nll), resamples, seed)
    log_ratio = _resampled_mean_nll(nll, tokens_per_window, index) - _resampled_mean_nll(reference, tokens_per_window, index)
    return _quantiles(log_ratio.exp(), level)


def difference_interval(nll: list[float], other: list[float], tokens_per_window: int, resamples: int = RESAMPLES,
                        seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """The interval of ppl − ppl_other, both on the same windows."""
    if len(nll) != len(other):
        raise ValueError(f"paired windows differ in number: {len(nll)} and {len(other)}")
    index = _index(len(nll), resamples, seed)
    difference = (_resampled_mean_nll(nll, tokens_per_window, index).exp()
                  - _resampled_mean_nll(other, tokens_per_window, index).exp())
    return _quantiles(difference, level)


def verdict(low: float, high: float) -> str:
    """For an interval of ppl_ours − ppl_theirs: "lead" (lower perplexity, interval below 0), "behind", or "tie"."""
    if high < 0:
        return "lead"
    if low > 0:
        return "behind"
    return "tie"
