"""Plots a person would rather look at than read: lambda, discrepancy and reward over a run's steps, and the
HTML page that shows them with the evaluation table in the Kubeflow UI."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dcgrpo.algorithm.methods import METHODS


def _series(history: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the entries that measured ``key``: a step without it is left out, never drawn as 0."""
    points = [(h["step"], h[key]) for h in history if key in h]
    return [p[0] for p in points], [p[1] for p in points]


def curve_panels(history: list[dict[str, float]], budget: float | None, method: str | None) -> tuple[list[str], bool]:
    """(the panels ``plot_curves`` draws, whether it draws the budget line eps) for this method and data."""
    show_lambda, show_budget = bool(_series(history, "dc/lambda")[0]), budget is not None
    if method is not None:
        entry = METHODS.get(method)
        if entry is not None:
            show_lambda, show_budget = entry.penalised, show_budget and entry.dual_ascent
    return ["lambda"] * show_lambda + ["discrepancy", "reward"], show_budget


def plot_curves(
    history: list[dict[str, float]], out_path: str | Path, budget: float | None = None, method: str | None = None
) -> Path:
    """Plot lambda, discrepancy and reward over steps (one PNG, titled with ``method``).

    Only measured points are drawn. The lambda panel and the budget line ``eps`` appear only where they mean
    something: lambda for a method that applies the penalty (``Method.penalised``), eps for one whose lambda moves
    by dual ascent (``Method.dual_ascent``). Without ``method`` both follow the data (lambda if logged, eps if given).
    """
    import matplotlib  # matplotlib: `dcgrpo submit` runs without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: `dcgrpo submit` runs without it

    panels, show_budget = curve_panels(history, budget, method)
    show_lambda = "lambda" in panels
    fig, axes = plt.subplots(len(panels), 1, figsize=(6, 2.4 * len(panels) + 0.4), sharex=True, squeeze=False)
    ax = dict(zip(panels, axes[:, 0], strict=True))
    if show_lambda:
        ax["lambda"].plot(*_series(history, "dc/lambda"), marker=".", label="dc/lambda")
        ax["lambda"].set_ylabel("lambda")
    ax["discrepancy"].plot(*_series(history, "dc/discrepancy_mean"), marker=".", label="dc/discrepancy_mean")
    ax["discrepancy"].plot(*_series(history, "dc/discrepancy_p99"), marker=".", alpha=0.5, label="dc/discrepancy_p99")
    if show_budget:
        ax["discrepancy"].axhline(budget, color="k", linestyle="--", linewidth=1, label="budget eps")
    d_values = _series(history, "dc/discrepancy_mean")[1] + _series(history, "dc/discrepancy_p99")[1]
    if d_values and all(v > 0 for v in d_values):  # a log axis would drop a measured 0
        ax["discrepancy"].set_yscale("log")
    ax["discrepancy"].set_ylabel("discrepancy d")
    ax["reward"].plot(*_series(history, "reward/mean"), marker=".", label="reward/mean")
    ax["reward"].plot(*_series(history, "val/accuracy"), marker="o", label="val/accuracy")
    ax["reward"].set_ylabel("reward, accuracy")
    ax["reward"].set_xlabel("step")
    for a in ax.values():
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(f"{method}: training curves" if method else "training curves")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def fmt(value: Any) -> str:
    """A number as a person reads it (and as the demo table prints it): integers without ``.0``, small values such
    as a discrepancy as ``3.26e-04``, other floats to 4 significant digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.4g}"


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; max-width: 60em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f0f2f5; } tbody th { background: #fafafa; font-weight: normal; color: #555; }
img { max-width: 100%; } p.note { color: #555; font-size: 0.9em; }
"""


def _cell(value: Any, tag: str = "td") -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return f"<{tag}{' class=num' if numeric and tag == 'td' else ''}>{html.escape(fmt(value))}</{tag}>"


def write_report(
    path: str | Path,
    title: str,
    summary: dict[str, Any],
    table: tuple[Sequence[str], Sequence[Sequence[Any]]],
    plot: Path,
    note: str = "",
) -> None:
    """An HTML page for the Kubeflow UI: ``summary`` (label -> value) as a table, the training curves (``plot``, a
    PNG embedded inline; left out when there is none), the evaluation ``table`` (header, rows) as an HTML table and
    a ``note`` under it. Numbers are rounded (``fmt``); every text is HTML-escaped."""
    img = ""
    if plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        img = f'<h2>Training curves</h2><img alt="training curves" src="data:image/png;base64,{data}">'
    rows = "".join(f"<tr>{_cell(k, 'th')}{_cell(v)}</tr>" for k, v in summary.items())
    header, body = table
    head = "".join(_cell(h, "th") for h in header)
    cells = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in body)
    evaluation = f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>" if header else ""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<table><tbody>{rows}</tbody></table>{img}<h2>Evaluation</h2>{evaluation}"
        f'<p class="note">{html.escape(note)}</p></body></html>'
    )
