"""rotate (optional baseline, QuaRot-style): rotate the residual stream by a seeded random Hadamard Q, folded into
the weights (exact in full precision; see qllm_pipeline.rotation). Runs once, before the blocks.

Stored: rotation.safetensors (Q, float32). `apply` swaps the run's model for a rotated copy, so every later stage
(collect-activations, search-theta, LRC, fuse, evaluate) works in the rotated basis. The loaded model is kept for
the FP and RTN reference rows. The copy doubles the CPU memory held for weights.
"""
from __future__ import annotations

import copy
import logging

from qllm_pipeline.errors import PipelineError
from qllm_pipeline.rotation import random_hadamard, rotate_model
from qllm_pipeline.runner import StageSpec

log = logging.getLogger(__name__)

SPEC = StageSpec("rotate", version=1, config_keys=("rotate",), upstream=("calibrate",))


def is_enabled(cfg) -> bool:
    return True


def disabled_reason(cfg, selected) -> str:
    return "not in pipeline.stages"


def validate(cfg: dict) -> None:
    if not isinstance(cfg["rotate"].get("seed"), int):
        raise PipelineError(f"rotate.seed={cfg['rotate'].get('seed')!r} must be an integer")


def run(ctx, writer) -> None:
    hidden, seed = ctx.fp_model.config.hidden_size, int(ctx.cfg["rotate"]["seed"])
    q = random_hadamard(hidden, seed)
    writer.save_tensors("rotation.safetensors", {"Q": q.float().contiguous()})
    writer.save_json("meta.json", {"hidden_size": hidden, "seed": seed})


def apply(ctx, artifact) -> None:
    q = artifact.tensors("rotation.safetensors")["Q"]
    model = copy.deepcopy(ctx.fp_model)
    rotate_model(model, q=q)
    ctx.model = model
    log.info("residual stream rotated by a %d×%d random Hadamard matrix", *q.shape)
