"""PNG plots (matplotlib, headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_theta_curves(blocks: list[dict], path, labels: dict[str, str] | None = None) -> None:
    """One panel per reassembly point: every block's sub-block MSE along the θ grid, relative to its loss at the grid's
    first θ (the largest channel max: no channel split), the chosen θ marked; one run-level figure, not one per block."""
    order = list(labels or {}) + [p for p in blocks[0] if p not in (labels or {})]  # the family's order of the points
    points = [p for p in order if any(b.get(p, {}).get("curve") for b in blocks)]
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points) + 1, 3.8), squeeze=False, layout="constrained")
    colors = plt.get_cmap("viridis")
    for ax, point in zip(axes[0], points):
        for i, block in enumerate(blocks):
            r = block.get(point)
            if not r or not r["curve"] or not r["curve"][0]["loss"]:
                continue
            base, color = r["curve"][0]["loss"], colors(i / max(1, len(blocks) - 1))
            ax.plot([c["theta"] for c in r["curve"]], [c["loss"] / base for c in r["curve"]], lw=0.8, color=color)
            ax.plot([r["theta"]], [r["loss"] / base], marker="o", ms=3, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # the search goes from the largest channel max downwards
        ax.set_xlabel("θ (log), searched left to right")
        ax.set_ylabel("MSE / MSE at the first θ (log)")
        ax.set_title((labels or {}).get(point, point), fontsize=9)
    scale = plt.cm.ScalarMappable(cmap=colors, norm=plt.Normalize(0, len(blocks) - 1))
    fig.colorbar(scale, ax=axes[0].tolist(), label="decoder block (dot: the chosen θ)")
    fig.suptitle("θ search per block")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_channel_max(before: dict[str, list[dict]], after: dict[str, list[dict]], path,
                     labels: dict[str, str] | None = None) -> None:
    """Per reassembly point: max and median channel |x| per block, before and after reassembly (log scale)."""
    points = [p for p in before if before[p]]
    fig, axes = plt.subplots(1, len(points), figsize=(4.4 * len(points), 3.4), squeeze=False)
    for ax, point in zip(axes[0], points):
        blocks = range(len(before[point]))
        ax.plot(blocks, [b["max"] for b in before[point]], color="tab:red", marker=".", label="max, before")
        ax.plot(blocks, [b["median"] for b in before[point]], color="tab:red", ls=":", label="median, before")
        if after.get(point):
            ax.plot(blocks, [b["max"] for b in after[point]], color="tab:blue", marker=".", label="max, after (bound)")
        ax.set_yscale("log")
        ax.set_xlabel("decoder block")
        ax.set_ylabel("channel max |x| (log)")
        ax.set_title((labels or {}).get(point, point), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Activation outliers at the reassembly points")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_lrc_losses(losses: list[dict], path) -> None:
    """Block output MSE against the FP block, before and after low-rank error correction."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    blocks = range(len(losses))
    ax.plot(blocks, [l["loss_before"] for l in losses], marker=".", label="before LRC")
    ax.plot(blocks, [l["loss_after"] for l in losses], marker=".", label="after LRC")
    ax.set_yscale("log")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("block output MSE vs FP (log)")
    ax.set_title("Low-rank error correction per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_ppl(ppl: dict[str, dict[str, float]], path, title: str) -> None:
    """Perplexity of each model variant per dataset (log scale), FP marked."""
    datasets = list(ppl)
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.8 * len(datasets), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        names, values = list(ppl[dataset]), list(ppl[dataset].values())
        bars = ax.bar(names, values, color=["tab:gray" if n == "fp" else "tab:blue" for n in names])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(dataset, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
