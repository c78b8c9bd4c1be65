"""The checks of the composed configuration that the typed settings alone cannot make, before any weight is read.

Each key's type, default and range are declared once, in its group's dataclass (qllm_pipeline.core.config). Here:
`check_overrides` refuses a bad command-line value with our one-line message before Hydra composes (Hydra's own
type errors would say less), `validate_schema` checks every value of the composed configuration against the same
declarations (values from recipe files and interpolations too), and `validate_combinations` the settings that are
fine alone and wrong together. Stage-specific checks stay with their stages (`Stage.validate`).
"""
from __future__ import annotations

import os
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from qllm_pipeline.core.config import CHECKED_ELSEWHERE, SCHEMA
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.data.corpora import CORPORA
from qllm_pipeline.data.windows import HELDOUT

FREE = {"hydra"}  # sections the schema does not own
# Assembly merges as many pairs as disassembly added, among the channels that were not split: k split channels and n
# extra copies (k <= n) leave C - k ordinary channels, so n <= (C - n) / 2 always has enough pairs: n <= C / 3.
MAX_ASSEMBLED_RATIO = 0.3


def check_value(section: str, key: str, value: Any) -> None:
    """One setting's value against its declaration (unknown keys refused)."""
    fields = SCHEMA[section]
    if key not in fields:
        raise PipelineError(f"unknown key {section}.{key}; {section} has {sorted(fields)}")
    if (section, key) not in CHECKED_ELSEWHERE:
        fields[key].check(f"{section}.{key}", value)


def validate_schema(cfg: dict) -> None:
    """Types, ranges and unknown keys of the whole configuration; one PipelineError for the first problem."""
    for section, value in cfg.items():
        if section in FREE:
            continue
        if section not in SCHEMA:
            raise PipelineError(f"unknown config section {section!r}; the sections are {sorted(SCHEMA)}")
        if not isinstance(value, dict):
            raise PipelineError(f"{section} must be a mapping of settings, got {value!r}")
        for key, item in value.items():
            check_value(section, key, item)
    validate_combinations(cfg)


def check_overrides(overrides: list[str], groups: set[str]) -> None:
    """The command line's `section.key=value` overrides, checked before Hydra composes them into the typed config.
    Group choices (`quant=w4a8`), Hydra's own keys and deletions are left to Hydra; deeper keys
    (`+tune_e2e.scale_lr.4=...`) to validate_schema after composing; a sweep checks each of its values."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - Hydra reports its own syntax errors
        return
    for override in parsed:
        key = override.key_or_group
        section, _, name = key.partition(".")
        if section in FREE or "/" in key or override.is_delete() or override.package is not None \
                or (not name and key in groups):
            continue
        if section not in SCHEMA:
            raise PipelineError(f"unknown config section {section!r}; the sections are {sorted(SCHEMA)}")
        if not name or "." in name:
            continue
        for value in _values(override):
            if not (isinstance(value, str) and "${" in value):  # an interpolation is checked once resolved
                check_value(section, name, value)


def _values(override: Override) -> list:
    if not override.is_sweep_override():
        return [override.value()]
    try:
        return list(override.sweep_iterator())
    except Exception:  # noqa: BLE001 - an interval sweep has no values to list; Hydra's sweeper expands it
        return []


def validate_combinations(cfg: dict) -> None:
    """Settings that are fine alone and wrong together."""
    quant, reassemble = cfg["quant"], cfg["reassemble"]
    stages = cfg["pipeline"]["stages"]
    if quant["group_size"] and "reassemble" in stages and reassemble["enabled"] and not reassemble["assemble"] \
            and quant["abits"] is not None:
        raise PipelineError(
            f"quant.group_size={quant['group_size']} needs reassemble.assemble=true: disassembly alone adds channels, "
            "so the input width changes and no group size divides it; set reassemble.assemble=true or quant.group_size=null"
        )
    ratio = cfg["search_theta"]["channel_ratio"]
    if "search_theta" in stages and reassemble["assemble"] and ratio > MAX_ASSEMBLED_RATIO:
        raise PipelineError(
            f"search_theta.channel_ratio={ratio} is too large for channel assembly: merging that many pairs needs more "
            f"ordinary channels than remain; use at most {MAX_ASSEMBLED_RATIO} (QLLM: 0.2), or reassemble.assemble=false"
        )
    data = cfg["data"]
    if data["name"] == "text_files":
        for key in ("calib_path", "eval_path"):
            path = data[key]
            if path is None:
                raise PipelineError(f"data.{key} must be set for data=text_files: add data.{key}=PATH")
            if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise PipelineError(f"data.{key}={path} is not a readable file; point it at a UTF-8 text file")
            if os.path.getsize(path) == 0:
                purpose = "calibrate on" if key == "calib_path" else "evaluate on"
                raise PipelineError(f"data.{key}={path} is empty; it must hold the text to {purpose}")
    known = {*CORPORA, HELDOUT}
    for name in cfg["eval"]["datasets"]:
        if name not in known:
            raise PipelineError(f"unknown eval.datasets entry {name!r}; choose from {sorted(known)}")
        if name == "text_files" and data["name"] != "text_files":
            raise PipelineError("eval.datasets has text_files but data is not text_files; set data=text_files with "
                                "data.calib_path and data.eval_path")
    if not cfg["eval"]["datasets"] and not cfg["eval"]["tasks"]:
        raise PipelineError("eval.datasets and eval.tasks are both empty: nothing to evaluate; list a dataset, "
                            "e.g. eval.datasets=[wiki_sample]")
    limit = cfg["eval"]["limit"]
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise PipelineError(f"eval.limit={limit!r} must be null, a positive count or a fraction in (0, 1)")
