"""Plots a person would rather look at than read: lambda, discrepancy and reward over a run's steps, and the
HTML page that shows them with the evaluation table in the Kubeflow UI."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


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


def write_report(path: str | Path, meta: dict[str, Any], eval_markdown: str, plot: Path) -> None:
    """An HTML page for the Kubeflow UI: ``meta`` as a table, the training curves (``plot``, a PNG embedded
    inline; left out when there is none) and the eval table (``eval_markdown``). Every text is HTML-escaped."""
    img = ""
    if plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        img = f'<img alt="lambda, discrepancy, reward" src="data:image/png;base64,{data}">'
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        f"<html><body><h2>dcgrpo: {html.escape(str(meta.get('method', '')))}</h2><table>{rows}</table>"
        f"<h3>Training curves</h3>{img}<h3>Evaluation</h3><pre>{html.escape(eval_markdown)}</pre></body></html>"
    )
