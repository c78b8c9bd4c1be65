"""A GGUF model's float copy, converted once: transformers reads a GGUF file by parsing every metadata field in Python
(SmolLM2's 49k-token vocabulary: seconds for the config, the tokenizer and the weights each, on every run; Gemma-3's
262k more), and dequantizes the weights on every load. The first whole load writes what it read (config, weights in
the loaded dtype, tokenizer) as an ordinary checkpoint directory; later runs read that instead, the same numbers.

Keyed by the GGUF file's content identity (sha256 and dtype), the transformers and gguf versions and COPY_VERSION,
so a changed file or converter is converted again. Written to a temporary directory renamed into place (a killed run
leaves no half copy; of two runs converting at once, one copy is kept). Where: $QLLM_GGUF_CACHE, else
$XDG_CACHE_HOME/qllm_pipeline/gguf (~/.cache/...); QLLM_GGUF_CACHE=off reads the GGUF file every time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

COPY_VERSION = 1
DONE = "qllm_gguf_copy.done"  # written last: a directory without it is not a copy


def cache_root() -> Path | None:
    """Where the copies live, or None when disabled (QLLM_GGUF_CACHE=off)."""
    configured = os.environ.get("QLLM_GGUF_CACHE")
    if configured is not None and configured.strip().lower() in ("off", "0", "false", "none", ""):
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qllm_pipeline" / "gguf"


def copy_dir(identity: str) -> Path | None:
    """The directory of the copy for a GGUF source's content identity (`identity.model_key`), or None if disabled."""
    from importlib.metadata import version

    root = cache_root()
    if root is None:
        return None
    tag = f"{identity}|transformers {version('transformers')}|gguf {version('gguf')}|v{COPY_VERSION}"
    return root / hashlib.sha256(tag.encode()).hexdigest()[:32]


def existing(identity: str) -> Path | None:
    """The finished copy, if there is one."""
    directory = copy_dir(identity)
    return directory if directory is not None and (directory / DONE).is_file() else None


def write(identity: str, model, tokenizer, source_name: str) -> Path | None:
    """Save the model just loaded from its GGUF file (and its tokenizer) as the copy; None when disabled or when the
    cache cannot be written (a read-only or full disk only costs reading the GGUF file again next time)."""
    directory = copy_dir(identity)
    if directory is None or (directory / DONE).is_file():
        return directory
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(f"{source_name}\n")
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / DONE).is_file():  # not another run's finished copy: a real failure
                raise
        log.info("model %s: its float copy written to %s (later runs read it instead of the GGUF file)", source_name,
                 directory)
        return directory
    except Exception as exc:  # noqa: BLE001 - a full disk (safetensors' own error type too) must not end the run
        log.warning("model %s: could not write its float copy under %s (%s); the GGUF file is read each time",
                    source_name, directory.parent, exc)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
