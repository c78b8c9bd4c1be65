"""calibrate: tokenize the calibration corpus and sample N seeded windows of L tokens."""
from __future__ import annotations

import logging

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.identity import tensor_digest, text_digest
from qllm_pipeline.core.stage import ONCE, OnceStage, StageSpec
from qllm_pipeline.data.corpora import load_corpus, token_cache_dir, tokenize
from qllm_pipeline.data.windows import calibration_windows, start_with, window_bos

log = logging.getLogger(__name__)



class Calibrate(OnceStage):
    # Keyed by the calibration text's content and the windows' settings (the model, i.e. the tokenizer, comes in as
    # upstream); what later stages key on is the digest of the windows drawn (content_key).
    spec = StageSpec("calibrate", version=2, config_keys=("calibrate",), kind=ONCE)

    def key_config(self, cfg: dict) -> dict:
        corpus = load_corpus(cfg["data"]["name"], cfg["data"])
        return {**super().key_config(cfg), "calib_text": text_digest(corpus.calib_text)}

    def content_key(self, ctx, artifact, key: str) -> str:
        digest = tensor_digest(artifact.tensors("windows.safetensors")["input_ids"])
        ctx.keys["calibration_windows"] = digest
        return digest

    def run(self, ctx, writer) -> None:
        cfg = ctx.cfg["calibrate"]
        max_len = getattr(ctx.model.config, "max_position_embeddings", None)
        if max_len and cfg["seq_len"] > max_len:
            raise PipelineError(f"calibrate.seq_len={cfg['seq_len']} exceeds the model's context of {max_len} tokens; lower it")
        corpus = load_corpus(ctx.cfg["data"]["name"], ctx.cfg["data"])
        tokens = tokenize(ctx.tokenizer, corpus.calib_text, token_cache_dir())
        windows = start_with(calibration_windows(tokens, cfg["n_samples"], cfg["seq_len"], cfg["seed"]),
                             window_bos(ctx.model.config, ctx.tokenizer))
        log.info("calibration: %d windows × %d tokens from %s (%d tokens available)", *windows.shape, corpus.name, tokens.numel())
        writer.save_tensors("windows.safetensors", {"input_ids": windows})
        writer.save_json("meta.json", {"corpus": corpus.name, "source": corpus.source, "available_tokens": tokens.numel()})
