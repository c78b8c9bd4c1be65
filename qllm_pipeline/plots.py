"""PNG plots (matplotlib, headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

POINT_LABELS = {"qkv": "input_layernorm → q/k/v", "gate_up": "post_attention_layernorm → gate/up", "down": "SwiGLU → down_proj"}


def plot_theta_curves(results: dict, path, title: str) -> None:
    """One panel per reassembly point: sub-block MSE against θ, the chosen θ marked."""
    points = [p for p, r in results.items() if r["curve"]]
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.4), squeeze=False)
    for ax, point in zip(axes[0], points):
        r = results[point]
        thetas = [c["theta"] for c in r["curve"]]
        losses = [c["loss"] for c in r["curve"]]
        ax.plot(thetas, losses, marker=".", lw=1)
        ax.axvline(r["theta"], color="tab:red", ls="--", lw=1, label=f"θ*={r['theta']:.3g} (+{r['n_extra']} ch)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()  # the search goes from the largest channel max downwards
        ax.set_xlabel("θ (log scale; search runs right to left)")
        ax.set_ylabel("sub-block output MSE (log)")
        ax.set_title(POINT_LABELS.get(point, point), fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
