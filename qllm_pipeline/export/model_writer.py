"""The final quantized model, written once per final key as a cached artifact (`fuse.format`: compressed-tensors
through export_ct, or our packed layout through export) and linked into the run directory as `quantized_model`.
Written by fuse after the last block, or by tune_e2e when the blocks change once more."""
from __future__ import annotations

import logging

from qllm_pipeline.core.cache import artifact_key
from qllm_pipeline.export.export_ct import EXPORT_DTYPES, runtime_parts, save_compressed_tensors_model
from qllm_pipeline.export.export_ct import FORMAT_NAME as CT_FORMAT
from qllm_pipeline.export.packed import save_quantized_model
from qllm_pipeline.model.arch import family_of, final_norm
from qllm_pipeline.model.streaming import is_streamed

log = logging.getLogger(__name__)


def model_format(cfg: dict) -> str:
    return cfg["fuse"]["format"]


def head_rotation(ctx) -> dict | None:
    """The residual rotation Q and the final norm's scale g folded into lm_head, when the loaded model ties its head
    to its embeddings (the rotation unties them): the export then lets the modeling code rebuild the head."""
    if ("rotate" not in ctx.cfg["pipeline"]["stages"] or not ctx.cfg["rotate"]["residual"]
            or not getattr(ctx.fp_model.config, "tie_word_embeddings", False)):
        return None
    family = family_of(ctx.fp_model)
    rotation = ctx.cache.get("rotate", ctx.keys["rotate"]).tensors("rotation.safetensors")["Q"]
    return {"rotation": rotation,
            "norm": final_norm(ctx.fp_model).weight.detach().float().cpu() + family.norm_offset}


def write_model(ctx, runner) -> None:
    """Write the whole final quantized model once per final key (cached like any artifact)."""
    if not ctx.cfg["fuse"]["save_model"]:
        return
    fmt = model_format(ctx.cfg)
    export_dtype = ctx.cfg["fuse"]["export_dtype"] if fmt == CT_FORMAT else None  # qllm-packed writes float32
    # version 2: 8-bit symmetric weights are written int-quantized (were pack-quantized); 3: asymmetric weights below
    # 8 bits are packed (rows as blocks; were int-quantized); 4: a rotated tied head is rebuilt on load (not written);
    # 5: the shipped modeling file rebuilds it a slice at a time
    settings = {"format": fmt, **({"export_dtype": export_dtype} if export_dtype else {})}
    key = artifact_key("model", 5, settings, {"fuse": ctx.keys["model"]})

    def write(writer):
        # Read one block at a time; a streamed model is written one shard per block, so the export never holds it whole.
        blocks = (runner.block_tensors(i) for i in range(len(runner.artifacts["fuse"])))
        sharded = is_streamed(ctx.fp_model)  # the model as loaded (a rotated view of an in-memory one is not streamed)
        if fmt == CT_FORMAT:
            parts = runtime_parts(ctx.cfg)
            if parts:
                log.info("the checkpoint ships modeling_qllm.py (load it with trust_remote_code=True) for: %s",
                         "; ".join(parts))
            sizes = save_compressed_tensors_model(ctx.model, ctx.tokenizer, blocks, ctx.cfg["quant"], writer.tmp,
                                                  runtime=bool(parts), sharded=sharded, dtype=EXPORT_DTYPES[export_dtype],
                                                  head_from_embeddings=head_rotation(ctx))
        else:
            sizes = save_quantized_model(ctx.model, ctx.tokenizer, blocks, ctx.cfg["quant"], writer.tmp, sharded=sharded)
        writer.save_json("sizes.json", sizes)

    model_dir, _ = ctx.cache.produce("model", key, write, collective=False)  # under torchrun: rank 0 alone writes it
    link = ctx.run_dir / "quantized_model"
    if link.is_symlink():  # a re-used run directory: point at this run's model
        link.unlink()
    if not link.exists():
        link.symlink_to(model_dir.path, target_is_directory=True)
    sizes = model_dir.json("sizes.json")
    ctx.checkpoint = {"format": fmt, **({"dtype": export_dtype} if export_dtype else {}), "path": str(model_dir.path), "checkpoint_bytes": sizes["file_bytes"],
                      "fp16_bytes": sizes["fp16_bytes"]}
    log.info("quantized model (%s): %s (%.1f MB; the same model in FP16: %.1f MB)", fmt, model_dir.path, sizes["file_bytes"] / 1e6,
             sizes["fp16_bytes"] / 1e6)
