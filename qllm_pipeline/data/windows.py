"""The token windows cut from a corpus: calibration windows (seeded random starts), held-out calibration windows (for
choosing settings) and evaluation windows.

Evaluation and held-out windows sit on the grid of non-overlapping `seq_len` windows from the text's first token (the
standard perplexity protocol). Where fewer are asked for than the grid holds (`eval.max_windows`), they are spread over
the text's documents: first one window in each document (the one holding its middle token), spread evenly over the
documents when there are more documents than windows, then the rest spread evenly over the grid windows not yet taken.
So 32 windows of 512 tokens cover all 21 held-out articles of wiki_sample, where the first 32 grid windows all fell in
one article. A text without document boundaries (the hub corpora) gets windows evenly spaced over the whole grid.
"""
from __future__ import annotations

import torch

from qllm_pipeline.core.errors import PipelineError

HELDOUT = "calib_heldout"  # eval.datasets entry: held-out windows of the calibration split (for choosing settings)
WINDOWS_RULE = "spread over documents v1"  # how evaluation and held-out windows are chosen (results carry it)


def calibration_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random starts (the GPTQ/QLLM calibration protocol)."""
    if n_samples <= 0 or seq_len <= 1:
        raise PipelineError(f"calibrate.n_samples={n_samples} and calibrate.seq_len={seq_len} must be positive (seq_len >= 2)")
    if tokens.numel() <= seq_len:
        raise PipelineError(
            f"the calibration text has {tokens.numel()} tokens, too few for calibrate.seq_len={seq_len}; "
            "use a longer corpus or a smaller seq_len"
        )
    starts = calibration_starts(tokens.numel(), n_samples, seq_len, seed)
    return torch.stack([tokens[s : s + seq_len] for s in starts])


def calibration_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> list[int]:
    """The seeded start positions `calibration_windows` draws."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen).tolist()


def _evenly(items: list[int], k: int) -> list[int]:
    """`k` of `items`, evenly spaced (the middle of each of k equal stretches)."""
    return [items[(2 * i + 1) * len(items) // (2 * k)] for i in range(k)] if k < len(items) else list(items)


def spread_grid_windows(n_tokens: int, seq_len: int, max_windows: int | None, doc_starts: list[int] | None = None,
                        excluded: set[int] | None = None) -> list[int]:
    """Indices (in order) of the grid windows chosen: window j holds tokens [j·seq_len, (j+1)·seq_len). All allowed
    ones when `max_windows` is None or not smaller; otherwise one per document first (the window holding its middle
    token, if allowed), then evenly over the rest. `doc_starts`: each document's first token (ascending);
    `excluded`: grid windows that may not be taken."""
    excluded = excluded or set()
    allowed = [j for j in range(n_tokens // seq_len) if j not in excluded]
    if not max_windows or max_windows >= len(allowed):
        return allowed
    k = int(max_windows)
    anchors, allowed_set = [], set(allowed)
    if doc_starts:
        for start, end in zip(doc_starts, [*doc_starts[1:], n_tokens]):
            middle = (start + end - 1) // 2 // seq_len
            if middle in allowed_set and middle not in anchors:
                anchors.append(middle)
    chosen = set(_evenly(anchors, k))
    rest = [j for j in allowed if j not in chosen]
    chosen |= set(_evenly(rest, k - len(chosen)))
    return sorted(chosen)


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None,
                       doc_starts: list[int] | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` over the concatenated test text, spread over its documents (see the
    module's docstring); all of them when `max_windows` is None."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise PipelineError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than eval.seq_len={seq_len}; use a longer corpus or a smaller seq_len"
        )
    grid = tokens[: n * seq_len].view(n, seq_len)
    return grid[spread_grid_windows(tokens.numel(), seq_len, max_windows, doc_starts)]


def heldout_windows(tokens: torch.Tensor, calib_starts: list[int], calib_len: int, seq_len: int,
                    max_windows: int | None, doc_starts: list[int] | None = None) -> torch.Tensor:
    """Grid windows of the calibration text that overlap no calibration window, spread over its documents like the
    evaluation windows: a development set drawn from the calibration split, so settings can be chosen without ever
    looking at the evaluation text."""
    n = tokens.numel() // seq_len
    excluded = {j for s in calib_starts for j in range(s // seq_len, min(n, (s + calib_len - 1) // seq_len + 1))}
    chosen = spread_grid_windows(tokens.numel(), seq_len, max_windows, doc_starts, excluded)
    if not chosen:
        raise PipelineError(f"no held-out calibration window of eval.seq_len={seq_len} tokens is left; lower it")
    return tokens[: n * seq_len].view(n, seq_len)[chosen]


def window_bos(config, tokenizer) -> int | None:
    """The token each window must start with for this model's family (Gemma: BOS), or None."""
    from qllm_pipeline.model.arch import family_of

    if not family_of(config).bos_per_window:
        return None
    if tokenizer.bos_token_id is None:
        raise PipelineError(f"{config.model_type} models expect each window to start with BOS, and the tokenizer has none")
    return int(tokenizer.bos_token_id)


def start_with(windows: torch.Tensor, token: int | None) -> torch.Tensor:
    """Each window with `token` in front and its last token dropped (same length, the same text positions), or the
    windows as they are when `token` is None."""
    if token is None:
        return windows
    return torch.cat([torch.full_like(windows[:, :1], token), windows[:, :-1]], dim=1)
