"""How end-to-end tuning (qllm_pipeline.methods.e2e_tuning) computes a batch's KL and gradients over the fused blocks.

`StreamedExecutor` holds one block on the device at a time, whatever the model's depth. Forward: block by block,
each block's input kept in host memory (or spilled to files, `InputStore`); the head gives the KL's gradient with
respect to the last block's output; backward: from the last block to the first, each block's forward recomputed
from its stored input (block-granular checkpointing), its tuned parameters' gradients added to the host leaves and
its input's gradient handed to the block before. A batch costs two forwards and one backward per block.

`WholeExecutor` puts every block on the device and keeps one autograd graph per batch: one forward less, for models
whose blocks and activations fit at once. Both compute the same gradients (tests/test_tune_e2e.py).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qllm_pipeline.methods.e2e_tuning import Executor, Head, TunedParams, head_kl
from qllm_pipeline.quantized.blocks import quant_linears


class InputStore:
    """The block inputs of one batch: in host memory, or spilled to `spill_dir` (one file per block) when the host
    has no room for them. `close()` removes the files."""

    def __init__(self, spill_dir: Path | None = None):
        self.dir = Path(spill_dir) if spill_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._kept: dict[int, torch.Tensor] = {}

    def put(self, index: int, x: torch.Tensor) -> None:
        x = x.detach().to("cpu")
        if self.dir is None:
            self._kept[index] = x
        else:
            save_file({"x": x.contiguous()}, str(self.dir / f"{index}.safetensors"))

    def get(self, index: int) -> torch.Tensor:
        return self._kept[index] if self.dir is None else load_file(str(self.dir / f"{index}.safetensors"))["x"]

    def close(self) -> None:
        self._kept.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class FusedBlocks:
    """Fused block i on the host: `build(i)` on request, or the copy kept from the first request when `keep` (the
    host has room for every block: no rebuilding, twice per block and batch, from the fused artifacts)."""

    def __init__(self, build: Callable[[int], nn.Module], count: int, keep: bool):
        self.build, self.count, self.keep = build, count, keep
        self._kept: dict[int, nn.Module] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> nn.Module:
        if not self.keep:
            return self.build(index)
        if index not in self._kept:
            self._kept[index] = self.build(index)
        return self._kept[index]


def move_block(block: nn.Module, device) -> nn.Module:
    """A fused block and its integer codes (not registered tensors) to `device`."""
    block.to(device)
    for ql in quant_linears(block).values():
        if ql.codes is not None:
            ql.codes = {k: v.to(device) for k, v in ql.codes.items()}
    return block


class _BlockExecutor(Executor):
    def __init__(self, blocks: FusedBlocks, params: TunedParams, run_block, embed: nn.Module, student: Head,
                 teacher: Head, device):
        self.blocks, self.params, self.run_block = blocks, params, run_block
        self.embed, self.student, self.teacher = embed, student, teacher
        self.device = torch.device(device)

    def _embedded(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embed(ids.to(self.embed.weight.device)).to(self.device)

    def close(self) -> None:
        pass


class StreamedExecutor(_BlockExecutor):
    """One block on the device at a time (see the module doc)."""

    def __init__(self, *args, inputs: InputStore | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs = inputs or InputStore()

    def _on_device(self, index: int):
        block = self.blocks[index]
        pairs = self.params.attach(index, block)
        return move_block(block, self.device), pairs

    def _release(self, block: nn.Module) -> None:
        if self.blocks.keep:  # kept for the next pass: back to the host, without the tuning attached
            TunedParams.detach(block)
            move_block(block, "cpu")

    def _forward(self, x: torch.Tensor, store: bool) -> torch.Tensor:
        with torch.no_grad():
            for i in range(len(self.blocks)):
                if store:
                    self.inputs.put(i, x)
                block, _ = self._on_device(i)
                x = self.run_block(block, x)
                self._release(block)
                del block
        return x

    def kl(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        return head_kl(self._forward(self._embedded(ids), store=False), target, self.student, self.teacher)

    def kl_and_grads(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        hidden = self._forward(self._embedded(ids), store=True).detach().requires_grad_(True)
        loss = head_kl(hidden, target, self.student, self.teacher, backward=True)
        grad = hidden.grad
        del hidden
        for i in reversed(range(len(self.blocks))):
            block, pairs = self._on_device(i)
            x = self.inputs.get(i).to(self.device).requires_grad_(i > 0)  # the embeddings are not tuned
            with torch.enable_grad():
                out = self.run_block(block, x)
            out.backward(grad)
            self.params.collect(pairs)
            grad = x.grad
            del out, x, pairs
            self._release(block)
            del block
        return loss

    def close(self) -> None:
        self.inputs.close()


class WholeExecutor(_BlockExecutor):
    """Every block on the device, the tuning attached once; one autograd graph per batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layers = [self.blocks[i] for i in range(len(self.blocks))]
        self.pairs = [self.params.attach(i, block) for i, block in enumerate(self.layers)]
        for block in self.layers:
            move_block(block, self.device)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        for pairs in self.pairs:  # the optimizer stepped the host leaves
            TunedParams.sync(pairs)
        x = self._embedded(ids)
        for block in self.layers:
            x = self.run_block(block, x)
        return x

    def kl(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        with torch.no_grad():
            return head_kl(self._forward(ids), target, self.student, self.teacher)

    def kl_and_grads(self, ids: torch.Tensor, target: torch.Tensor) -> float:
        with torch.enable_grad():
            out = self._forward(ids)
        hidden = out.detach().requires_grad_(True)
        loss = head_kl(hidden, target, self.student, self.teacher, backward=True)
        out.backward(hidden.grad)
        for pairs in self.pairs:
            self.params.collect(pairs)
        return loss

    def close(self) -> None:
        for block in self.layers:
            TunedParams.detach(block)
            move_block(block, "cpu")
        self.layers, self.pairs = [], []


EXECUTORS = {"streamed": StreamedExecutor, "whole": WholeExecutor}
