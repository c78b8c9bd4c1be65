"""The stage runner: computes cache keys, skips what is cached, and walks the decoder blocks in order.

Stages come in three kinds:
- `calibrate` and the optional `rotate` run once, before the blocks; `rotate` swaps the model for a rotated copy,
  and its key starts the block chain;
- block stages (collect_activations → smooth → search_theta → reassemble → train_lowrank → fuse) run for every
  decoder block in turn; a block stage may have an `apply` hook that changes the block the later stages see
  (smooth does); block i's inputs are the outputs of the already-quantized blocks < i, so the key of block i's
  first stage includes the key of block i-1's fused artifact;
- `evaluate` runs once, after the blocks.
Each block stage stores one artifact per block, so a killed run resumes at the first block it had not finished.
The quantized stream is always advanced with the block rebuilt from its stored artifact, so a resumed run
computes exactly what an uninterrupted one does.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import BlockRunner, decoder_layers
from .cache import Artifact, ArtifactCache, artifact_key
from .errors import PipelineError
from .fused import build_fused_block
from .memory import PeakRSS
from .quantizer import QuantSpec

log = logging.getLogger(__name__)

STAGE_ORDER = (
    "calibrate", "rotate", "collect_activations", "smooth", "search_theta", "reassemble", "train_lowrank", "fuse", "evaluate",
)
BLOCK_STAGES = ("collect_activations", "smooth", "search_theta", "reassemble", "train_lowrank", "fuse")


@dataclass(frozen=True)
class StageSpec:
    """What a stage depends on: the config keys (dotted paths) and the upstream stages whose artifacts it reads."""

    name: str
    version: int
    config_keys: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    per_block: bool = False
    implemented: bool = True


def select(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def config_slice(cfg: dict, spec: StageSpec) -> dict:
    return {key: select(cfg, key) for key in spec.config_keys}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class StageRecord:
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    peak_device_mib: float = 0.0

    def status(self) -> str:
        if self.computed == 0 and self.cached == 0:
            return "disabled"
        if self.computed == 0:
            return "cache hit"
        return "computed" if self.cached == 0 else f"resumed ({self.cached} cached, {self.computed} computed)"


@dataclass
class RunContext:
    """Everything stages share for one run. Stages read config through `cfg` (a plain dict)."""

    cfg: dict
    model: nn.Module  # the model the blocks are quantized from (a rotated copy when the rotate stage runs)
    tokenizer: Any
    cache: ArtifactCache
    run_dir: Path
    device: torch.device
    weight_spec: QuantSpec
    act_spec: QuantSpec
    tracker: Any
    progress: bool = True
    block_runner: BlockRunner | None = None
    keys: dict[str, str] = field(default_factory=dict)
    fp_model: nn.Module | None = None  # the model as loaded: the FP and RTN reference rows are computed on it

    def __post_init__(self):
        if self.fp_model is None:
            self.fp_model = self.model


class BlockState:
    """One decoder block during the walk: its FP module and the two input streams, targets computed on demand."""

    def __init__(self, index: int, ctx: RunContext, x_q: torch.Tensor, x_fp: torch.Tensor):
        self.index = index
        self.ctx = ctx
        self.fp_block = decoder_layers(ctx.model)[index]
        self.x_q = x_q  # inputs from the already-quantized blocks < index (what the quantized block will see)
        self.x_fp = x_fp  # inputs from the full-precision blocks < index (None when no stage needs targets)
        self._targets: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        """The FP block's output on the FP stream: the training target and the next block's FP input."""
        if self._targets is None:
            if self.x_fp is None:
                raise RuntimeError("FP targets were not tracked in this run (only train_lowrank needs them)")
            block = self.fp_block.to(self.ctx.device)
            self._targets = self.ctx.block_runner.run_batched(block, self.x_fp, self.ctx.cfg["pipeline"]["batch_size"])
            self.fp_block.to("cpu")
        return self._targets


def validate_config(cfg: dict, stages: dict[str, Any]) -> None:
    """Check the stage selection and every stage's own settings before anything heavy runs."""
    pipeline = cfg["pipeline"]
    selected = list(pipeline["stages"])
    for name in [*selected, *(pipeline.get("force") or [])]:
        if name not in STAGE_ORDER:
            raise PipelineError(f"unknown stage '{name}' in pipeline.stages/pipeline.force; stages are {list(STAGE_ORDER)}")
    if "fuse" not in selected or "calibrate" not in selected:
        raise PipelineError("pipeline.stages must include calibrate and fuse (they produce the quantized model); add them")
    for name in selected:
        for dep in stages[name].SPEC.upstream:
            if dep not in selected:
                raise PipelineError(f"stage {name} needs stage {dep}; add {dep} to pipeline.stages or remove {name}")
        validate = getattr(stages[name], "validate", None)
        if validate is not None:
            validate(cfg)


class Runner:
    def __init__(self, ctx: RunContext, stages: dict[str, Any]):
        self.ctx = ctx
        self.stages = stages
        self.records = {name: StageRecord() for name in STAGE_ORDER}
        self.artifacts: dict[str, list[Artifact | None]] = {}
        validate_config(ctx.cfg, stages)
        self.selected = list(ctx.cfg["pipeline"]["stages"])
        self.force = set(ctx.cfg["pipeline"].get("force") or [])

    # -- helpers -----------------------------------------------------------------------------------------------
    def enabled(self, name: str) -> bool:
        stage = self.stages[name]
        return name in self.selected and stage.SPEC.implemented and stage.is_enabled(self.ctx.cfg)

    def key(self, name: str, upstream: dict[str, str], extra: Any = None) -> str:
        spec = self.stages[name].SPEC
        cfg_part = config_slice(self.ctx.cfg, spec) if self.enabled(name) else "disabled"
        return artifact_key(name, spec.version, cfg_part, upstream, extra)

    def _forced_from(self) -> int:
        forced = [STAGE_ORDER.index(n) for n in self.force]
        return min(forced) if forced else len(STAGE_ORDER)

    def is_forced(self, name: str) -> bool:
        # Forcing a stage recomputes it and everything downstream of it.
        return STAGE_ORDER.index(name) >= self._forced_from()

    def _measure(self, name: str, fn, *args):
        if self.ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.ctx.device)
        start = time.perf_counter()
        with PeakRSS() as peak:
            result = fn(*args)
        rec = self.records[name]
        rec.seconds += time.perf_counter() - start
        rec.peak_rss_mib = max(rec.peak_rss_mib, peak.mib)
        if self.ctx.device.type == "cuda":
            rec.peak_device_mib = max(rec.peak_device_mib, torch.cuda.max_memory_allocated(self.ctx.device) / 2**20)
        return result

    def _produce(self, name: str, key: str, compute) -> Artifact:
        """Return the cached artifact for `key`, or compute it into an atomic writer."""
        cache = self.ctx.cache
        if self.is_forced(name):
            cache.remove(name, key)
        found = cache.get(name, key)
        if found is not None:
            self.records[name].cached += 1
            return found
        writer = cache.writer(name, key)
        try:
            self._measure(name, compute, writer)
            path = writer.commit()
        except BaseException:
            writer.abort()
            raise
        self.records[name].computed += 1
        return Artifact(path)

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        ctx = self.ctx
        ctx.cache.clean_partial()
        calibrate = self.stages["calibrate"]
        calib_key = self.key("calibrate", {})
        ctx.keys["calibrate"] = calib_key
        calib = self._produce("calibrate", calib_key, lambda w: calibrate.run(ctx, w))
        self._report("calibrate", calib_key)
        windows = calib.tensors("windows.safetensors")["input_ids"]
        chain_key = calib_key
        if self.enabled("rotate"):
            rotate = self.stages["rotate"]
            chain_key = ctx.keys["rotate"] = self.key("rotate", {"calibrate": calib_key})
            rotation = self._produce("rotate", chain_key, lambda w: rotate.run(ctx, w))
            self._measure("rotate", rotate.apply, ctx, rotation)
            self._report("rotate", chain_key)
        ctx.block_runner = BlockRunner(ctx.model, windows.shape[1], ctx.device, next(ctx.model.parameters()).dtype)

        final_key, artifacts = self.walk_blocks(calib_key, windows, chain_key)
        self.artifacts = artifacts
        ctx.keys["fuse"] = final_key
        for name in BLOCK_STAGES:
            self._report(name, "per block")
            finalize = getattr(self.stages[name], "finalize", None)
            if finalize is not None and self.enabled(name):
                self._measure(name, finalize, ctx, self, artifacts)
        results: dict[str, Any] = {}
        if self.enabled("evaluate"):
            results = self._measure("evaluate", self.stages["evaluate"].run, ctx, self, artifacts)
            self._report("evaluate", "per variant")
        return results

    def walk_blocks(self, calib_key: str, windows: torch.Tensor, chain_key: str):
        """Run the block stages block by block; returns the last fused key and every block's artifacts by stage.

        chain_key: the key block 0's chain starts from (calibrate's, or rotate's when the model was rotated).
        """
        ctx = self.ctx
        layers = decoder_layers(ctx.model)
        prev_key = chain_key
        per_stage: dict[str, list[Artifact | None]] = {n: [] for n in BLOCK_STAGES}
        fused = per_stage["fuse"]
        pending: list[int] = []  # cached blocks the streams have not been advanced through yet
        streams: tuple[torch.Tensor, torch.Tensor] | None = None
        enabled = [n for n in BLOCK_STAGES if self.enabled(n)]
        bar = tqdm(range(len(layers)), desc="blocks", disable=not ctx.progress)
        for i in bar:
            keys, upstream = {}, {"calibrate": calib_key, "previous_block": prev_key}
            for name in BLOCK_STAGES:
                keys[name] = self.key(name, upstream, extra={"block": i})
                upstream = {name: keys[name]}
            todo = [n for n in enabled if self.is_forced(n) or ctx.cache.get(n, keys[n]) is None]
            if not todo:
                for n in BLOCK_STAGES:
                    per_stage[n].append(ctx.cache.get(n, keys[n]) if n in enabled else None)
                    self.records[n].cached += n in enabled
                pending.append(i)
                prev_key = keys["fuse"]
                continue
            streams = self._replay(streams, pending, fused, windows)
            pending = []
            state = BlockState(i, ctx, *streams)
            artifacts: dict[str, Artifact | None] = {n: None for n in BLOCK_STAGES}
            for name in enabled:
                stage = self.stages[name]
                bar.set_postfix_str(f"{name}")
                artifacts[name] = self._produce(name, keys[name], lambda w, s=stage: s.run(ctx, state, artifacts, w))
                apply = getattr(stage, "apply", None)
                if apply is not None:  # e.g. smooth: later stages see the smoothed block
                    apply(ctx, state, artifacts[name])
            for n in BLOCK_STAGES:
                per_stage[n].append(artifacts[n])
            streams = (self._advance(i, streams[0], artifacts["fuse"]), state.targets if self.needs_fp_stream() else None)
            prev_key = keys["fuse"]
        return prev_key, per_stage

    def needs_fp_stream(self) -> bool:
        """Only LRC trains against FP targets; without it the FP stream is not computed (it costs a block forward)."""
        return self.enabled("train_lowrank")

    def _advance(self, i: int, x_q: torch.Tensor, fused: Artifact) -> torch.Tensor:
        """Quantized stream through block i, rebuilt from its stored artifact (the same path a resumed run takes)."""
        ctx = self.ctx
        block = build_fused_block(decoder_layers(ctx.model)[i], fused.tensors("block.safetensors"), ctx.act_spec, ctx.weight_spec)
        out = ctx.block_runner.run_batched(block.to(ctx.device), x_q, ctx.cfg["pipeline"]["batch_size"])
        del block
        return out

    def _replay(self, streams, pending: list[int], fused: list[Artifact], windows: torch.Tensor):
        """Bring both streams up to the first block that must be computed, through cached blocks."""
        ctx = self.ctx
        if streams is None:
            with torch.no_grad():
                emb = ctx.model.get_input_embeddings()(windows)
            streams = (emb, emb.clone() if self.needs_fp_stream() else None)
        if pending:
            log.info("replaying %d cached block(s) to rebuild the block inputs", len(pending))
        x_q, x_fp = streams
        for i in tqdm(pending, desc="replay cached blocks", disable=not ctx.progress or not pending, leave=False):
            if self.needs_fp_stream():
                x_fp = BlockState(i, ctx, x_q, x_fp).targets
            x_q = self._advance(i, x_q, fused[i])
        return x_q, x_fp

    def _report(self, name: str, key: str) -> None:
        rec = self.records[name]
        if name in BLOCK_STAGES:
            if not self.enabled(name):
                log.info("stage %-20s disabled (%s)", name, self.stages[name].disabled_reason(self.ctx.cfg, self.selected))
            else:
                log.info("stage %-20s %d block(s) from cache, %d computed, %.1fs", name, rec.cached, rec.computed, rec.seconds)
        else:
            log.info("stage %-20s %s [%s] %.1fs", name, rec.status(), key, rec.seconds)

    def stage_table(self) -> list[dict]:
        rows = []
        for name in STAGE_ORDER:
            rec = self.records[name]
            rows.append(
                {
                    "stage": name,
                    "status": rec.status() if self.enabled(name) else "disabled",
                    "computed": rec.computed,
                    "cached": rec.cached,
                    "seconds": round(rec.seconds, 2),
                    "peak_rss_mib": round(rec.peak_rss_mib, 1),
                    "peak_device_mib": round(rec.peak_device_mib, 1),
                }
            )
        return rows
