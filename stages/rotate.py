"""rotate (QuaRot / SpinQuant without learning): orthogonal rotations that leave the model unchanged in full precision
but spread activation outliers over all channels before the quantizers (see qllm_pipeline.methods.rotation). Runs once,
before the blocks. Each part is switchable:

* `rotate.residual` (R1): the residual stream by a seeded random Hadamard Q, folded into the weights;
* `rotate.value_heads` (R2): each attention head's values by a Hadamard, folded into v_proj and o_proj;
* `rotate.online_down` (R4): an online Hadamard on the down_proj input, applied at run time before the activation
  quantizer (its transpose folded into down_proj); costs ~25 % of down_proj's multiply-adds on SmolLM2;
* `rotate.online_o`: an online Hadamard on the o_proj input (the attention output) across heads; after R2, which
  rotates within each head, it mixes only the heads, so that both make one full Hadamard (QuaRot's construction,
  :func:`qllm_pipeline.methods.rotation.o_proj_block`; full width where the head count has no Hadamard order);
* `rotate.online_qk`: an online per-head Hadamard on Q and K before the attention-input quantizer (`quant.attn_bits`);
* `rotate.online_inputs`: an online full-width Hadamard on the inputs of the residual stream's readers (q/k/v and
  gate/up), its transpose folded into their weights: what R1 does to those inputs, exact for every family, where R1
  cannot fold (Gemma's norms on the attention and MLP outputs); it costs one hidden-size Hadamard per reader.

Stored: rotation.safetensors (Q, float32; the other parts are deterministic). `apply` swaps the run's model for a
rotated view (qllm_pipeline.methods.rotation.rotated_view: the skeleton rotated once, each block rotated when a stage asks for
it), so every later stage works in the rotated basis without a whole rotated copy in memory; the loaded model is kept
for the FP and RTN reference rows.
"""
from __future__ import annotations

import logging

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.stage import ONCE, OnceStage, StageSpec
from qllm_pipeline.methods.rotation import o_proj_block, random_hadamard, rotated_view
from qllm_pipeline.model.arch import family_of
from qllm_pipeline.quantized.hadamard import hadamard_factors

log = logging.getLogger(__name__)
PARTS = ("residual", "value_heads", "online_down", "online_o", "online_qk", "online_inputs")


class Rotate(OnceStage):
    spec = StageSpec("rotate", version=2, config_keys=("rotate",), upstream=("calibrate",), kind=ONCE, label="rotation")

    def key_config(self, cfg: dict) -> dict:
        part = super().key_config(cfg)
        if not part["rotate"]["online_inputs"]:  # off: the keys of runs made before it existed
            part["rotate"] = {k: v for k, v in part["rotate"].items() if k != "online_inputs"}
        return part

    def content_key(self, ctx, artifact, key: str) -> str:
        # What later stages see also depends on the o_proj transform's form; full width keeps the key as it was
        # (runs made before the form existed), the cross-head form has its own, so no stale block is ever reused.
        rot = ctx.cfg["rotate"]
        block = o_proj_block(ctx.fp_model.config, rot["value_heads"]) if rot["online_o"] else 1
        return key if block == 1 else f"{key}+o_proj_block{block}"

    def validate(self, cfg: dict) -> None:
        rot = cfg["rotate"]  # each key's type: core/config.py (RotateConfig), checked before
        if not any(rot[p] for p in PARTS):
            raise PipelineError("rotate: every part is off (rotate.residual/value_heads/online_down/online_o/online_qk/"
                                "online_inputs); "
                                "turn one on or drop the rotate stage")

    def preflight(self, cfg: dict, model_config) -> None:
        rot = cfg["rotate"]
        family = family_of(model_config)
        if rot["residual"] and family.post_norms:
            raise PipelineError(
                f"rotate.residual=true is not exact for {family.model_type} models: the residual rotation cannot pass "
                f"through the norms on their attention and MLP outputs ({', '.join(family.post_norms)}); set "
                "rotate.residual=false (the per-head and online rotations stay exact; rotate.online_inputs=true rotates the "
                "inputs R1 would, online)")
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        o_width = model_config.num_attention_heads * head_dim // o_proj_block(model_config, rot["value_heads"])
        sizes = {"online_down": model_config.intermediate_size, "online_o": o_width,
                 "online_inputs": model_config.hidden_size,
                 "value_heads": head_dim, "online_qk": head_dim}
        for part, size in sizes.items():
            if rot.get(part) and hadamard_factors(size) is None:
                raise PipelineError(
                    f"rotate.{part}=true needs a Hadamard matrix of order {size}, which is not built here "
                    f"(orders 2^k·m with m = 1 or a Paley order); set rotate.{part}=false"
                )

    def run(self, ctx, writer) -> None:
        hidden, seed = ctx.fp_model.config.hidden_size, int(ctx.cfg["rotate"]["seed"])
        q = random_hadamard(hidden, seed)
        writer.save_tensors("rotation.safetensors", {"Q": q.float().contiguous()})
        writer.save_json("meta.json", {"hidden_size": hidden, "seed": seed})

    def apply(self, ctx, artifact) -> None:
        rot = ctx.cfg["rotate"]
        family = family_of(ctx.fp_model)
        readers = tuple(path for point in family.points if point.norm is not None for path in point.linears)
        online = tuple(path for part, paths in (("online_down", (family.point("down").linears[0],)),
                                                ("online_o", (family.attention_output,)),
                                                ("online_inputs", readers)) if rot.get(part, False) for path in paths)
        blocks = {family.attention_output: o_proj_block(ctx.fp_model.config, rot["value_heads"])}
        ctx.model = rotated_view(ctx.fp_model, artifact.tensors("rotation.safetensors")["Q"] if rot["residual"] else None,
                                 value_heads=rot["value_heads"], online=online, online_qk=rot["online_qk"],
                                 blocks=blocks)
        log.info("rotated: %s", ", ".join(p for p in PARTS if rot.get(p)))
