"""tune_e2e: after the blocks are fused, tune the whole quantized model's weight scales and activation clip ratios
(the integer codes fixed) so its next-token distribution matches the FP model's on the calibration windows
(qllm_pipeline.methods.e2e_tuning). Stored: the tuned scales, clip ratios and norms of every block, and the KL per epoch.
Evaluation and the written model use the tuned blocks; when no epoch lowered the KL, the fused model is kept as it
was.

Neither model is held whole (`tune_e2e.mode=streamed`, the default): the FP teacher is its final hidden states on the
calibration windows, an artifact of its own computed block by block (`e2e_teacher`), and the student runs one block
on the device at a time (qllm_pipeline.methods.e2e_streaming). Whether the fused blocks stay in host memory between passes
and whether a batch's block inputs are spilled to disk follow from the memory plan and the host's budget. After
each epoch the state is saved (`tune_e2e_epoch`), so a killed run resumes at the last finished epoch.
"""
from __future__ import annotations

import logging

import torch

from qllm_pipeline.core.cache import artifact_key
from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.memory import release_freed_memory
from qllm_pipeline.core.plan import arch_from_config, e2e_execution, memory_budget
from qllm_pipeline.core.stage import FINAL, FinalStage, StageSpec
from qllm_pipeline.evaluation.perplexity import blockwise_hidden
from qllm_pipeline.export.model_writer import write_model
from qllm_pipeline.methods.e2e_streaming import EXECUTORS, FusedBlocks, InputStore
from qllm_pipeline.methods.e2e_tuning import Checkpoints, E2EConfig, Head, TunedParams, resolved_settings, tune
from qllm_pipeline.model.arch import decoder_layers, family_of, final_norm
from qllm_pipeline.quantized.fused import build_fused_block

log = logging.getLogger(__name__)

# What changes the tuned values. `mode` (streamed or whole) only changes where the arithmetic runs: it gives the
# same gradients (tests/test_tune_e2e.py), so both share one artifact.
# what the tuning computes from (its key); `mode` changes how (the same gradients), not what
TEACHER_VERSION = 1
EPOCH_STAGE = "tune_e2e_epoch"


class TuneE2E(FinalStage):
    spec = StageSpec("tune_e2e", version=3, config_keys=("tune_e2e",), upstream=("fuse",), kind=FINAL, label="e2e")

    def enabled(self, cfg) -> bool:
        return cfg["quant"].get("wbits") is not None or cfg["quant"].get("abits") is not None

    def disabled_reason(self, cfg) -> str:
        return "no quantization"

    def key_config(self, cfg: dict) -> dict:
        # The rate this bit width resolves to, not the map: adding a width to the map recomputes nothing.
        return {"tune_e2e": resolved_settings(cfg)}

    def validate(self, cfg: dict) -> None:
        e2e_config(cfg)

    def run(self, ctx, runner) -> None:
        key = runner.key("tune_e2e", {"model": ctx.keys["fuse"], "calibrate": ctx.keys["calibration_windows"]})
        artifact = runner.produce("tune_e2e", key, lambda writer: self._tune(ctx, runner, writer, key), timed=False)
        release_freed_memory()  # the blocks and graphs of the tuning: evaluation starts from a low RSS
        stats = artifact.json("stats.json")
        ctx.keys["tune_e2e"] = key  # recorded in results.json whether or not an epoch was kept
        if stats["best_epoch"] == 0:
            log.info("tune_e2e: no epoch lowered the KL to the FP model on the calibration windows (%.4f before, %s "
                     "after the epochs); the fused model is kept unchanged", stats["kl_before"],
                     ", ".join(f"{kl:.4f}" for kl in stats["kl_measured"]))
        else:
            log.info("tune_e2e: KL to the FP model on the calibration windows %.4f -> %.4f (epoch %d of %d kept)",
                     stats["kl_before"], stats["kl_after"], stats["best_epoch"], len(stats["kl_measured"]))
            tensors = artifact.tensors("tuned.safetensors")
            runner.block_overrides = [{} for _ in range(len(runner.artifacts["fuse"]))]
            for name, value in tensors.items():
                index, _, field = name.partition(".")
                runner.block_overrides[int(index)][field] = value
            ctx.keys["model"] = key  # evaluation rows and the written model are the tuned model's
        write_model(ctx, runner)

    def _tune(self, ctx, runner, writer, key: str) -> None:
        cfg = e2e_config(ctx.cfg)
        windows = ctx.cache.get("calibrate", ctx.keys["calibrate"]).tensors("windows.safetensors")["input_ids"]
        teacher = teacher_states(ctx, runner, windows)
        layers, n = decoder_layers(ctx.model), len(runner.artifacts["fuse"])
        params = TunedParams((runner.block_tensors(i) for i in range(n)), cfg, ctx.weight_spec, ctx.act_spec,
                             family_of(ctx.model))
        budget = ctx.memory_budget or memory_budget(ctx.cfg, ctx.device)
        layout = e2e_execution(ctx.cfg, arch_from_config(ctx.model.config), ctx.device.type, budget["host"])
        log.info("tune_e2e: %s, fused blocks %s, block inputs %s", cfg.mode,
                 "kept in host memory" if layout["keep_blocks"] else "rebuilt from their artifacts on each pass",
                 "spilled to disk" if layout["spill_inputs"] else "in host memory")
        blocks = FusedBlocks(lambda i: build_fused_block(layers[i], runner.block_tensors(i), ctx.act_spec,
                                                         ctx.weight_spec, ctx.attn_spec), n, keep=layout["keep_blocks"])
        student = Head(final_norm(ctx.model), ctx.model.get_output_embeddings())
        fp_head = Head(final_norm(ctx.fp_model), ctx.fp_model.get_output_embeddings())
        extra = {"inputs": InputStore(writer.path("spill") if layout["spill_inputs"] else None)} \
            if cfg.mode == "streamed" else {}
        student.to(ctx.device), fp_head.to(ctx.device)
        executor = None
        try:
            executor = EXECUTORS[cfg.mode](blocks, params, ctx.block_runner, ctx.model.get_input_embeddings(), student,
                                           fp_head, ctx.device, **extra)
            checkpoints = EpochCheckpoints(ctx.cache, key, fresh=runner.is_forced("tune_e2e"))
            stats = tune(executor, params, windows, teacher, cfg, ctx.progress, checkpoints)
        finally:
            if executor is not None:
                executor.close()
            elif "inputs" in extra:
                extra["inputs"].close()
            student.to("cpu"), fp_head.to("cpu")
        tensors = {} if stats["best_epoch"] == 0 else {
            f"{i}.{name}": value for i in range(n) for name, value in params.tuned_tensors(i, runner.block_tensors(i)).items()}
        writer.save_tensors("tuned.safetensors", tensors)
        writer.save_json("stats.json", {**stats, "mode": cfg.mode, **layout})
        ctx.tracker.log({"e2e/kl_before": stats["kl_before"], "e2e/kl_after": stats["kl_after"]})


def teacher_states(ctx, runner, windows: torch.Tensor) -> torch.Tensor:
    """The FP model's final hidden states (before its final norm) on the calibration windows, [n, seq, hidden]: what
    the quantized model is tuned toward, computed once block by block and cached by the model and the windows."""
    key = artifact_key("e2e_teacher", TEACHER_VERSION, None,
                       {"model": ctx.model_id, "calibrate": ctx.keys["calibration_windows"]},
                       extra={"device": ctx.device.type})
    fp_layers = decoder_layers(ctx.fp_model)

    def compute(writer):
        hidden = blockwise_hidden(ctx.fp_model, windows, {"fp": lambda i: fp_layers[i]}, ctx.device,
                                  ctx.cfg["pipeline"]["batch_size"], ctx.progress, desc="tune_e2e FP targets")["fp"]
        writer.save_tensors("final_hidden.safetensors", {"hidden": hidden})

    artifact, _ = ctx.cache.produce("e2e_teacher", key, compute, force=runner.is_forced("tune_e2e"))
    return artifact.tensors("final_hidden.safetensors")["hidden"]


class EpochCheckpoints(Checkpoints):
    """The tuning's state after each finished epoch (parameters, AdamW's moments, the schedule, the best state so
    far, the KLs), one artifact per tune_e2e key, replaced each epoch; a forced run starts over."""

    def __init__(self, cache, key: str, fresh: bool):
        self.cache, self.key, self.fresh = cache, key, fresh

    def load(self) -> dict | None:
        artifact = None if self.fresh else self.cache.get(EPOCH_STAGE, self.key)
        if artifact is None:
            return None
        state = torch.load(artifact.path / "state.pt", weights_only=True)
        log.info("tune_e2e: resuming after epoch %d (saved state)", state["stats"]["epochs_done"])
        return state

    def save(self, state: dict) -> None:
        self.cache.put(EPOCH_STAGE, self.key, lambda writer: torch.save(state, writer.path("state.pt")), replace=True)


def e2e_config(cfg: dict) -> E2EConfig:
    try:
        return E2EConfig(**resolved_settings(cfg), mode=cfg["tune_e2e"]["mode"])
    except (ValueError, TypeError) as exc:
        raise PipelineError(str(exc)) from exc
