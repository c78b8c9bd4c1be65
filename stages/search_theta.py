"""search-theta: per block and reassembly point, the θ that minimises the quantized sub-block's output MSE
(QLLM §3.2): a grid from the largest channel max downwards, capped at channel_ratio·C extra channels; `steps: null` is the
reference's grid size, max(100, max|x|/0.5) steps.
`search_theta.theta` fixes θ instead (a float for every point, or a {point: float} map).
Stored per block: theta.json (θ, extra channels, loss curve per point) and theta_curve.png.
"""
from __future__ import annotations

import logging

from qllm_pipeline.core.errors import PipelineError
from qllm_pipeline.core.stage import BlockStage, StageSpec
from qllm_pipeline.methods.reassembly_inputs import channel_max, score_tokens, search_inputs
from qllm_pipeline.methods.theta_search import search_theta, theta_grid
from qllm_pipeline.model.arch import block_family, family_of
from qllm_pipeline.quantized.reassembly import build_reassembly
from qllm_pipeline.quantized.subblock import POINTS, point_activations, point_loss_fn, point_weights

log = logging.getLogger(__name__)

class SearchTheta(BlockStage):
    # version 2: the loss sums squared errors in float64 (a data-parallel job's ranks add their shares)
    spec = StageSpec("search_theta", version=2, config_keys=("search_theta", "reassemble.assemble", "quant"),
                     upstream=("collect_activations",))

    def enabled(self, cfg) -> bool:
        return bool(cfg["search_theta"]["enabled"]) and cfg["quant"].get("abits") is not None

    def disabled_reason(self, cfg) -> str:
        return "disabled by config (search_theta.enabled=false or no activation quantization)"

    def validate(self, cfg: dict) -> None:
        """The points and a fixed θ's shape (the other keys' types and ranges: core/config.py, checked before)."""
        enabled_points(cfg)
        for point in POINTS:
            fixed_theta(cfg, point)

    def run(self, ctx, state, writer) -> None:
        cfg = ctx.cfg
        stats = channel_max(state.artifacts, family_of(ctx.model))
        inputs, block = search_inputs(ctx, state)
        assemble = bool(cfg["reassemble"]["assemble"])
        steps, ratio = cfg["search_theta"]["steps"], float(cfg["search_theta"]["channel_ratio"])
        spacing = cfg["search_theta"]["spacing"]
        results = {}
        try:
            for point in enabled_points(cfg):
                m, h = stats[block_family(block).stat_key(point)], inputs[point]
                loss_fn = point_loss_fn(block, point, h, ctx.block_runner, ctx.weight_spec, ctx.act_spec, ctx.attn_spec)
                weights, tokens = point_weights(block, point), score_tokens(point_activations(block, point, h))
                theta = fixed_theta(cfg, point)
                if theta is None:
                    result = search_theta(
                        m, tokens, weights, loss_fn, steps, ratio, assemble, progress=ctx.progress,
                        desc=f"θ {point} block {state.index}", spacing=spacing,
                    ).to_json()
                else:
                    requested = theta
                    # A fixed θ still obeys the channel budget: raise it to the smallest θ the budget allows.
                    grid = theta_grid(m, steps, ratio, spacing)
                    if grid and theta < grid[-1]:
                        theta = grid[-1]
                        log.warning("block %d %s: fixed θ=%g splits too many channels; using θ=%g (channel_ratio cap)",
                                    state.index, point, requested, theta)
                    r = build_reassembly(m, theta, tokens, weights, assemble)
                    result = {"theta": theta, "requested_theta": requested, "loss": loss_fn(r),
                              "n_extra": r.n_disassembled_extra, "curve": []}
                result["baseline_loss"] = result["curve"][0]["loss"] if result["curve"] else None
                result["channels"] = int(m.numel())
                results[point] = result
                del loss_fn  # its copy of the block goes before the next point makes one
        finally:
            block.to("cpu")
        writer.save_json("theta.json", results)  # the run's theta_curve.png is drawn from these (core.run_report)
        ctx.tracker.log({"theta/block": state.index, **{f"theta/{p}/loss": r["loss"] for p, r in results.items()}})


def enabled_points(cfg: dict) -> list[str]:
    points = list(cfg["search_theta"]["points"])
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        raise PipelineError(f"search_theta.points has unknown point(s) {unknown}; choose from {list(POINTS)}")
    return points


def fixed_theta(cfg: dict, point: str) -> float | None:
    theta = cfg["search_theta"].get("theta")
    if theta is None:
        return None
    value = theta.get(point) if isinstance(theta, dict) else theta
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
        raise PipelineError(f"search_theta.theta={value!r} must be a positive number (or null to search)")
    return None if value is None else float(value)
