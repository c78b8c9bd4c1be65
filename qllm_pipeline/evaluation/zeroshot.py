"""Zero-shot accuracy with lm-eval (the harness) on the in-memory (e.g. quantized) model.

The already-loaded ``transformers`` model is wrapped in ``lm_eval.models.huggingface.HFLM`` (nothing is reloaded from
disk) and evaluated with ``lm_eval.simple_evaluate``. Besides lm-eval's own tasks, the project's task directory
(``qllm_pipeline/tasks/``, holding the offline ``qllm_smoke`` plumbing test) is added with
``TaskManager(include_path=...)``.

lm-eval's real tasks (piqa, arc_easy, ...) download their data from the Hugging Face hub. Without hub access (or
with ``HF_HUB_OFFLINE=1``) that failure becomes one ``PipelineError`` naming the task, instead of a traceback after
a minute of retries: the hub is probed once with a short timeout and, if it cannot be reached, ``datasets`` and
``huggingface_hub`` are switched to offline mode while the tasks load (so already-cached datasets still work).
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.evaluation.lm_eval_compat import (
    env_offline,
    hub_offline_mode,
    hub_reachable,
    looks_like_hub_failure,
    no_git_hash,
    no_retie,
    on_device,
    quiet_logging,
)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SMOKE_TASK = "qllm_smoke"
# The paper's zero-shot list.
DEFAULT_TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq"]



# --------------------------------------------------------------------------------------------- local task data
def load_local_json(data_files: str | list | dict, config_source: str | None = None, **_: Any):
    """``custom_dataset`` for our local tasks: the ``json`` builder with ``data_files`` resolved against the directory
    of the task's YAML (lm-eval passes that YAML's path as ``config_source``), so it works from any cwd.

    lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``; other metadata keys are ignored.
    """
    import datasets

    base = Path(config_source).parent if config_source else TASKS_DIR

    def resolve(p):
        if isinstance(p, (list, tuple)):
            return [resolve(x) for x in p]
        return str(p if Path(p).is_absolute() else base / p)

    files = {k: resolve(v) for k, v in data_files.items()} if isinstance(data_files, dict) else resolve(data_files)
    return datasets.load_dataset("json", data_files=files)


# --------------------------------------------------------------------------------------------- task manager
@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """Indexing lm-eval's ~15k built-in task YAMLs takes seconds, so each variant is built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _is_local(tm, name: str) -> bool:
    entry = tm.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    return path is not None and TASKS_DIR in Path(path).resolve().parents


# --------------------------------------------------------------------------------------------- hub / offline


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")




def _seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_args(tasks, limit, batch_size) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = [str(t) for t in (tasks or [])]
    if not tasks:
        raise PipelineError(f"no zero-shot tasks given; set eval.tasks (e.g. [{SMOKE_TASK}] or {DEFAULT_TASKS})")
    if len(set(tasks)) != len(tasks):
        raise PipelineError(f"duplicate zero-shot task names in {tasks}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                              or (isinstance(limit, float) and limit >= 1 and not limit.is_integer())):
        raise PipelineError(f"zero-shot limit must be null, a positive count or a fraction in (0, 1), got {limit!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PipelineError(f"zero-shot batch_size must be a positive integer, got {batch_size!r}")
    return tasks


_NAME = r"[A-Za-z0-9_\-\.\+:/()]+"
_SCALAR_NAME = re.compile(rf"^[ \t]*['\"]?(?:task|group|tag)['\"]?:[ \t]*['\"]?({_NAME})", re.M)
_LISTED_NAMES = re.compile(r"^[ \t]*['\"]?(?:tag|group|task)['\"]?:[ \t]*\n((?:[ \t]*-[ \t]*\S+[ \t]*\n?)+)", re.M)
_LIST_ITEM = re.compile(rf"-[ \t]*['\"]?({_NAME})")


def _is_task_config(path: Path) -> bool:
    # lm-eval's configs are .yaml files and the extensionless files they include (``_default_template_yaml``).
    return path.is_file() and (path.suffix in (".yaml", ".yml", "") or path.name.endswith("yaml"))


@functools.lru_cache(maxsize=1)
def declared_task_names() -> frozenset[str]:
    """Task, group and tag names written in ours and lm-eval's task configs: a text scan in a second or two, where
    building lm-eval's TaskManager takes 15-20 s on two cores. tests/test_zeroshot.py checks that it covers every
    name the TaskManager indexes."""
    import lm_eval

    names: set[str] = set()
    for root in (TASKS_DIR, Path(lm_eval.__file__).parent / "tasks"):
        for path in filter(_is_task_config, root.rglob("*")):
            text = path.read_text(errors="ignore")
            names.update(_SCALAR_NAME.findall(text))
            for block in _LISTED_NAMES.findall(text):
                names.update(_LIST_ITEM.findall(block))
    return frozenset(names)


def _unknown_task(name: str, known) -> PipelineError:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.75)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return PipelineError(f"unknown lm-eval task {name!r}{hint}; see `lm-eval ls tasks` or use eval.tasks=[{SMOKE_TASK}]")


def check_task_names(names: list[str]) -> None:
    """Refuse an unknown task name at start, by the fast scan (the TaskManager is built only when the tasks run)."""
    known = declared_task_names()
    for name in names:
        if name not in known:
            raise _unknown_task(name, known)


def resolve_task_names(names: list[str]):
    """The task manager that knows every name (ours first, then lm-eval's); one error line for an unknown name.
    Cheap enough to run before any weight is read."""
    local = _task_manager(include_defaults=False)
    tm = local if all(n in local.task_index for n in names) else _task_manager(include_defaults=True)
    for name in names:
        if name not in tm.task_index:
            raise _unknown_task(name, tm.all_tasks)
    return tm


def _load_tasks(names: list[str]) -> tuple[Any, list, list[str]]:
    """Resolve and build every task (this is where datasets are loaded); returns (task manager, objects, leaf names)."""
    tm = resolve_task_names(names)

    hub_names = [n for n in names if not _is_local(tm, n)]
    why = ""
    if hub_names:
        if variable := env_offline():
            why = f"{variable} is set"
        elif not hub_reachable():
            why = f"no connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}"
    offline = bool(why)

    objects, leaves = [], []
    with hub_offline_mode(offline):
        for name in names:
            try:
                loaded = tm.load([name])
            except Exception as e:  # noqa: BLE001 - every failure becomes one user-facing line
                if name in hub_names and (offline or looks_like_hub_failure(e)):
                    raise PipelineError(
                        f"lm-eval task {name!r} needs its dataset from the Hugging Face hub, which is unreachable"
                        f" ({why or _one_line(e)}), and it is not in the local cache; run with hub access or use "
                        f"eval.tasks=[{SMOKE_TASK}]"
                    ) from e
                raise PipelineError(f"lm-eval task {name!r} could not be loaded: {_one_line(e)}") from e
            if name in loaded["groups"]:
                objects.append(loaded["groups"][name])
            else:
                objects.extend(loaded["tasks"].values())
            leaves.extend(t for t in loaded["tasks"] if t not in leaves)
    return tm, objects, leaves


def _metric(row: dict, name: str) -> float | None:
    value = row.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


# --------------------------------------------------------------------------------------------- entry point
def run_zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | float | None,
    batch_size: int,
    device,
    num_fewshot: int = 0,
    seed: int = 0,
) -> dict:
    """Evaluate `model` on lm-eval `tasks`; `limit` caps the documents per task (a count, or a fraction if < 1).

    Returns ``{"tasks": {task: {"acc": float, "acc_norm": float | None, "n": int}}, "average_acc": float}`` where
    ``n`` is the number of documents scored and ``average_acc`` the unweighted mean of the tasks' ``acc``. Groups
    (e.g. ``ai2_arc``) are reported per leaf task. Deterministic for a given seed. Raises ``PipelineError`` for an
    unknown task or a hub dataset that cannot be fetched.
    """
    names = _check_args(tasks, limit, batch_size)
    if isinstance(limit, float) and limit >= 1:
        limit = int(limit)  # lm-eval reads a float >= 1 as a count anyway; make it explicit

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with quiet_logging():
        _seed_all(seed)
        tm, objects, leaves = _load_tasks(names)
        with on_device(model, device), no_retie(model), no_git_hash():
            lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
                      device=str(device) if device is not None else None)
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )

    results, counts = out["results"], out.get("n-samples", {})
    report: dict[str, dict] = {}
    for task in leaves:
        row = results.get(task, {})
        acc = _metric(row, "acc")
        if acc is None:
            raise PipelineError(f"lm-eval task {task!r} reports no 'acc' metric; zero-shot evaluation needs "
                                "log-likelihood (multiple-choice) tasks")
        count = counts.get(task, {})
        report[task] = {"acc": acc, "acc_norm": _metric(row, "acc_norm"),
                        "n": int(count.get("effective", count.get("original", 0)))}
    return {"tasks": report, "average_acc": math.fsum(r["acc"] for r in report.values()) / len(report)}
