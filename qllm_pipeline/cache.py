"""Content-addressed artifact cache.

An artifact is a directory `<root>/<stage>/<key>/` holding safetensors and json files. The key hashes the stage
name and version, the slice of config the stage depends on, and the keys of its upstream artifacts, so a change
anywhere upstream yields a new key. Artifacts are written into a temporary sibling directory and renamed into
place, so a killed run never leaves a half-written artifact behind: it either exists whole or not at all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

_TMP_MARK = ".tmp-"


def artifact_key(stage: str, version: int, config: Any, upstream: dict[str, str] | None = None, extra: Any = None) -> str:
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "upstream": upstream or {}, "extra": extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class ArtifactWriter:
    """Collects files in a temp directory; `commit()` renames it to the final place atomically."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.parent / f"{final.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(self.tmp / name))

    def save_json(self, name: str, obj: Any) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> Path:
        if self.final.exists():  # another run finished the same key first; identical content by construction
            shutil.rmtree(self.tmp)
        else:
            os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Artifact:
    def __init__(self, path: Path):
        self.path = path

    def tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return load_file(str(self.path / name), device=device)

    def json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    def has(self, name: str) -> bool:
        return (self.path / name).exists()


class ArtifactCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        path = self.dir(stage, key)
        return Artifact(path) if path.is_dir() else None

    def writer(self, stage: str, key: str) -> ArtifactWriter:
        return ArtifactWriter(self.dir(stage, key))

    def remove(self, stage: str, key: str) -> None:
        shutil.rmtree(self.dir(stage, key), ignore_errors=True)

    def clean_partial(self) -> int:
        """Delete temp directories left by killed runs; returns how many were removed."""
        removed = 0
        for tmp in self.root.glob(f"*/*{_TMP_MARK}*"):
            pid = tmp.name.rsplit(_TMP_MARK, 1)[1].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue  # a live process (a concurrent run) is still writing it
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        if removed:
            log.info("removed %d partial artifact(s) left by an interrupted run", removed)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
