"""Perplexity, computed block by block so only one decoder block is on the compute device at a time.

Standard protocol: the concatenated test text cut into non-overlapping windows of seq_len tokens; ppl is
exp(mean next-token NLL over all predicted positions). Several model variants (FP, RTN, ...) are streamed side
by side so each block is visited once.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qllm_pipeline.core.memory import release_freed_memory
from qllm_pipeline.model.arch import final_norm
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers


def blockwise_hidden(
    model: nn.Module,
    windows: torch.Tensor,
    variants: dict[str, Callable[[int], nn.Module]],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "blocks",
) -> dict[str, torch.Tensor]:
    """Each variant's last-block output on `windows` (host memory), computed block by block: `variants` maps a
    name to a function giving the decoder block i to use for that variant; each block is visited once."""
    dtype = next(model.parameters()).dtype
    runner = BlockRunner(model, windows.shape[1], device, dtype)
    with torch.no_grad():
        embedded = model.get_input_embeddings()(windows)
    streams = {name: embedded for name in variants}
    layers = decoder_layers(model)
    for i in tqdm(range(len(layers)), desc=desc, disable=not progress, leave=False):
        for name, block_for in variants.items():
            block = block_for(i).to(device)
            streams[name] = runner.run_batched(block, streams[name], batch_size)
            block.to("cpu")  # an in-memory model's own block must not stay on the device
            del block
        release_freed_memory()  # the blocks just run are garbage (see Runner.walk_blocks)
    return streams


def blockwise_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    variants: dict[str, Callable[[int], nn.Module]],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> dict[str, float]:
    """`variants` maps a name to a function giving the decoder block i to use for that variant."""
    return {name: nll.ppl for name, nll in blockwise_nll(model, windows, variants, device, batch_size, progress, desc).items()}


@dataclass(frozen=True)
class WindowNLL:
    """A variant's perplexity on the windows, each window's summed next-token NLL (for paired intervals), and each
    batch's NLL sum (the perplexity's own sum; parts computed apart combine to the same digits)."""

    window_nll: list[float]
    tokens_per_window: int
    batch_nll: list[float]

    @property
    def ppl(self) -> float:
        total = 0.0
        for value in self.batch_nll:  # summed batch by batch, in window order, as it always was
            total += value
        return math.exp(total / (len(self.window_nll) * self.tokens_per_window))

    @staticmethod
    def combine(parts: list["WindowNLL"]) -> "WindowNLL":
        """The windows of `parts` (consecutive runs of windows, in order) as one evaluation."""
        return WindowNLL([w for p in parts for w in p.window_nll], parts[0].tokens_per_window,
                         [b for p in parts for b in p.batch_nll])


def blockwise_nll(model: nn.Module, windows: torch.Tensor, variants: dict[str, Callable[[int], nn.Module]],
                  device: torch.device, batch_size: int = 8, progress: bool = True,
                  desc: str = "perplexity") -> dict[str, WindowNLL]:
    """:func:`blockwise_perplexity` with each window's NLL beside the perplexity."""
    streams = blockwise_hidden(model, windows, variants, device, batch_size, progress, desc)
    return {name: _nll(model, hidden, windows, device, batch_size) for name, hidden in streams.items()}


def _nll(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, device, batch_size: int) -> WindowNLL:
    norm, head = final_norm(model).to(device), model.get_output_embeddings().to(device)
    per_batch, per_window = [], []
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            h = hidden[start : start + batch_size].to(device)
            ids = windows[start : start + batch_size].to(device)
            logits, targets = head(norm(h)).float()[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
            # The perplexity sums the batch in one reduction, as it always has (its digits stay the same); the
            # per-window sums are for the intervals.
            per_batch.append(nn.functional.cross_entropy(logits, targets, reduction="sum").item())
            losses = nn.functional.cross_entropy(logits, targets, reduction="none").view(ids.shape[0], -1)
            per_window += losses.double().sum(1).tolist()
    norm.to("cpu"), head.to("cpu")
    return WindowNLL(per_window, windows.shape[1] - 1, per_batch)
