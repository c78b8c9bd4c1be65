"""Throwaway folders of the ranks that are not rank 0 (their Hydra output, the artifacts they compute but do not
write). Each folder's name carries its owner's process id: a rank killed with SIGKILL runs no exit handler, so the
next rank that makes one removes the folders whose owners are gone."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_OWNED = re.compile(r"qllm-rank\d*-(\d+)-[^-]+")


def scratch_prefix(label: str = "") -> str:
    """The prefix for a new scratch folder of this process (`tempfile.mkdtemp(prefix=...)`); orphans go first."""
    remove_orphans()
    return f"qllm-rank{label}-{os.getpid()}-"


def remove_orphans(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders under `root` (the temporary directory) whose owning process has ended."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob("qllm-rank*"):
        match = _OWNED.fullmatch(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
