"""The configuration's typed schema, checked before any weight is read.

One `Field` per config key: its type, range or choices. `validate_schema(cfg)` walks the composed configuration,
refuses unknown keys and values of the wrong type or range, and raises one PipelineError naming the key, the value
and what to do. Checks that need two keys at once (e.g. grouped weights and a reassembly that changes the width) come
after, in `validate_combinations`. Stage-specific checks stay with their stages (`Stage.validate`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .data import CORPORA, HELDOUT
from .e2e_tuning import E2E_MODES
from .errors import PipelineError
from .export_ct import MODEL_FORMATS
from .lowrank import AUTOCAST_CHOICES
from .model_loading import DTYPES, LOAD_MODES
from .theta_search import GRID_SPACINGS
from .weight_rounding import WEIGHT_ALGORITHMS

INT, FLOAT, BOOL, STR, LIST, DICT = "int", "number", "true or false", "a string", "a list", "a mapping"


@dataclass(frozen=True)
class Field:
    kind: str  # one of INT, FLOAT, BOOL, STR, LIST, DICT
    null: bool = False  # null allowed
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    lo_open: bool = False  # lower bound excluded
    hi_open: bool = False
    choices: tuple | None = None
    hint: str = ""  # what the key means, when the range alone does not say

    def check(self, key: str, value: Any) -> None:
        if value is None:
            if self.null:
                return
            raise PipelineError(f"{key} must be set ({self.describe()}); it is null")
        if self.kind == BOOL and not isinstance(value, bool):
            raise PipelineError(f"{key}={value!r} must be true or false")
        why = f" ({self.describe()})" if self.describe() else ""
        if self.kind == INT and (isinstance(value, bool) or not isinstance(value, int)):
            raise PipelineError(f"{key}={value!r} must be an integer{why}")
        if self.kind == FLOAT:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PipelineError(f"{key}={value!r} must be a number{why}")
            if not math.isfinite(value):
                raise PipelineError(f"{key}={value!r} must be a finite number{why}")
        if self.kind == STR and not isinstance(value, str):
            raise PipelineError(f"{key}={value!r} must be a string")
        if self.kind == LIST and not isinstance(value, list):
            raise PipelineError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
        if self.choices is not None and self.kind != LIST and value not in self.choices:
            raise PipelineError(f"{key}={value!r} is not one of {list(self.choices)}")
        if self.kind in (INT, FLOAT) and not self._in_range(value):
            raise PipelineError(f"{key}={value!r} is out of range: {self.describe()}")

    def _in_range(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def describe(self) -> str:
        if self.hint:
            return self.hint
        if self.choices:
            return f"one of {list(self.choices)}"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        if not parts:
            return "or null" if self.null else ""
        return " and ".join(parts) + (", or null" if self.null else "")


def _int(lo=None, hi=None, null=False, hint=""):
    return Field(INT, null=null, lo=lo, hi=hi, hint=hint)


def _num(lo=None, hi=None, lo_open=False, hi_open=False, null=False, hint=""):
    return Field(FLOAT, null=null, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, hint=hint)


def _str(null=False, choices=None):
    return Field(STR, null=null, choices=choices)


BOOL_FIELD = Field(BOOL)
BITS = _int(2, 16, null=True, hint="an integer in 2..16, or null for full precision")

SCHEMA: dict[str, dict[str, Field] | None] = {
    "model": {
        "name": _str(), "package": _str(null=True), "gguf_file": _str(null=True), "hub_id": _str(null=True),
        "path": _str(null=True), "revision": _str(null=True), "dtype": _str(choices=tuple(DTYPES)),
        "load": _str(choices=LOAD_MODES), "arch": Field(DICT, null=True),
    },
    "quant": {
        "name": _str(), "wbits": BITS, "abits": BITS, "attn_bits": BITS,
        "group_size": _int(1, null=True, hint="a positive integer dividing the layer widths, or null for per-channel"),
        "w_symmetric": BOOL_FIELD, "a_symmetric": BOOL_FIELD,
        "a_clip_ratio": Field(DICT),  # a number or {bits: number}: checked by _check_per_bit_width
        "channel_ratio": _num(0, 1, hi_open=True, hint="in [0, 1): extra channels from disassembly as a fraction of C"),
        "weight_algorithm": _str(choices=WEIGHT_ALGORITHMS),
    },
    "data": {"name": _str(choices=tuple(CORPORA)), "calib_path": _str(null=True),
             "eval_path": _str(null=True)},
    "calibrate": {"n_samples": _int(1), "seq_len": _int(2, hint="an integer >= 2 (a window predicts its next tokens)"),
                  "seed": _int()},
    "rotate": {"seed": _int(), "residual": BOOL_FIELD, "value_heads": BOOL_FIELD, "online_down": BOOL_FIELD,
               "online_o": BOOL_FIELD, "online_qk": BOOL_FIELD, "online_inputs": BOOL_FIELD},
    "smooth": {"alpha": _num(0, 1)},
    "search_theta": {
        "enabled": BOOL_FIELD, "points": Field(LIST), "theta": Field(DICT, null=True),  # checked by the stage
        "steps": _int(1, null=True, hint="a positive integer, or null for the reference grid"),
        "spacing": _str(choices=GRID_SPACINGS), "channel_ratio": _num(0, 1, hi_open=True), "n_samples": _int(1),
    },
    "reassemble": {"enabled": BOOL_FIELD, "assemble": BOOL_FIELD},
    "train_lowrank": {
        "enabled": BOOL_FIELD, "rank": _int(1), "lr": _num(0, lo_open=True, hint="a finite number > 0"), "epochs": _int(1),
        "batch_size": _int(1), "weight_decay": _num(0, hint="a finite number >= 0"), "train_norms": BOOL_FIELD,
        "autocast": _str(choices=AUTOCAST_CHOICES), "seed": _int(), "learn_act_clip": BOOL_FIELD,
        "act_clip_lr": _num(0, lo_open=True, null=True, hint="a finite number > 0, or null (the same as lr)"),
        "act_clip_shared": BOOL_FIELD,
    },
    "tune_e2e": {"epochs": _int(1), "batch_size": _int(1), "seed": _int(), "mode": _str(choices=E2E_MODES),
                 "scale_lr": Field(DICT),  # a number or {weight bits: number}: checked by _check_per_bit_width
                 "act_clip_lr": _num(0, hint="a finite number >= 0 (0: clip ratios not tuned)"),
                 "norm_lr": _num(0, hint="a finite number >= 0 (0: norms not tuned)")},
    "fuse": {"save_model": BOOL_FIELD, "format": _str(choices=MODEL_FORMATS)},
    "gptq": {"damp": _num(0, 1, hi_open=True), "block_size": _int(1), "act_order": BOOL_FIELD, "clip": BOOL_FIELD,
             "fp_target": _num(0, 1, hint="a number in [0, 1]: 0 = GPTQ, 1 = GPTAQ")},
    "eval": {
        "datasets": Field(LIST), "seq_len": _int(2, hint="an integer >= 2 (a window predicts its next tokens)"),
        "max_windows": _int(1, null=True, hint="a positive integer, or null for the whole text"),
        "batch_size": _int(1), "tasks": Field(LIST), "limit": _num(0, lo_open=True, null=True,
                                                                   hint="null, a positive count or a fraction in (0, 1)"),
    },
    "logger": {"kind": _str(choices=("none", "wandb")), "project": _str(null=True),
               "mode": _str(null=True, choices=("online", "offline", "disabled", None))},
    "pipeline": {
        "stages": Field(LIST), "force": Field(LIST, null=True), "cache_dir": _str(), "device": _str(),
        "batch_size": _int(1), "plan_only": BOOL_FIELD, "progress": BOOL_FIELD, "memory_check": BOOL_FIELD,
        "device_memory_gb": _num(0, lo_open=True, null=True, hint="a number of GB > 0, or null for the device's own"),
        "host_memory_gb": _num(0, lo_open=True, null=True, hint="a number of GB > 0, or null for what the host has available"),
        "ranks": _int(1, null=True, hint="a positive integer, or null for torchrun's number of ranks (1 without it)"),
    },
}
FREE = {"hydra"}
# Assembly merges as many pairs as disassembly added, among the channels that were not split: k split channels and n
# extra copies (k <= n) leave C - k ordinary channels, so n <= (C - n) / 2 always has enough pairs: n <= C / 3.
MAX_ASSEMBLED_RATIO = 0.3  # sections the schema does not own


def validate_schema(cfg: dict) -> None:
    """Types, ranges and unknown keys of the whole configuration; one PipelineError for the first problem."""
    for section, value in cfg.items():
        if section in FREE:
            continue
        if section not in SCHEMA:
            raise PipelineError(f"unknown config section {section!r}; the sections are {sorted(SCHEMA)}")
        fields = SCHEMA[section]
        if not isinstance(value, dict):
            raise PipelineError(f"{section} must be a mapping of settings, got {value!r}")
        for key, item in value.items():
            if key not in fields:
                raise PipelineError(f"unknown key {section}.{key}; {section} has {sorted(fields)}")
            field = fields[key]
            if (section, key) in PER_BIT_WIDTH:
                _check_per_bit_width(f"{section}.{key}", item, *PER_BIT_WIDTH[section, key])
            elif field.kind == DICT and item is not None and not isinstance(item, dict) and section != "search_theta":
                raise PipelineError(f"{section}.{key}={item!r} must be a mapping")
            if field.kind != DICT:
                field.check(f"{section}.{key}", item)
    validate_combinations(cfg)


CLIP_RATIO = _num(0, 1, lo_open=True, hint="in (0, 1]; 1.0 means no clipping")
# Settings a recipe may give per bit width, {bits: value}: the field each value is checked against, whose bits key
# it, and an example map for the error message.
PER_BIT_WIDTH = {
    ("quant", "a_clip_ratio"): (CLIP_RATIO, "activation", "{4: 0.85}"),
    ("tune_e2e", "scale_lr"): (_num(0, hint="a finite number >= 0 (0: scales not tuned)"), "weight", "{4: 0.004}"),
}


def _check_per_bit_width(key: str, value: Any, field: Field, which: str, example: str) -> None:
    """One value, or {bit width: value} (a recipe's choice per bit width)."""
    if not isinstance(value, dict):
        field.check(key, value)
        return
    for bits, item in value.items():
        if isinstance(bits, bool) or not str(bits).isdigit():
            raise PipelineError(f"{key} has the key {bits!r}; its keys are {which} bit widths, e.g. {example}")
        field.check(f"{key}.{bits}", item)


def validate_combinations(cfg: dict) -> None:
    """Settings that are fine alone and wrong together."""
    quant, reassemble = cfg["quant"], cfg.get("reassemble", {})
    stages = cfg["pipeline"]["stages"]
    if quant.get("group_size") and "reassemble" in stages and reassemble.get("enabled", True) \
            and not reassemble.get("assemble", True) and quant.get("abits") is not None:
        raise PipelineError(
            f"quant.group_size={quant['group_size']} needs reassemble.assemble=true: disassembly alone adds channels, "
            "so the input width changes and no group size divides it; set reassemble.assemble=true or quant.group_size=null"
        )
    ratio = cfg["search_theta"].get("channel_ratio")
    if "search_theta" in stages and reassemble.get("assemble", True) and ratio is not None and ratio > MAX_ASSEMBLED_RATIO:
        raise PipelineError(
            f"search_theta.channel_ratio={ratio} is too large for channel assembly: merging that many pairs needs more "
            f"ordinary channels than remain; use at most {MAX_ASSEMBLED_RATIO} (QLLM: 0.2), or reassemble.assemble=false"
        )
    data = cfg["data"]
    if data.get("name") == "text_files":
        for key in ("calib_path", "eval_path"):
            path = data.get(key)
            if not path or not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise PipelineError(f"data.{key}={path} is not a readable file; point it at a UTF-8 text file")
            if os.path.getsize(path) == 0:
                purpose = "calibrate on" if key == "calib_path" else "evaluate on"
                raise PipelineError(f"data.{key}={path} is empty; it must hold the text to {purpose}")
    known = {*CORPORA, HELDOUT}
    for name in cfg["eval"]["datasets"]:
        if name not in known:
            raise PipelineError(f"unknown eval.datasets entry {name!r}; choose from {sorted(known)}")
        if name == "text_files" and data.get("name") != "text_files":
            raise PipelineError("eval.datasets has text_files but data is not text_files; set data=text_files with "
                                "data.calib_path and data.eval_path")
    if not cfg["eval"]["datasets"] and not cfg["eval"]["tasks"]:
        raise PipelineError("eval.datasets and eval.tasks are both empty: nothing to evaluate; list a dataset, "
                            "e.g. eval.datasets=[wiki_sample]")
    limit = cfg["eval"].get("limit")
    if isinstance(limit, float) and limit >= 1 and not limit.is_integer():
        raise PipelineError(f"eval.limit={limit!r} must be null, a positive count or a fraction in (0, 1)")
