"""calibrate: tokenize the calibration corpus and sample N seeded windows of L tokens."""
from __future__ import annotations

import logging

from qllm_pipeline.data import calibration_windows, load_corpus, tokenize
from qllm_pipeline.errors import PipelineError
from qllm_pipeline.stage import ONCE, OnceStage, StageSpec

log = logging.getLogger(__name__)



class Calibrate(OnceStage):
    spec = StageSpec(
        "calibrate", version=1, config_keys=("model.name", "model.hub_id", "model.path", "model.gguf_file", "data", "calibrate"),
        kind=ONCE,
    )

    def run(self, ctx, writer) -> None:
        cfg = ctx.cfg["calibrate"]
        max_len = getattr(ctx.model.config, "max_position_embeddings", None)
        if max_len and cfg["seq_len"] > max_len:
            raise PipelineError(f"calibrate.seq_len={cfg['seq_len']} exceeds the model's context of {max_len} tokens; lower it")
        corpus = load_corpus(ctx.cfg["data"]["name"], ctx.cfg["data"])
        tokens = tokenize(ctx.tokenizer, corpus.calib_text)
        windows = calibration_windows(tokens, cfg["n_samples"], cfg["seq_len"], cfg["seed"])
        log.info("calibration: %d windows × %d tokens from %s (%d tokens available)", *windows.shape, corpus.name, tokens.numel())
        writer.save_tensors("windows.safetensors", {"input_ids": windows})
        writer.save_json("meta.json", {"corpus": corpus.name, "source": corpus.source, "available_tokens": tokens.numel()})
