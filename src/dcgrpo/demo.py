"""``dcgrpo demo``, the main job: the whole pipeline through ``kfp.local`` on this machine, then a summary of the
run read back from MLflow (the same names and values as the registry's tags and the evaluation reports)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dcgrpo import storage
from dcgrpo.config import DEFAULT_PRESET, load_config
from dcgrpo.mlflow_server import start_local_server, stop_local_server
from dcgrpo.pipeline import pipeline_arguments, run_local
from dcgrpo.tracking import EVAL_METRICS_TAG, LAMBDA_KEY, ROUND_DISCREPANCY, mlflow_client

log = logging.getLogger(__name__)


def _pipeline_runs(client, experiment: str, since_ms: int) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}")
    return [r for r in runs if r.data.tags.get("method")]


def _last(client, run_id: str, key: str) -> float:
    """A metric's value at the run's last step that logged it (MLflow's latest value is by time, not step)."""
    history = client.get_metric_history(run_id, key)
    return max(history, key=lambda m: (m.step, m.timestamp)).value if history else float("nan")


def summarize_pipeline_run(tracking_uri: str, cfg, since_ms: int) -> list[dict[str, Any]]:
    """Per method: accuracy before/after training, eval gate metric, mean discrepancy of the last round, lambda
    after the last step, registered version and aliases, and why it was or was not promoted (read back from
    MLflow, the record of the run; the same names and values as the registry's tags and the evaluation report)."""
    client = mlflow_client(tracking_uri)
    versions = {}
    try:
        for mv in client.search_model_versions(f"name = '{cfg.registry.model_name}'"):
            versions[mv.run_id] = mv
    except Exception:  # no registered model yet
        pass
    rows = []
    for run in _pipeline_runs(client, cfg.tracking.experiment, since_ms):
        acc = sorted(client.get_metric_history(run.info.run_id, "val/accuracy"), key=lambda m: m.step)
        evals = json.loads(run.data.tags.get(EVAL_METRICS_TAG, "{}"))
        mv = versions.get(run.info.run_id)
        aliases = []
        if mv is not None:
            aliases = list(client.get_model_version(cfg.registry.model_name, mv.version).aliases)
        rows.append({
            "decision": mv.tags.get("promotion.reason", "") if mv is not None else "",
            "method": run.data.tags["method"], "run_id": run.info.run_id, "run_name": run.info.run_name,
            "status": run.info.status,
            "acc_start": acc[0].value if acc else float("nan"), "acc_end": acc[-1].value if acc else float("nan"),
            "gate": evals.get(cfg.eval.gate_metric, float("nan")),
            "discrepancy": _last(client, run.info.run_id, ROUND_DISCREPANCY),
            "lambda": _last(client, run.info.run_id, LAMBDA_KEY),
            "version": mv.version if mv is not None else "-", "aliases": ",".join(aliases) or "-",
        })  # fmt: skip
    rows = sorted(rows, key=lambda r: r["method"])
    selected = [r for r in rows if r["version"] != "-"]
    for r in rows:
        if r["version"] == "-":
            r["decision"] = _not_selected(r, selected[0] if selected else None, cfg)
    return rows


def _not_selected(row: dict[str, Any], chosen: dict[str, Any] | None, cfg) -> str:
    """Why a method was not the one registered (``registry.rank_methods``' rule), saying so when it was a tie."""
    gate = cfg.eval.gate_metric
    if chosen is None:
        return "not selected (no method was registered)"
    if row["status"] != "FINISHED":
        return f"not selected (its run is {row['status']})"
    limit = cfg.promotion_discrepancy_limit()
    if not row["discrepancy"] <= limit < float("inf") or not chosen["discrepancy"] <= limit:
        within = "outside" if not row["discrepancy"] <= limit else "within"
        return f"not selected (mean d {row['discrepancy']:.3g} {within} the limit {limit:.3g})"
    if row["gate"] == chosen["gate"]:
        return (
            f"not selected: a tie on {gate} ({row['gate']:.4g} each), broken by the lower mean d "
            f"({chosen['discrepancy']:.3g} vs {row['discrepancy']:.3g})"
            if chosen["discrepancy"] != row["discrepancy"]
            else f"not selected: a tie on {gate} and mean d; the first method listed was chosen"
        )
    return f"not selected ({gate} {row['gate']:.4g} < {chosen['method']}'s {chosen['gate']:.4g})"


def mlflow_ui_command(root: Path) -> str:
    """The command that opens the MLflow UI on the demo's store and artifacts, from any directory."""

    mlflow = Path(sys.executable).with_name("mlflow")
    store = root / "mlflow"
    return shlex.join([
        str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"), "--port", "5000",
    ])  # fmt: skip


def demo(
    preset: str = DEFAULT_PRESET,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    rounds: int | None = None,
    data_uri: str = "",
    keep_server: bool = False,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """The main job: the whole pipeline through ``kfp.local`` on this machine, then a summary.

    Checks every argument (each method's config included) first, then starts a local MLflow server (sqlite,
    under ``storage.root/mlflow``) when no tracking URI is configured; prints how to open the UI on the results.
    """
    overrides = list(overrides or [])
    cfg = load_config(preset=preset, overrides=overrides)
    if storage.is_s3(cfg.storage.root):
        raise ValueError("dcgrpo demo runs locally: storage.root must be a local directory")
    arguments = pipeline_arguments(preset, overrides, methods, rounds, data_uri)  # refuses bad input: no server yet
    root = Path(cfg.storage.root).resolve()
    uri, proc = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), None
    if not uri:
        uri, proc = start_local_server(root / "mlflow")
        log.info("local MLflow server at %s (until the demo ends)", uri)
        if not keep_server:  # MLflow's "View run at http://127.0.0.1:<port>" links would die with the server
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    arguments["mlflow_uri"] = uri
    if not verbose:
        _quiet_libraries()
    t0 = time.time()
    try:
        run_local(arguments, root / "kfp", verbose=verbose)
        wall = time.time() - t0
        rows = summarize_pipeline_run(uri, cfg, int(t0 * 1000))
        experiment_id = _experiment_id(uri, cfg.tracking.experiment)
    finally:
        if proc is not None and not keep_server:
            stop_local_server(proc)
    console = Console(width=max(Console().width, 150))
    _print_summary(console, cfg, preset, arguments["methods"], rows, wall)
    _print_reports(console, root, t0)
    _print_mlflow(console, cfg, root, uri, proc, keep_server, experiment_id)
    return rows


def _quiet_libraries() -> None:
    """vLLM logs every engine start and weight sync at INFO/WARNING, and transformers draws a progress bar for every
    model it loads or saves; kfp.local echoes it all (-v keeps them). Libraries' deprecation notices about their
    own dependencies and torch's C++ notes (NUMA binding) repeat at every engine start: nothing a user can act on."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")


def _print_summary(console, cfg, preset: str, methods: list[str], rows: list[dict[str, Any]], wall: float) -> None:
    """The demo table (one row per method) and the promotion decisions, with the names MLflow uses."""
    gate = cfg.eval.gate_metric
    table = Table(title=f"dcgrpo demo: {preset}, methods {', '.join(methods)}, {wall:.0f} s")
    for col in ("method", "val acc start -> end", f"{gate} (fp8)", "mean d, last round", "lambda, last step",
                "version", "aliases"):  # fmt: skip
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(r["method"], f"{r['acc_start']:.3f} -> {r['acc_end']:.3f}", f"{r['gate']:.4g}",
                      f"{r['discrepancy']:.2e}", f"{r['lambda']:.4g}", str(r["version"]), r["aliases"])  # fmt: skip
    console.print(table)
    console.print(f"mean d, last round: {ROUND_DISCREPANCY}, the round's mean of dc/discrepancy_mean (d: the batch-mean "
                  f"gap between the engines' token probabilities); lambda, last step: {LAMBDA_KEY}, after the last "
                  "dual update; the same names and values in MLflow, the registry's tags and the reports")  # fmt: skip
    console.print(f"promotion gate: {gate} >= champion's, mean d of the last round <= "
                  f"{cfg.promotion_discrepancy_limit():.3g}")  # fmt: skip
    for r in rows:
        console.print(f"  {r['method']}: {r['decision']}")


def _print_reports(console, root: Path, since: float) -> None:
    """Copy the evaluation reports out of kfp.local's task folders as ``<method>.html`` and print their links."""
    reports = _reports(root / "kfp", since)
    if not reports:
        return
    console.print("evaluation reports (open in a browser; KFP's artifacts copied from the task folders):")
    (root / "reports").mkdir(parents=True, exist_ok=True)
    for method, path in reports:  # KFP names the artifact file "report": a browser shows it as text without .html
        page = root / "reports" / f"{method}.html"
        page.write_bytes(path.read_bytes())
        console.print(f"  {method}: {page.as_uri()}", soft_wrap=True)


def _print_mlflow(console, cfg, root: Path, uri: str, proc, keep_server: bool, experiment_id: str | None) -> None:
    """Where to look next: the MLflow UI (the command that reopens it when the demo's server has stopped)."""
    ui = "http://127.0.0.1:5000"
    if proc is not None and keep_server:
        ui = uri
        console.print(f"MLflow UI (still running): {uri}", soft_wrap=True)
    elif proc is not None:
        console.print(f"MLflow UI (the demo's server has stopped; this opens its results):\n  {mlflow_ui_command(root)}",
                      soft_wrap=True)  # fmt: skip
    else:
        ui = uri
        console.print(f"MLflow: {uri}", soft_wrap=True)
    if experiment_id is not None:
        console.print(f"  the runs' charts (lambda, discrepancy, accuracy): {ui}/#/experiments/{experiment_id}/runs"
                      "?compareRunsMode=CHART", soft_wrap=True)  # fmt: skip
        console.print(f"  the registered model and its aliases: {ui}/#/models/{cfg.registry.model_name}",
                      soft_wrap=True)  # fmt: skip


def _experiment_id(uri: str, name: str) -> str | None:
    exp = mlflow_client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def _reports(kfp_root: Path, since: float) -> list[tuple[str, Path]]:
    """(method, path) of the evaluation reports (KFP HTML artifacts named ``report``) this demo wrote under
    ``kfp_root`` (kfp.local names a loop's folders by iteration, so the method comes from the page's title)."""
    found = []
    for path in sorted(kfp_root.glob("*/**/report")):
        if path.is_file() and path.stat().st_mtime >= since:
            title = re.search(r"<title>dcgrpo evaluation: (.*?)</title>", path.read_text(errors="replace")[:2000])
            found.append((title[1] if title else "?", path))
    return sorted(found)
