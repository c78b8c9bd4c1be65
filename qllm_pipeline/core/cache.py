"""Content-addressed artifact cache, safe against kills, corruption and parallel jobs.

An artifact is a directory `<root>/<stage>/<key>/` holding safetensors and json files. The key hashes the stage
name and version, the slice of config the stage depends on, and the keys of its upstream artifacts, so a change
anywhere upstream yields a new key.

- Atomic: files are written into a temporary sibling directory, fsynced, listed with their sha256 and size in
  `manifest.json` (written last), and the directory is renamed into place: a killed run leaves no half artifact.
- Verified: an artifact is checked against its manifest the first time a process reads it; a corrupt or incomplete
  one gives one warning line, is moved aside and computed again.
- Parallel: computing a key holds a per-key file lock (PyPI `filelock`), so two jobs needing the same artifact compute
  it once and the other waits and reads it. Temp directories carry host and pid; one is removed only when nobody holds
  its key's lock (its writer is gone, on whichever host it ran).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from qllm_pipeline.core.errors import PipelineError

log = logging.getLogger(__name__)

_TMP_MARK = ".tmp-"
_TRASH_MARK = ".trash-"
MANIFEST = "manifest.json"
LOCKS = ".locks"


def artifact_key(stage: str, version: int, config: Any, upstream: dict[str, str] | None = None, extra: Any = None) -> str:
    payload = json.dumps(
        {"stage": stage, "version": version, "config": config, "upstream": upstream or {}, "extra": extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_file_atomically(path: Path, write: Callable[[Path], Any]) -> bool:
    """`write(tmp)` to a temporary name beside `path`, then renamed onto it: readers see the whole file or none. For
    the small side files kept beside the artifacts (digest memos, parsed texts, token ids); False (and nothing left
    behind) when the directory cannot be written, which only costs recomputing them next time."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library reports it in its own exception type (safetensors' writer does)."""
    return (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in str(exc)


def _disk_error(exc: BaseException, where: Path) -> PipelineError:
    if is_disk_full(exc):
        return PipelineError(f"no space left on the device while writing {where}; free disk space or set pipeline.cache_dir "
                             "to a larger disk (the cache is unchanged)")
    return PipelineError(f"cannot write {where}: {getattr(exc, 'strerror', None) or exc}; check pipeline.cache_dir")


class ArtifactWriter:
    """Collects files in a temp directory; `commit()` seals them with a manifest and renames the directory into place."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.parent / f"{final.name}{_TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.tmp.mkdir(parents=True)
        except OSError as exc:
            raise _disk_error(exc, self.tmp) from exc

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(self.tmp / name))

    def save_json(self, name: str, obj: Any) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def seal(self) -> None:
        """fsync every file, then write the manifest (sha256 and size of each file) and fsync it and the directory."""
        files = {}
        for f in _files(self.tmp):
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
            files[str(f.relative_to(self.tmp))] = {"sha256": sha256_file(f), "size": f.stat().st_size}
        manifest = self.tmp / MANIFEST
        with open(manifest, "w") as handle:
            json.dump({"version": 1, "files": files}, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        for d in {f.parent for f in _files(self.tmp)} | {self.tmp}:
            _fsync_dir(d)

    def commit(self, replace: bool = False) -> Path:
        """Seal and rename into place. An existing artifact is kept (identical content by construction) unless
        `replace` (a forced recompute): then it is swapped out in two renames, never deleted before the new one is in."""
        try:
            self.seal()
            if self.final.exists() and not replace:
                shutil.rmtree(self.tmp)
                return self.final
            if self.final.exists():
                trash = self.final.parent / f"{self.final.name}{_TRASH_MARK}{uuid.uuid4().hex[:8]}"
                os.replace(self.final, trash)
                os.replace(self.tmp, self.final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
            _fsync_dir(self.final.parent)
        except OSError as exc:
            self.abort()
            raise _disk_error(exc, self.final) from exc
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


def _read(read: Callable[[], Any]) -> Any:
    """Read a file of an artifact. A forced recompute in another job swaps the artifact's directory with two renames;
    a read that falls between them finds no file and is retried once the new directory is in place."""
    for delay in (0.05, 0.2, 1.0):
        try:
            return read()
        except FileNotFoundError:
            time.sleep(delay)
    return read()


class Artifact:
    def __init__(self, path: Path):
        self.path = path

    def tensors(self, name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        return _read(lambda: load_file(str(self.path / name), device=device))

    def json(self, name: str) -> Any:
        return _read(lambda: json.loads((self.path / name).read_text()))

    def has(self, name: str) -> bool:
        return (self.path / name).exists()


def verify(path: Path) -> str | None:
    """None when the directory matches its manifest; otherwise what is wrong, in a few words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest"
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    present = {str(f.relative_to(path)) for f in _files(path)}
    if set(files) - present:
        return f"missing {sorted(set(files) - present)[0]}"
    if present - set(files):
        return f"unlisted file {sorted(present - set(files))[0]}"
    for name, entry in files.items():
        f = path / name
        if f.stat().st_size != entry["size"]:
            return f"{name} has {f.stat().st_size} bytes, expected {entry['size']}"
        if sha256_file(f) != entry["sha256"]:
            return f"{name} fails its sha256"
    return None


class ArtifactCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{socket.gethostname()}-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(f"pipeline.cache_dir={self.root} is not writable ({exc.strerror or exc}); "
                                "choose a directory you can write") from exc
        self._verified: set[Path] = set()

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str) -> Artifact | None:
        """The artifact, verified against its manifest (once per process); None when absent or corrupt."""
        path = self.dir(stage, key)
        if not path.is_dir():
            return None
        if path not in self._verified:
            problem = verify(path)
            if problem is not None:
                log.warning("artifact %s/%s is corrupt (%s); computing it again", stage, key, problem)
                self._discard(path)
                return None
            self._verified.add(path)
        return Artifact(path)

    def _discard(self, path: Path) -> None:
        trash = path.parent / f"{path.name}{_TRASH_MARK}{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)
        except OSError:
            return  # another job moved it first
        shutil.rmtree(trash, ignore_errors=True)
        self._verified.discard(path)

    def writer(self, stage: str, key: str) -> ArtifactWriter:
        return ArtifactWriter(self.dir(stage, key))

    def lock(self, stage: str, key: str) -> FileLock:
        path = self.root / LOCKS / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    @contextmanager
    def locked(self, stage: str, keys: list[str]):
        """Hold the locks of several keys (sorted, so two jobs never wait on each other crosswise)."""
        locks = [self.lock(stage, k) for k in sorted(set(keys))]
        try:
            for lock in locks:
                lock.acquire()
            yield
        finally:
            for lock in reversed(locks):
                if lock.is_locked:
                    lock.release()

    def produce(self, stage: str, key: str, compute: Callable[[ArtifactWriter], Any], force: bool = False,
                collective: bool = True) -> tuple[Artifact, bool]:
        """The artifact for `key`, computed under its lock if absent (or if `force`); returns (artifact, computed).
        `collective` matters only to a data-parallel job's cache (qllm_pipeline.core.distributed.SharedCache)."""
        if not force and (found := self.get(stage, key)) is not None:
            return found, False
        with self.lock(stage, key):
            if not force and (found := self.get(stage, key)) is not None:  # another job computed it while we waited
                return found, False
            return self._write(stage, key, compute, replace=force), True

    def put(self, stage: str, key: str, write: Callable[[ArtifactWriter], Any], replace: bool = False,
            lock: bool = True) -> Artifact:
        """Write one artifact whose content the caller computed (results computed jointly, e.g. perplexity rows);
        `lock=False` when the caller already holds the key's lock (see `locked`)."""
        with self.lock(stage, key) if lock else contextlib.nullcontext():
            return self._write(stage, key, write, replace)

    def _write(self, stage: str, key: str, write: Callable[[ArtifactWriter], Any], replace: bool) -> Artifact:
        """Run `write` into a fresh writer and commit it; the caller holds the key's lock."""
        writer = self.writer(stage, key)
        try:
            write(writer)
            path = writer.commit(replace=replace)
        except BaseException as exc:
            writer.abort()
            if is_disk_full(exc):
                raise _disk_error(exc, self.dir(stage, key)) from exc
            raise
        self._verified.add(path)
        return Artifact(path)

    def clean_partial(self) -> int:
        """Delete temp directories of writers that are gone; returns how many were removed.

        A writer holds its key's lock for as long as its temp directory exists, so a temp directory whose lock can be
        taken right now is abandoned, whichever host wrote it. Moved-aside (trash) directories go too.
        """
        removed = 0
        stage_dirs = [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")]  # not .locks etc.
        for tmp in (t for d in stage_dirs for t in d.glob(f"*{_TMP_MARK}*")):
            stage, key = tmp.parent.name, tmp.name.split(_TMP_MARK, 1)[0]
            try:
                with self.lock(stage, key).acquire(timeout=0):
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
                        removed += 1
            except Timeout:
                continue  # its writer (a concurrent job, maybe on another host) is still at work
        for trash in (t for d in stage_dirs for t in d.glob(f"*{_TRASH_MARK}*")):
            shutil.rmtree(trash, ignore_errors=True)
        if removed:
            log.info("removed %d partial artifact(s) left by an interrupted run", removed)
        return removed
