"""The stage contract: what every pipeline stage declares (its spec) and the hooks the runner calls.

A stage is a small class with a `spec` and named hooks, one base class per kind of stage:

* `OnceStage` runs once before the blocks (calibrate, rotate): `run(ctx, writer)`, then `apply(ctx, artifact)`;
* `BlockStage` runs for every decoder block in turn (collect_activations … fuse): `run(ctx, state, writer)` with
  the block's earlier artifacts in `state.artifacts`, then `apply(ctx, state, artifact)`; `finalize(ctx, runner)`
  once after the last block;
* `FinalStage` runs once after the blocks (evaluate): `run(ctx, runner)`.

Every stage may also `validate(cfg)` (before any weight is read: raise PipelineError with a one-line message) and
`preflight(cfg, model_config)` (after the model's config is read, before its weights are: e.g. a memory plan).
The registry (`stages.STAGES`) is an ordered list of instances; the pipeline order is derived from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qllm_pipeline.quantized.quantizer import activation_clip_ratio

ONCE, BLOCK, FINAL = "once", "block", "final"


def select(cfg: dict, dotted: str) -> Any:
    """cfg["a"]["b"] for "a.b" (None where a part is missing)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _resolved(key: str, value: Any) -> Any:
    """A config value as it acts: a group without its `name` label; quant with the activation clip ratio its bit
    width resolves to (a per-bit-width map and the number it gives key the same artifacts)."""
    if not isinstance(value, dict):
        return value
    value = {k: v for k, v in value.items() if k != "name"}
    if key == "quant" and "a_clip_ratio" in value:
        value["a_clip_ratio"] = activation_clip_ratio(value)
    return value


@dataclass(frozen=True)
class StageSpec:
    """What a stage depends on and how it runs.

    config_keys: dotted config paths whose values go into the stage's cache key;
    upstream: stages whose artifacts it reads (they must be selected too);
    kind: ONCE, BLOCK or FINAL;
    needs_fp_targets: it reads the FP block's outputs (`state.targets`), so the runner tracks the FP stream;
    label: the name of the method part it adds, in result rows (e.g. "cra"); None for plumbing stages.
    """

    name: str
    version: int
    config_keys: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    kind: str = BLOCK
    needs_fp_targets: bool = False
    label: str | None = None

    @property
    def per_block(self) -> bool:
        return self.kind == BLOCK


class Stage:
    spec: ClassVar[StageSpec]

    @property
    def name(self) -> str:
        return self.spec.name

    def enabled(self, cfg: dict) -> bool:
        """Whether the stage does anything under `cfg` once selected (e.g. no activation bits: no reassembly)."""
        return True

    def disabled_reason(self, cfg: dict) -> str:
        return "disabled by config"

    def key_config(self, cfg: dict) -> dict:
        """The config values that go into this stage's cache key (its spec's keys; a stage may add resolved ones).
        Values as they act (`_resolved`): renaming a quant option must not recompute anything."""
        return {key: _resolved(key, select(cfg, key)) for key in self.spec.config_keys}

    def validate(self, cfg: dict) -> None:
        """Check the stage's own settings; raise PipelineError with a one-line message."""

    def needs_fp_stream(self, cfg: dict) -> bool:
        """Whether the runner must track the FP stream for this stage under `cfg` (its FP inputs or targets)."""
        return self.spec.needs_fp_targets

    def preflight(self, cfg: dict, model_config: Any) -> None:
        """Called with the model's config before its weights are read."""


class OnceStage(Stage):
    def run(self, ctx, writer) -> None:
        raise NotImplementedError

    def apply(self, ctx, artifact) -> None:
        """Use the (computed or cached) artifact, e.g. swap in a rotated model."""

    def content_key(self, ctx, artifact, key: str) -> str:
        """What later stages key on: by default this artifact's key; a stage whose output several configurations
        can share (calibrate: the token windows) returns a digest of the content instead."""
        return key


class BlockStage(Stage):
    def run(self, ctx, state, writer) -> None:
        raise NotImplementedError

    def apply(self, ctx, state, artifact) -> None:
        """Use this block's artifact before the later stages of the block run (e.g. smooth the block)."""

    def finalize(self, ctx, runner) -> None:
        """After the last block (e.g. write the whole model)."""


class FinalStage(Stage):
    def run(self, ctx, runner) -> Any:
        raise NotImplementedError


def registry(stages: list[Stage]) -> dict[str, Stage]:
    """{name: stage} in pipeline order; ONCE stages first, then BLOCK, then FINAL (checked, so the order is the list's)."""
    rank = {ONCE: 0, BLOCK: 1, FINAL: 2}
    kinds = [rank[s.spec.kind] for s in stages]
    if kinds != sorted(kinds):
        raise ValueError("stages must be listed once-stages first, then block stages, then final stages")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names in {names}")
    return {s.name: s for s in stages}
