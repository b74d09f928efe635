"""Plots a person would rather look at than read: lambda, discrepancy and reward over a run's steps."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict[str, float]], out_path: str | Path, budget: float | None = None) -> Path:
    """Plot lambda, discrepancy and reward over steps (one PNG, three panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(3, 1, figsize=(6, 7), sharex=True)
    axes[0].plot(steps, [h.get("dc/lambda", 0.0) for h in history], marker=".")
    axes[0].set_ylabel("lambda")
    axes[1].plot(steps, [h.get("dc/discrepancy_mean", 0.0) for h in history], marker=".", label="mean d")
    axes[1].plot(steps, [h.get("dc/discrepancy_p99", 0.0) for h in history], marker=".", alpha=0.5, label="p99 d")
    if budget is not None:
        axes[1].axhline(budget, color="k", linestyle="--", linewidth=1, label="budget eps")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("discrepancy")
    axes[1].legend(fontsize=8)
    axes[2].plot(steps, [h.get("reward/mean", 0.0) for h in history], marker=".", label="reward/mean")
    val = [(h["step"], h["val/accuracy"]) for h in history if "val/accuracy" in h]
    if val:
        axes[2].plot(*zip(*val, strict=True), marker="o", label="val/accuracy")
    axes[2].set_ylabel("reward")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
