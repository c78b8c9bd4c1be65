"""Writing a checkpoint's tensors one part at a time: a single `model.safetensors`, or one shard per part (the
Hugging Face sharded layout, `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`) so that a
streamed model's export holds one decoder block in memory, never the whole model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from qllm_pipeline.model.arch import family_of

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def skeleton_tensors(model, block_prefix: str = "model.layers.") -> dict[str, torch.Tensor]:
    """The tensors of `model` outside its decoder blocks, as an export writes them: lm_head left out when tied to the
    embeddings (rebuilt from them on load)."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(block_prefix)}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop(f"{family_of(model).head}.weight", None)
    return tensors


class ShardWriter:
    """`add(tensors)` once per part (the skeleton, then each block), then `close()`.

    parts=None: everything is buffered and written to one `model.safetensors` at close (an in-memory model);
    parts=n: each `add` is written at once as shard k of n, and close writes the index."""

    def __init__(self, out_dir: str | Path, parts: int | None = None, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        self.parts = parts
        self.metadata = metadata
        self.buffer: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.written = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.parts is None:
            self.buffer.update(tensors)
            return
        from safetensors.torch import save_file

        self.written += 1
        if self.written > self.parts:
            raise ValueError(f"more than the {self.parts} announced shards")
        name = f"model-{self.written:05d}-of-{self.parts:05d}.safetensors"
        save_file(tensors, str(self.out_dir / name), metadata=self.metadata)
        self.weight_map.update({k: name for k in tensors})

    def close(self) -> int:
        """Write what is pending; returns the bytes of the weight files."""
        from safetensors.torch import save_file

        if self.parts is None:
            save_file(self.buffer, str(self.out_dir / WEIGHTS_FILE), metadata=self.metadata)
            self.buffer = {}
            return (self.out_dir / WEIGHTS_FILE).stat().st_size
        if self.written != self.parts:
            raise ValueError(f"{self.written} of {self.parts} shards were written")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return sum((self.out_dir / f).stat().st_size for f in set(self.weight_map.values()))


def read_checkpoint_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint written by ShardWriter (one file or shards)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / INDEX_FILE).exists():
        files = sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
        out = {}
        for f in files:
            out.update(load_file(str(directory / f)))
        return out
    return load_file(str(directory / WEIGHTS_FILE))
