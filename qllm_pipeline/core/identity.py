"""Content identities for cache keys: what the weights, texts and token windows *are*, not what they are called.

A results table must never mix texts or weights because two of them share a name, so keys hash content:
- the model: sha256 of its local weight files (memoized by path, size and mtime, so a 130 GB checkpoint is hashed
  once), or, for a hub id, the commit its revision resolves to; plus the dtype it is loaded in;
- a text or a token tensor: sha256 of its bytes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qllm_pipeline.core.errors import PipelineError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_digest(path: Path, memo_dir: Path | None = None) -> str:
    """sha256 of a file; with `memo_dir`, remembered under (absolute path, size, mtime) so it is computed once."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = None
    if memo_dir is not None:
        tag = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        memo = Path(memo_dir) / f"{tag}.json"
        try:
            return json.loads(memo.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            pass
    from qllm_pipeline.core.cache import sha256_file, write_file_atomically

    value = sha256_file(path)
    if memo is not None:  # a read-only cache only costs the hash again next time
        write_file_atomically(memo, lambda tmp: tmp.write_text(json.dumps({"path": str(path), "sha256": value})))
    return value


def _hub_commit(hub_id: str, revision: str | None) -> str | None:
    """The commit a hub revision resolves to, from the local hub cache (no network); None if not downloaded."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - any failure means "unknown", and the key falls back to the revision name
        return None
    if isinstance(found, str) and "/snapshots/" in found:
        return found.split("/snapshots/", 1)[1].split("/", 1)[0]
    return None


def model_identity(source, memo_dir: Path | None = None) -> dict:
    """What the loaded model is: its weight files' digests (local) or its hub commit, and the dtype. A local source
    without the weight files it names is refused here, the first place that lists them."""
    where, kwargs = source.location()
    local = Path(where)
    if local.exists():
        if kwargs.get("gguf_file"):
            files = [local / kwargs["gguf_file"]]
            if not files[0].is_file():
                raise PipelineError(f"model.gguf_file={kwargs['gguf_file']} is not a file in {local}; check "
                                    "model.gguf_file, or set it to null for a safetensors checkpoint")
        else:
            files = sorted(p for p in local.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
            if not any(p.suffix in WEIGHT_SUFFIXES for p in files):  # caught here, before the keys and any load
                raise PipelineError(f"model.path={where} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); "
                                    "point it at a whole checkpoint directory (config.json and its weights)")
        return {"files": {p.name: file_digest(p, memo_dir) for p in files}, "dtype": source.dtype}
    return {"hub_id": where, "revision": source.revision or "main", "commit": _hub_commit(where, source.revision),
            "dtype": source.dtype}


def model_key(source, memo_dir: Path | None = None) -> str:
    """The content key of a model source (`model_identity` hashed): what cache keys and the loaded-model memo use."""
    from qllm_pipeline.core.cache import artifact_key

    return artifact_key("model_identity", 1, model_identity(source, memo_dir))
