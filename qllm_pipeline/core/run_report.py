"""Run-level plots from the stored artifacts: θ search curves, outliers before/after reassembly, LRC losses,
perplexities."""
from __future__ import annotations

import logging
from pathlib import Path

from qllm_pipeline.core.plots import plot_channel_max, plot_lrc_losses, plot_ppl, plot_theta_curves
from qllm_pipeline.model.arch import Family
from qllm_pipeline.quantized.qblock import load_reassemblies

log = logging.getLogger(__name__)


def _summary(values) -> dict:
    return {"max": float(values.max()), "median": float(values.median())}


def write_plots(run_dir: Path, artifacts: dict, results: dict, title: str, family: Family) -> list[Path]:
    written = []
    labels = {p.name: p.label for p in family.points}
    searches = [a.json("theta.json") for a in artifacts.get("search_theta", []) if a is not None]
    if any(r["curve"] for s in searches for r in s.values()):
        path = run_dir / "theta_curve.png"
        plot_theta_curves(searches, path, labels=labels)
        written.append(path)
    stats = [a for a in artifacts.get("collect_activations", []) if a is not None]
    if stats:
        point_stat = {p.name: p.linears[0] for p in family.points}  # the input of the point's first projection
        before = {p: [] for p in point_stat}
        after = {p: [] for p in point_stat}
        maps = artifacts.get("reassemble") or []
        for i, art in enumerate(stats):
            channel_max = art.tensors("channel_max.safetensors")
            reassembled = load_reassemblies(maps[i].tensors("reassembly.safetensors")) if i < len(maps) and maps[i] else {}
            for point, key in point_stat.items():
                m = channel_max[key]
                before[point].append(_summary(m))
                if maps and any(maps):
                    r = reassembled.get(point)
                    after[point].append(_summary(r.apply_to_activation(m) if r is not None else m))
        path = run_dir / "channel_max.png"
        plot_channel_max(before, after, path, labels=labels)
        written.append(path)
    losses = [a.json("losses.json") for a in artifacts.get("train_lowrank", []) if a is not None]
    if losses:
        path = run_dir / "lrc_loss.png"
        plot_lrc_losses(losses, path)
        written.append(path)
    if results.get("ppl"):
        path = run_dir / "perplexity.png"
        plot_ppl(results["ppl"], path, title)
        written.append(path)
    return written
