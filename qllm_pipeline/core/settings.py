"""Declaring a setting once: its type (the dataclass annotation), its default and its range (`setting(...)`).

Every config group is a dataclass whose fields are declared with `setting`; Hydra's ConfigStore holds those
dataclasses as the groups' schemas (qllm_pipeline.core.config), the YAML files hold only what a recipe changes, and
the same dataclasses are the methods' own configs (e.g. methods.lowrank.LowRankConfig), which check themselves with
`check_settings`. One `Check` per field gives the one-line message a bad value gets, wherever it comes from.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from qllm_pipeline.core.errors import PipelineError

INT, FLOAT, BOOL, STR, LIST, DICT = "int", "number", "true or false", "a string", "a list", "a mapping"
_KINDS = {int: INT, float: FLOAT, bool: BOOL, str: STR, list: LIST, dict: DICT}


@dataclass(frozen=True)
class Check:
    """What a value of one setting must be."""

    kind: str  # one of INT, FLOAT, BOOL, STR, LIST, DICT (a mapping, or a value checked elsewhere)
    null: bool = False  # null allowed
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    lo_open: bool = False  # lower bound excluded
    hi_open: bool = False
    choices: tuple | None = None
    hint: str = ""  # what the key means, when the range alone does not say
    per_bit_width: str | None = None  # "weight" or "activation": one value, or {bit width: value}

    def check(self, key: str, value: Any) -> None:
        if self.per_bit_width and isinstance(value, dict):
            example = {"activation": "{4: 0.85}", "weight": "{4: 1}" if self.kind == INT else "{4: 0.004}"}
            example = example[self.per_bit_width]
            for bits, item in value.items():
                if isinstance(bits, bool) or not str(bits).isdigit():
                    raise PipelineError(f"{key} has the key {bits!r}; its keys are {self.per_bit_width} bit widths, "
                                        f"e.g. {example}")
                self.check(f"{key}.{bits}", item)
            return
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
        if self.kind == LIST and not isinstance(value, (list, tuple)):
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


def setting(default: Any = dataclasses.MISSING, *, lo=None, hi=None, lo_open=False, hi_open=False, choices=None,
            hint: str = "", per_bit_width: str | None = None, checked_elsewhere: bool = False, kind: str | None = None):
    """A dataclass field with its range. Mutable defaults (lists, maps) are copied per instance. The type, and
    whether null is allowed, come from the annotation, unless `kind` says how an `Any` value is checked (a number
    that Hydra must not convert, e.g. eval.limit's count); `per_bit_width` values are numbers, one or one per bit
    width; `checked_elsewhere` marks a value whose shape its stage checks (e.g. search_theta.theta)."""
    metadata = {"range": dict(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=tuple(choices) if choices else None,
                              hint=hint, per_bit_width=per_bit_width),
                "kind": FLOAT if per_bit_width and kind is None else kind, "checked_elsewhere": checked_elsewhere}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _kind(annotation) -> tuple[str, bool]:
    """(kind, null allowed) of a field's annotation: int, float, bool, str, list[...], dict[...], X | None, Any."""
    null = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        null = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(annotation)
    if annotation is Any:
        return DICT, True  # a value of several shapes: checked by its per_bit_width rule or by its stage
    return _KINDS[origin or annotation], null


def checks(cls) -> dict[str, Check]:
    """Each field of a settings dataclass -> its Check."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        kind, null = _kind(hints[f.name])
        if f.metadata.get("kind"):
            kind, null = f.metadata["kind"], null and not f.metadata.get("range", {}).get("per_bit_width")
        out[f.name] = Check(kind, null=null, **f.metadata.get("range", {}))
    return out


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def check_settings(obj, section: str) -> None:
    """Check a settings dataclass instance's values (a method's config made in code, not through Hydra)."""
    elsewhere = {f.name for f in dataclasses.fields(obj) if f.metadata.get("checked_elsewhere")}
    for name, rule in checks(type(obj)).items():
        if name not in elsewhere:
            rule.check(f"{section}.{name}", getattr(obj, name))
