"""The benchmark harness every study shares: workers, a resumable row cache, tables, plots and intervals.

A study is a script that declares its runs and its table. Its driver (the script without ``--worker``) hands each
seed's missing runs to a worker, the same script re-run with ``--worker`` in a subprocess (one vLLM engine per
process, and a crash costs one seed's runs). The worker prints one ``ROW <json>`` line per finished run; the driver
appends each to the study's row cache as it arrives, so an interrupted study resumes where it stopped, and then
writes its Markdown table, JSON rows and plots from the cache.

Nothing here imports torch, vLLM or dcgrpo at module level: the TRL side of ``vs_trl.py`` imports it from
``.venv-trl`` too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev

ROW = "ROW "
"""Prefix of a worker's result line on stdout; every other line is the worker's own output."""

# ------------------------------------------------------------------ worker side


def emit_row(row: dict) -> None:
    """Hand one finished run to the driver (a line of its own, even after output without a newline)."""
    sys.stdout.write(f"\n{ROW}{json.dumps(row)}\n")
    sys.stdout.flush()


def quiet_worker() -> None:
    """A worker's stdout carries rows: no progress bars, no library warnings."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The hidden arguments the driver passes to its worker: ``--worker --seed N --runs JSON``."""
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)


class EnginePool:
    """One vLLM engine per process (vLLM CPU holds one), rebuilt when the deploy format or context length changes.

    ``train`` runs one config from the cached warm start under ``<work>/runs/<name>``; every run of a worker goes
    through it, so runs of one deploy format share their engine.
    """

    def __init__(self, work: str | Path):
        self.work = Path(work)
        self.engine, self.key = None, None

    def train(self, cfg, name: str):
        """(TrainResult, seconds of training and evaluation) of one run."""
        from dcgrpo.stages.model import prepare_inputs
        from dcgrpo.train import rl

        model_dir, train_path, val_path = prepare_inputs(cfg, self.work)
        key = (str(model_dir), cfg.rollout.precision, cfg.rollout.weight_grid, cfg.export.scheme,
               cfg.data.max_prompt_length + cfg.rollout.max_response_length)  # fmt: skip
        if key != self.key:  # one engine per process: close before the next format's
            self.close()
            self.engine, self.key = rl.make_engine(cfg, str(model_dir)), key
        t0 = time.perf_counter()
        res = rl.train(cfg, model_dir=model_dir, train_path=train_path, val_path=val_path,
                       out_dir=self.work / "runs" / name, engine=self.engine, progress=False)  # fmt: skip
        return res, time.perf_counter() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine, self.key = None, None

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def step_curves(history: list[dict], keys: Iterable[str]) -> dict[str, list[float]]:
    """Per-step values of ``keys`` over the training steps of a run's history (the records with ``dc/lambda``)."""
    steps = [h for h in history if "dc/lambda" in h]
    return {k: [h[k] for h in steps] for k in keys}


def val_accuracies(history: list[dict]) -> list[float]:
    """Held-out accuracy at each evaluation of a run: the warm start's first, the end's last."""
    return [h["val/accuracy"] for h in history if "val/accuracy" in h]


# ------------------------------------------------------------------ driver side


class RowCache:
    """Finished runs, one JSON object a line in ``path``, keyed by ``key(row)``.

    A row already in the cache is not computed again. A line cut short (a crash while it was being written) is
    skipped with a warning, and the next row starts on a line of its own.
    """

    def __init__(self, path: str | Path, key: Callable[[dict], Hashable]):
        self.path, self.key = Path(path), key
        self.rows: dict[Hashable, dict] = {}
        self._needs_newline = False
        if self.path.is_file():
            text = self.path.read_text()
            self._needs_newline = bool(text) and not text.endswith("\n")
            for i, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    self._load_line(line, i)

    def _load_line(self, line: str, lineno: int) -> None:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{self.path}:{lineno}: skipped a row cut short ({line[:60]}...)", stacklevel=3)
            return
        self.rows[self.key(row)] = row

    def __contains__(self, key: Hashable) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: dict) -> None:
        """Append one row to the file (flushed: a crash after this keeps it) and to ``rows``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(("\n" if self._needs_newline else "") + json.dumps(row) + "\n")
        self._needs_newline = False
        self.rows[self.key(row)] = row


@dataclass
class Finished:
    """A worker that exited 0: its rows, its resource usage (``os.wait4``: peak RSS, CPU) and its wall time."""

    rows: list[dict]
    usage: object
    wall_s: float


def run_worker(
    script: str | Path,
    argv: Sequence[str],
    *,
    label: str,
    on_row: Callable[[dict], None] | None = None,
    python: str | Path = sys.executable,
    log: Path | None = None,
    env: dict | None = None,
    cwd: str | Path | None = None,
    hint: str = "",
) -> Finished:
    """Run ``python script *argv`` and collect its ``ROW`` lines (each passed to ``on_row`` as it arrives).

    With ``log``, the worker's stdout and stderr go to that file (stderr is the terminal otherwise). A non-zero exit
    raises ``SystemExit`` naming ``label`` (say, the seed), with ``hint`` and the log's tail.
    """
    cmd = [str(python), str(script), *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if log else None, text=True,
                            env=env, cwd=cwd)  # fmt: skip
    rows: list[dict] = []
    with proc.stdout, open(log, "w") if log else nullcontext() as fh:
        for line in proc.stdout:
            if fh is not None:
                fh.write(line)
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW) :]))
                if on_row is not None:
                    on_row(rows[-1])
    _, status, usage = os.wait4(proc.pid, 0)  # the per-child getrusage: this worker's peak RSS, not the driver's
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = f"; log {log}:\n{log.read_text()[-4000:]}" if log else ""
        raise SystemExit(f"{label} failed (rc {proc.returncode}){hint}{tail}")
    return Finished(rows, usage, time.perf_counter() - t0)


def fill_cache(
    cache: RowCache,
    script: str | Path,
    seed: int,
    runs: list[dict],
    run_key: Callable[[dict], str],
    argv: Sequence[str] = (),
    label: str = "worker",
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train the runs of ``seed`` the cache lacks in one worker (``--worker --seed --runs``); the runs it trained.

    Each row is cached as it arrives, so rows finished before a worker fails are kept.
    """
    todo = list({run_key(r): r for r in runs if (run_key(r), seed) not in cache}.values())
    if not todo:
        return []

    def add(row: dict) -> None:
        cache.add(row)
        if on_row is not None:
            on_row(row)

    run_worker(script, ["--worker", f"--seed={seed}", *argv, f"--runs={json.dumps(todo)}"],
               label=f"{label} for seed {seed}", on_row=add, hint=f"; rows so far are in {cache.path}")  # fmt: skip
    return todo


class Stopwatch:
    """Progress lines on stderr, each with the seconds since the study started."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def say(self, msg: str, width: int = 0) -> None:
        print(f"[{self.elapsed:{width}.0f} s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ statistics


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval); the half-width is nan for one sample."""
    if len(xs) < 2:
        return mean(xs), float("nan")
    return mean(xs), t95(len(xs)) * stdev(xs) / math.sqrt(len(xs))


def paired(rows: dict[tuple[str, int], dict], key: str, ref: str, field: str = "acc") -> tuple[float, float, int]:
    """Mean and 95% half-width of ``field`` of run ``key`` minus run ``ref``, over the seeds both have."""
    seeds = sorted(s for k, s in rows if k == key and (ref, s) in rows)
    diffs = [rows[key, s][field] - rows[ref, s][field] for s in seeds]
    if not diffs:
        return float("nan"), float("nan"), 0
    return (*interval(diffs), len(diffs))


def quarter_mean(xs: list[float], last: bool) -> float:
    """Mean of the first (or last) quarter of a curve, at least one point."""
    n = max(len(xs) // 4, 1)
    return mean(xs[-n:] if last else xs[:n])


def nanmean(xs: list[float]) -> float:
    """Mean over the values that are not nan (nan if none is)."""
    kept = [x for x in xs if x == x]
    return mean(kept) if kept else float("nan")


def mean_curves(rows: list[dict]) -> dict[str, list[float]]:
    """Step-by-step mean over seeds of every curve the rows carry (``row["curve"][key]``, equal lengths)."""
    return {k: [mean(v) for v in zip(*(r["curve"][k] for r in rows), strict=True)] for k in rows[0]["curve"]}


# ------------------------------------------------------------------ tables and files


def fmt(v, nd: int = 3) -> str:
    """A table cell: ``-`` for None, thousands separators, scientific notation for very large or small floats."""
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10**-nd):
            return f"{v:.2e}"
        return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def md_table(header: list[str], rows: Iterable[list]) -> str:
    """A Markdown table; strings are written as they are, other cells through ``fmt``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]], widths: Sequence[int]) -> str:
    """A right-aligned fixed-width table for the terminal, a rule under its header."""
    hdr = " ".join(f"{c:>{w}}" for c, w in zip(header, widths, strict=True))
    body = [" ".join(f"{v:>{w}}" for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([hdr, "-" * len(hdr), *body])


def write_report(out: Path, stem: str, md: str, data: dict, indent: int | None = None) -> tuple[Path, Path]:
    """``<out>/<stem>.md`` (``md`` ends with a newline) and ``<out>/<stem>.json``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text(md)
    json_path.write_text(json.dumps(data, indent=indent))
    return md_path, json_path


@contextmanager
def figure(path: Path, nrows: int, ncols: int, figsize: tuple[float, float], dpi: int = 110, **kw):
    """``(fig, axes)`` of a new matplotlib figure (Agg, no display), saved to ``path`` and closed at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, **kw)
    try:
        yield fig, axes
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)


def plot_curves(axes, series: Iterable[tuple[str, dict, dict]], keys: Sequence[str], title: Callable[[str], str],
                log_panel: int, legend_panel: int, legend_size: int) -> None:  # fmt: skip
    """One panel per curve key, steps on x: ``series`` is (label, curves by key, matplotlib line style)."""
    for label, curves, style in series:
        for ax, k in zip(axes, keys, strict=True):
            ax.plot(curves[k], label=label, **style)
    for ax, k in zip(axes, keys, strict=True):
        ax.set_title(title(k))
        ax.set_xlabel("step")
    axes[log_panel].set_yscale("log")
    axes[legend_panel].legend(fontsize=legend_size)
