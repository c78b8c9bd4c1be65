"""A model streamed from its safetensors shards: host memory bounded by one decoder block, not by the model.

The skeleton (embeddings, final norm, lm_head, rotary embedding, config) is built on the `meta` device and only its
own tensors are read; the model's decoder layers (`model.model.layers` in LLaMA) become a :class:`StreamedLayers`, whose `layers[i]` reads block i's
tensors (`safetensors.safe_open`, only that block's names) into a fresh module each time it is asked. Nothing keeps
a block alive once its caller drops it, so a 70B checkpoint never sits in host memory as a whole.

Every stage reaches blocks through `decoder_layers(model)[i]` and copies before it changes one, so a streamed model
and an in-memory one give the same numbers (tests/test_streaming.py). :class:`TransformedLayers` is the same idea
for a derived model: block i of the rotated model is built from block i of the loaded one on request (the rotate
stage), instead of a whole rotated copy.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.model.arch import (
    decoder_layers,
    embeddings,
    family_of,
    rotary_embedding,
    set_decoder_layers,
    set_rotary_embedding,
)

INDEX_FILE = "model.safetensors.index.json"


class ShardIndex:
    """Which safetensors file of a checkpoint directory holds each tensor (from the index file, or by listing the
    files of an unsharded checkpoint)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.directory.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({name: path for name in f.keys()})
        if not self.files:
            raise PipelineError(f"{self.directory} has no safetensors weights; point model.path at a checkpoint "
                                "directory with *.safetensors files, or set model.load=whole")

    @staticmethod
    def available(directory: str | Path) -> bool:
        directory = Path(directory)
        return directory.is_dir() and ((directory / INDEX_FILE).exists() or any(directory.glob("*.safetensors")))

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.files if n.startswith(prefix)]

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (only those are read), cast to `dtype` (floating-point tensors only)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out


class LazyLayers(nn.Module):
    """A stand-in for a model's decoder layers: `len()`, `layers[i]` (a fresh, materialized block) and iteration.

    Blocks are not submodules, so `model.parameters()` / `state_dict()` hold the skeleton only. A full-model forward
    works (a slice yields the blocks one by one); lm-eval, which runs many, gets a real ModuleList (stages.evaluate)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def block(self, index: int) -> nn.Module:
        raise NotImplementedError

    def __getitem__(self, index: int | slice) -> nn.Module:
        if isinstance(index, slice):
            # What a full-model forward iterates (`self.layers[: num_hidden_layers]`): the blocks one at a time, each
            # built when reached and dropped after, so even a full forward holds one block.
            return (self.block(i) for i in range(len(self))[index])
        if not isinstance(index, int):
            raise TypeError(f"{type(self).__name__} indices are integers or slices, not {type(index).__name__}")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        return self.block(index)

    def __iter__(self) -> Iterator[nn.Module]:
        return (self[i] for i in range(len(self)))


class StreamedLayers(LazyLayers):
    """Decoder blocks read from safetensors shards on request; a meta-device template gives each block's structure."""

    def __init__(self, template: nn.ModuleList, index: ShardIndex, dtype: torch.dtype, prefix: str):
        super().__init__()
        # Plain attributes, not submodules: the template is on `meta` and must not show up as the model's parameters.
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_index", index)
        self.dtype = dtype
        self.prefix = prefix  # the blocks' names in the checkpoint: `<prefix><i>.<tensor>`

    def __len__(self) -> int:
        return len(self._template)

    def block(self, index: int) -> nn.Module:
        prefix = f"{self.prefix}{index}."
        tensors = self._index.read(self._index.names(prefix), self.dtype)
        layer = copy.deepcopy(self._template[index])  # on meta: no memory
        state = {name[len(prefix):]: t for name, t in tensors.items()}
        missing = sorted(set(layer.state_dict()) - set(state))
        if missing:
            raise PipelineError(f"block {index} of {self._index.directory} lacks tensors {missing[:3]}; "
                                "the checkpoint does not match its config.json")
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.eval().requires_grad_(False)


class TransformedLayers(LazyLayers):
    """Block i of a derived model: `transform(copy of base[i], i)`, computed on request; the last one is kept, since
    stages ask for the same block several times in a row."""

    def __init__(self, base: nn.Module, transform: Callable[[nn.Module, int], nn.Module]):
        super().__init__()
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_transform", transform)
        object.__setattr__(self, "_last", None)

    def __len__(self) -> int:
        return len(self._base)

    def block(self, index: int) -> nn.Module:
        if self._last is None or self._last[0] != index:
            object.__setattr__(self, "_last", None)  # drop the previous block before building the next
            base = self._base[index]
            fresh = base if isinstance(self._base, LazyLayers) else copy.deepcopy(base)
            object.__setattr__(self, "_last", (index, self._transform(fresh, index)))
        return copy.deepcopy(self._last[1])


@contextmanager
def swapped_layers(model: nn.Module, layers: list[nn.Module]) -> Iterator[nn.Module]:
    """`model` with its decoder layers replaced by `layers` for the duration (the original list is restored)."""
    original = decoder_layers(model)
    set_decoder_layers(model, nn.ModuleList(layers))
    try:
        yield model
    finally:
        set_decoder_layers(model, original)


def skeleton_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model without its decoder blocks (embeddings, norm, head, config); `layers` is left
    pointing at the original's blocks, for the caller to replace."""
    layers = decoder_layers(model)
    set_decoder_layers(model, nn.ModuleList())
    try:
        clone = copy.deepcopy(model)
    finally:
        set_decoder_layers(model, layers)
    set_decoder_layers(clone, layers)
    return clone


def is_streamed(model: nn.Module) -> bool:
    return isinstance(decoder_layers(model), LazyLayers)


def _rebuild_computed_buffers(model: nn.Module, layers_prefix: str) -> None:
    """Give the skeleton's non-persistent buffers (Gemma's embedding scale) their values on the CPU.

    They are not in any checkpoint; the model's own `_init_weights` knows their values. It runs before the
    state dict is assigned, so the weights it would initialise are still on `meta` and are left untouched.
    """
    for name, module in model.named_modules():
        if name.startswith(layers_prefix) or name == layers_prefix.rstrip("."):
            continue
        persistent = set(module.state_dict(keep_vars=True))
        computed = [b for b, t in module.named_buffers(recurse=False) if t.is_meta and b not in persistent]
        if not computed:
            continue
        for b in computed:
            setattr(module, b, torch.empty_like(getattr(module, b), device="cpu"))
        model._init_weights(module)


def load_streamed_model(directory: str | Path, dtype: torch.dtype):
    """The skeleton of the checkpoint in `directory` in memory, its decoder blocks streamed (see the module doc)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    index = ShardIndex(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    family = family_of(config)
    prefix, head = f"{family.layers}.", f"{family.head}.weight"
    set_decoder_layers(model, StreamedLayers(decoder_layers(model), index, dtype, prefix))
    skeleton = [n for n in index.files if not n.startswith(prefix)]
    state = index.read(skeleton, dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied or head not in state:
        state.pop(head, None)
    missing = sorted(set(model.state_dict()) - set(state) - ({head} if tied else set()))
    if missing:
        raise PipelineError(f"{directory} lacks {missing[:3]}; the checkpoint does not match its config.json")
    _rebuild_computed_buffers(model, prefix)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.get_output_embeddings().weight = embeddings(model).weight
    # Buffers that are computed, not stored (the rotary frequencies), are rebuilt on the CPU.
    set_rotary_embedding(model, type(rotary_embedding(model))(config=model.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise PipelineError(f"{directory}: tensors {left[:3]} were not found in the checkpoint")
    model.eval()
    model.requires_grad_(False)
    return model
