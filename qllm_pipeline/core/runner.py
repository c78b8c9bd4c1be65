"""The stage runner: computes cache keys, skips what is cached, and walks the decoder blocks in order.

The stages and their order come from the registry (`stages.STAGES`, see qllm_pipeline.core.stage for the contract):
- once-stages (calibrate, then e.g. rotate) run before the blocks; each one's key chains to the previous, and the
  last one's key starts the block chain; `apply` may swap the model (rotate swaps in a rotated view);
- block stages (collect_activations → smooth → search_theta → reassemble → train_lowrank → fuse) run for every
  decoder block in turn; `apply` may change the block the later stages see (smooth does); block i's inputs are the
  outputs of the already-quantized blocks < i, so the key of block i's first stage includes the key of block i-1's
  fused artifact;
- final stages (evaluate) run once, after the blocks.
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

from qllm_pipeline.core.cache import Artifact, ArtifactCache, artifact_key
from qllm_pipeline.core.distributed import World
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.memory import PeakRSS, release_freed_memory
from qllm_pipeline.core.stage import BLOCK, FINAL, ONCE, Stage
from qllm_pipeline.quantized.blocks import BlockRunner, decoder_layers
from qllm_pipeline.quantized.fused import build_fused_block
from qllm_pipeline.quantized.qblock import load_reassemblies, make_quant_block
from qllm_pipeline.quantized.quantizer import ACTIVATION_QUANTIZER_VERSION, WEIGHT_GRID_VERSION, QuantSpec

log = logging.getLogger(__name__)

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
    model: nn.Module  # the model the blocks are quantized from (a rotated view when the rotate stage runs)
    tokenizer: Any
    cache: ArtifactCache
    run_dir: Path
    device: torch.device
    weight_spec: QuantSpec
    act_spec: QuantSpec
    tracker: Any
    attn_spec: QuantSpec | None = None  # attention inputs (Q, K after RoPE, V); None: full precision
    progress: bool = True
    block_runner: BlockRunner | None = None
    keys: dict[str, str] = field(default_factory=dict)
    fp_model: nn.Module | None = None  # the model as loaded: the FP and RTN reference rows are computed on it
    model_id: str = ""  # digest of the model's identity (weight files or hub commit, dtype): qllm_pipeline.core.identity
    memory_budget: dict | None = None  # device and host bytes the run may use, as checked before loading (qllm_pipeline.core.plan)
    checkpoint: dict | None = None  # the written model: format, path, bytes on disk, FP16 bytes (model_writer)
    world: World = field(default_factory=World)  # the torchrun job this process is a rank of (a world of one without)
    n_windows: int = 0  # calibration windows of the whole job (this rank's streams hold its shard of them)

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
        self.artifacts: dict[str, Artifact | None] = {}  # this block's artifacts of the stages run so far
        self._targets: torch.Tensor | None = None

    @property
    def fp_stream(self) -> tuple[nn.Module, torch.Tensor] | None:
        """(the FP block, its FP-stream inputs), for GPTQ matching the FP model's layers (gptq.fp_target); None once
        the targets were computed (they replace the FP inputs) or when no stage tracks the FP stream."""
        return None if self.x_fp is None else (self.fp_block, self.x_fp)

    def quant_block(self) -> nn.Module:
        """A quantized copy of the FP block, with its reassembly maps if the reassemble stage ran."""
        reassembled = self.artifacts.get("reassemble")
        maps = load_reassemblies(reassembled.tensors("reassembly.safetensors")) if reassembled is not None else None
        return make_quant_block(self.fp_block, self.ctx.weight_spec, self.ctx.act_spec, maps, self.ctx.attn_spec)

    @property
    def targets(self) -> torch.Tensor:
        """The FP block's output on the FP stream: the training target and the next block's FP input."""
        if self._targets is None:
            if self.x_fp is None:
                raise RuntimeError("FP targets were not tracked in this run (no selected stage declares needs_fp_targets)")
            block = self.fp_block.to(self.ctx.device)
            self._targets = self.ctx.block_runner.run_batched(block, self.x_fp, self.ctx.cfg["pipeline"]["batch_size"])
            self.fp_block.to("cpu")
            self.x_fp = None  # the FP stream moves on to the targets; host memory holds two streams, not three
        return self._targets


def validate_config(cfg: dict, stages: dict[str, Stage]) -> None:
    """Check the stage selection and every stage's own settings before anything heavy runs."""
    pipeline = cfg["pipeline"]
    selected = list(pipeline["stages"])
    for name in [*selected, *(pipeline.get("force") or [])]:
        if name not in stages:
            raise PipelineError(f"unknown stage '{name}' in pipeline.stages/pipeline.force; stages are {list(stages)}")
    if "fuse" not in selected or "calibrate" not in selected:
        raise PipelineError("pipeline.stages must include calibrate and fuse (they produce the quantized model); add them")
    for name in selected:
        for dep in stages[name].spec.upstream:
            if dep not in selected:
                raise PipelineError(f"stage {name} needs stage {dep}; add {dep} to pipeline.stages or remove {name}")
        stages[name].validate(cfg)


class Runner:
    def __init__(self, ctx: RunContext, stages: dict[str, Stage]):
        self.ctx = ctx
        self.stages = stages
        self.order = list(stages)
        self.block_stages = [n for n, s in stages.items() if s.spec.kind == BLOCK]
        self.records = {name: StageRecord() for name in self.order}
        self.artifacts: dict[str, list[Artifact | None]] = {}
        # Per block, fused tensors a stage after the blocks replaced (tune_e2e: scales, clip ratios, norms).
        self.block_overrides: list[dict[str, torch.Tensor]] | None = None
        validate_config(ctx.cfg, stages)
        self.selected = list(ctx.cfg["pipeline"]["stages"])
        self.force = set(ctx.cfg["pipeline"].get("force") or [])

    # -- helpers -----------------------------------------------------------------------------------------------
    def enabled(self, name: str) -> bool:
        return name in self.selected and self.stages[name].enabled(self.ctx.cfg)

    def enabled_of_kind(self, kind: str) -> list[str]:
        return [n for n in self.order if self.stages[n].spec.kind == kind and self.enabled(n)]

    def key(self, name: str, upstream: dict[str, str], extra: Any = None) -> str:
        stage = self.stages[name]
        cfg_part = stage.key_config(self.ctx.cfg) if self.enabled(name) else "disabled"
        if stage.spec.kind != ONCE:
            # block and final stages run quantized forwards on the device: CPU and CUDA numbers differ, and so do
            # those of another activation quantizer
            extra = {"device": self.ctx.device.type, "act_quantizer": ACTIVATION_QUANTIZER_VERSION,
                     "weight_grid": WEIGHT_GRID_VERSION, **(extra or {})}
        return artifact_key(name, stage.spec.version, cfg_part, upstream, extra)

    def _forced_from(self) -> int:
        forced = [self.order.index(n) for n in self.force]
        return min(forced) if forced else len(self.order)

    def is_forced(self, name: str) -> bool:
        # Forcing a stage recomputes it and everything downstream of it.
        return self.order.index(name) >= self._forced_from()

    def labels(self) -> list[str]:
        """The method parts this run applies, in pipeline order (e.g. ["rotation", "cra", "lrc"])."""
        return [s.spec.label for n, s in self.stages.items() if s.spec.label and self.enabled(n)]

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

    def produce(self, name: str, key: str, compute, timed: bool = True, collective: bool = True) -> Artifact:
        """Return the cached artifact for `key`, or compute it (under the key's lock, so parallel jobs compute it once).
        timed=False for a final stage's artifacts: the runner already times the stage's whole `run`; collective=False
        for a computation that reduces nothing over ranks (under torchrun, rank 0 alone runs it)."""
        measured = (lambda writer: self._measure(name, compute, writer)) if timed else compute
        artifact, computed = self.ctx.cache.produce(name, key, measured, force=self.is_forced(name), collective=collective)
        if computed:
            self.records[name].computed += 1
        else:
            self.records[name].cached += 1
        return artifact

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        ctx = self.ctx
        ctx.cache.clean_partial()
        once = self.enabled_of_kind(ONCE)
        if not once or once[0] != "calibrate":
            raise PipelineError("the first once-stage must be calibrate")
        upstream = {"model": ctx.model_id}
        for name in once:
            stage = self.stages[name]
            key = ctx.keys[name] = self.key(name, upstream)
            artifact = self.produce(name, key, lambda w, s=stage: s.run(ctx, w))
            self._measure(name, stage.apply, ctx, artifact)
            self._report(name, key)
            upstream = {"model": ctx.model_id, name: stage.content_key(ctx, artifact, key)}
        chain_key = artifact_key("once_stages", 1, None, upstream)  # the model and what the once-stages made of it
        calib_key = ctx.keys["calibration_windows"]  # blocks depend on the windows drawn, not on how they were named
        windows = ctx.cache.get("calibrate", ctx.keys["calibrate"]).tensors("windows.safetensors")["input_ids"]
        ctx.block_runner = BlockRunner(ctx.model, windows.shape[1], ctx.device, next(ctx.model.parameters()).dtype)
        ctx.n_windows = windows.shape[0]
        windows = windows[ctx.world.shard(ctx.n_windows, ctx.cfg["pipeline"]["batch_size"])]  # this rank's streams

        final_key, artifacts = self.walk_blocks(calib_key, windows, chain_key)
        self.artifacts = artifacts
        ctx.keys["fuse"] = ctx.keys["model"] = final_key  # "model": the final model's key (a later stage may change it)
        for name in self.block_stages:
            self._report(name, "per block")
            if self.enabled(name):
                self._measure(name, self.stages[name].finalize, ctx, self)
        results: dict[str, Any] = {}
        for name in self.enabled_of_kind(FINAL):
            results.update(self._measure(name, self.stages[name].run, ctx, self) or {})
            self._report(name, ctx.keys.get(name, "per variant"))
        return results

    def block_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Block i of the final quantized model: its fused tensors, with what a later stage changed applied."""
        tensors = self.artifacts["fuse"][i].tensors("block.safetensors")
        if self.block_overrides is not None:
            tensors.update(self.block_overrides[i])
        return tensors

    def walk_blocks(self, calib_key: str, windows: torch.Tensor, chain_key: str):
        """Run the block stages block by block; returns the last fused key and every block's artifacts by stage.

        chain_key: the key block 0's chain starts from (the last once-stage's: calibrate's, or rotate's).
        """
        ctx = self.ctx
        layers = decoder_layers(ctx.model)
        prev_key = chain_key
        per_stage: dict[str, list[Artifact | None]] = {n: [] for n in self.block_stages}
        fused = per_stage["fuse"]
        pending: list[int] = []  # cached blocks the streams have not been advanced through yet
        streams: tuple[torch.Tensor, torch.Tensor] | None = None
        enabled = self.enabled_of_kind(BLOCK)
        block_keys = ctx.keys["blocks"] = {}  # stage -> each block's key (recorded in results.json for tools)
        bar = tqdm(range(len(layers)), desc="blocks", disable=not ctx.progress)
        for i in bar:
            keys, upstream = {}, {"calibrate": calib_key, "previous_block": prev_key}
            for name in self.block_stages:
                keys[name] = self.key(name, upstream, extra={"block": i})
                upstream = {name: keys[name]}
                if name in enabled:
                    block_keys.setdefault(name, []).append(keys[name])
            todo = [n for n in enabled if self.is_forced(n) or ctx.cache.get(n, keys[n]) is None]
            todo = ctx.world.broadcast_object(todo)  # rank 0's view: every rank takes the same path
            if not todo:
                for n in self.block_stages:
                    per_stage[n].append(ctx.cache.get(n, keys[n]) if n in enabled else None)
                    self.records[n].cached += n in enabled
                pending.append(i)
                prev_key = keys["fuse"]
                continue
            streams = self._replay(streams, pending, fused, windows)
            pending = []
            state = BlockState(i, ctx, *streams)
            streams = None  # the block state holds the only references, so the FP stream is freed once its targets exist
            state.artifacts = {n: None for n in self.block_stages}
            for name in enabled:
                stage = self.stages[name]
                bar.set_postfix_str(f"{name}")
                artifact = self.produce(name, keys[name], lambda w, s=stage: s.run(ctx, state, w))
                state.artifacts[name] = artifact
                stage.apply(ctx, state, artifact)  # e.g. smooth: later stages see the smoothed block
            for n in self.block_stages:
                per_stage[n].append(state.artifacts[n])
            targets = state.targets if self.needs_fp_stream() else None
            streams = (self._advance(i, state.x_q, state.artifacts["fuse"]), targets)
            state = targets = None
            # Blocks, optimizers and hooks form reference cycles that only the cycle collector frees, and glibc keeps
            # freed heap pages: without this, host memory creeps up by a block's worth of garbage per block.
            release_freed_memory()
            prev_key = keys["fuse"]
        return prev_key, per_stage

    def needs_fp_stream(self) -> bool:
        """Whether a selected stage reads the FP stream (LRC's targets, GPTQ's fp_target); otherwise the FP stream
        costs a block forward for nothing."""
        return any(self.stages[n].needs_fp_stream(self.ctx.cfg) for n in self.enabled_of_kind(BLOCK))

    def _advance(self, i: int, x_q: torch.Tensor, fused: Artifact) -> torch.Tensor:
        """Quantized stream through block i, rebuilt from its stored artifact (the same path a resumed run takes)."""
        ctx = self.ctx
        block = build_fused_block(
            decoder_layers(ctx.model)[i], fused.tensors("block.safetensors"), ctx.act_spec, ctx.weight_spec, ctx.attn_spec
        )
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
        if name in self.block_stages:
            if not self.enabled(name):
                reason = "not in pipeline.stages" if name not in self.selected else self.stages[name].disabled_reason(self.ctx.cfg)
                log.info("stage %-20s disabled (%s)", name, reason)
            else:
                log.info("stage %-20s %d block(s) from cache, %d computed, %.1fs", name, rec.cached, rec.computed, rec.seconds)
        else:
            log.info("stage %-20s %s [%s] %.1fs", name, rec.status(), key, rec.seconds)

    def stage_table(self) -> list[dict]:
        rows = []
        for name in self.order:
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
