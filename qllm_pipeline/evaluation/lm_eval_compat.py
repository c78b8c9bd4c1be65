"""Where lm-eval, datasets and huggingface_hub need to be held to what the pipeline expects, in one place: the
hub's offline mode switched on at run time (both libraries read it at import), hub failures recognised, their
logging quieted, and lm-eval's HFLM kept from moving, re-tying or git-describing our in-memory model."""
from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import torch
from torch import nn

TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
HUB_PROBE_TIMEOUT_S = 3.0
QUIET_LOGGERS = ("lm_eval", "datasets", "huggingface_hub", "transformers", "accelerate")


def env_offline() -> str | None:
    """The name of the offline-mode variable that is set, if any."""
    return next((k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(k, "").upper() in TRUE_VALUES), None)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub endpoint (honours HTTP(S)_PROXY). Any HTTP answer, even an error code, counts."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def hub_offline_mode(enabled: bool) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` behave as with HF_HUB_OFFLINE=1 (cache only, fail at once) for the block.

    Both libraries read the variable when they are imported, so setting it later (or finding the hub unreachable)
    must patch their module-level flags; the previous values come back afterwards.
    """
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = [(mod, name, getattr(mod, name)) for mod, name in (
        (datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE"),
    ) if hasattr(mod, name)]
    try:
        for mod, name, _ in saved:
            setattr(mod, name, True)
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def looks_like_hub_failure(exc: BaseException) -> bool:
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "ConnectError", "ConnectTimeout",
             "ReadTimeout", "HfHubHTTPError", "RepositoryNotFoundError", "GatedRepoError"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(c.__name__ in names for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def on_device(model: nn.Module, device) -> Iterator[None]:
    """HFLM ignores `device` for a pre-built model (it uses model.device), so place the whole model there ourselves
    for the evaluation and put it back where it was (the pipeline keeps it on the CPU) afterwards."""
    target = torch.device(device) if device is not None else None
    params = list(model.parameters()) + list(model.buffers())
    original = params[0].device if params else None
    move = target is not None and any(p.device != target for p in params)
    was_training = model.training
    if move:
        model.to(target)
    try:
        yield
    finally:
        if move:
            model.to(original)
        model.train(was_training)


@contextlib.contextmanager
def no_retie(model: nn.Module) -> Iterator[None]:
    """HFLM calls model.tie_weights(), which re-ties lm_head to embed_tokens whenever the config says so; a rotated or
    quantized head must stay exactly as it is, so the call is a no-op while HFLM is built."""
    had = "tie_weights" in model.__dict__
    previous = model.__dict__.get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had:
            model.tie_weights = previous
        else:
            del model.tie_weights


@contextlib.contextmanager
def no_git_hash() -> Iterator[None]:
    """simple_evaluate records `git describe` of the cwd in its output (unused here); skip the subprocess and the
    "fatal: not a git repository" it prints outside a checkout."""
    import lm_eval.evaluator as evaluator

    previous = getattr(evaluator, "get_git_commit_hash", None)
    if previous is None:
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = previous

