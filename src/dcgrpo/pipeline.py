"""Compile, submit, schedule and run locally the `dc_grpo` Kubeflow pipeline.

The pipeline definition lives in ``pipelines/dc_grpo.py`` and its components
in ``components/``; this module is what the CLI and tests call.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.config import DEFAULT_PRESET
from dcgrpo.stages.parameters import resolve_run_parameters

log = logging.getLogger(__name__)

COMPILED_PATH = Path(str(resources.files("dcgrpo.pipelines") / "compiled" / "dc_grpo.yaml"))
"""The compiled pipeline, package data of ``dcgrpo.pipelines`` (``pipelines/compiled/`` in a checkout): found the
same way in a checkout, an installed wheel and the light image."""
COMPILED_NAME = COMPILED_PATH.name


def default_compile_output() -> Path:
    """Where ``dcgrpo compile`` writes without ``--output``: the packaged file in a checkout (editable install),
    else ``./dc_grpo.yaml`` (an installed package is not the user's to rewrite, and may be read-only)."""
    import os

    folder = COMPILED_PATH.parent
    in_checkout = (folder.parents[1] / "pyproject.toml").is_file() and os.access(folder, os.W_OK)
    return COMPILED_PATH if in_checkout else Path.cwd() / COMPILED_NAME


def compile_yaml(out_path: str | Path, contract: Any = None, **settings: Any) -> Path:
    """Compile the pipeline (with ``ClusterSettings(contract, **settings)``) to ``out_path``.

    ``contract``: a ``dcgrpo.deploy.DeploymentContract`` (default: its defaults, the names manifests/ use).
    """
    from dcgrpo.deploy import DeploymentContract
    from dcgrpo.pipelines.dc_grpo import ClusterSettings, compile_pipeline

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compile_pipeline(str(out_path), ClusterSettings(contract=contract or DeploymentContract(), **settings))
    log.info("compiled pipeline to %s", out_path)
    return out_path


def load_compiled(path: str | Path) -> tuple[Any, Any]:
    """Parse a compiled YAML into the KFP pipeline-spec and Kubernetes platform protobufs.

    Raises ``ValueError`` naming the file when either document does not parse:
    stricter than ``kfp.components.load_component_from_file``, which misses
    dangling references.
    """
    import yaml
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    docs = list(yaml.safe_load_all(Path(path).read_text()))
    if len(docs) != 2:
        raise ValueError(f"{path}: expected 2 YAML documents (pipeline spec, platform spec), got {len(docs)}")
    spec = pipeline_spec_pb2.PipelineSpec()
    try:
        json_format.ParseDict(docs[0], spec)
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: pipeline spec does not parse: {exc}") from exc
    executors = {}
    for name, cfg in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        msg = kubernetes_executor_config_pb2.KubernetesExecutorConfig()
        try:
            json_format.ParseDict(cfg, msg)
        except json_format.ParseError as exc:
            raise ValueError(f"{path}: kubernetes config of {name} does not parse: {exc}") from exc
        executors[name] = msg
    return spec, executors


def compiled_max_rounds(package: str | Path = COMPILED_PATH) -> int:
    """How many rounds a compiled pipeline can run: its highest ``train-round-K`` task."""
    import yaml

    from dcgrpo.config import ConfigError
    from dcgrpo.pipelines.dc_grpo import ROUND_TASK

    spec = next(yaml.safe_load_all(Path(package).read_text()))
    pattern = re.compile(re.escape(ROUND_TASK).replace(r"\{\}", r"(\d+)") + "$")
    found = [
        int(m[1])
        for component in spec.get("components", {}).values()
        for task in component.get("dag", {}).get("tasks", {}).values()
        if (m := pattern.match(task.get("taskInfo", {}).get("name", "")))
    ]
    if not found:
        raise ConfigError(f"{package}: no {ROUND_TASK.format('K')} tasks; is this the dc_grpo pipeline?")
    return max(found)


def pipeline_arguments(
    preset: str,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    rounds: int | None = None,
    data_uri: str = "",
    model_uri: str = "",
    mlflow_uri: str = "",
    model_name: str | None = None,
    force_promotion: bool = False,
    max_rounds: int | None = None,
) -> dict[str, Any]:
    """Pipeline parameters, validated through the one config before anything is submitted.

    ``max_rounds``: what the package to submit can run (``compiled_max_rounds``); None = no bound.
    """
    from dcgrpo.config import load_config

    overrides = list(overrides or [])
    load_config(preset=preset, overrides=overrides)  # fail here, not in a pod
    methods = methods or ["grpo", "dc-grpo"]
    for method in methods:
        load_config(preset=preset, overrides=[*overrides, f"method.name={method}"])
    resolved = resolve_run_parameters(preset, overrides, rounds or 0, model_name or "", max_rounds or 10**9)
    return {
        "preset": preset,
        "overrides": overrides,
        "methods": methods,
        "rounds": resolved.rounds,
        "data_uri": data_uri,
        "model_uri": model_uri,
        "mlflow_uri": mlflow_uri,
        "model_name": resolved.model_name,
        "force_promotion": force_promotion,
    }


def check_rounds(arguments: dict[str, Any], package: str | Path) -> None:
    """Refuse a ``rounds`` argument the package cannot run (``ConfigError`` naming ``rounds``), before any request."""
    from dcgrpo.config import ConfigError

    rounds, most = int(arguments.get("rounds") or 0), compiled_max_rounds(package)
    if rounds > most:
        raise ConfigError(
            f"rounds={rounds}: {package} runs at most {most} rounds; ask for fewer, or recompile with "
            f"`dcgrpo compile --max-rounds {rounds} --output FILE` and pass --package FILE"
        )


HEALTH_PATH = "/apis/v2beta1/healthz"


def check_kfp(host: str, token: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """One quick request to ``<host>/apis/v2beta1/healthz`` before ``kfp.Client`` (which retries for minutes).

    Returns the health JSON (``multi_user`` says whether runs need a namespace).
    Raises ``ServiceUnavailable`` naming the host: unreachable, token refused, or no KFP API there.
    """
    import urllib.error
    import urllib.request

    from dcgrpo.errors import ServiceUnavailable

    url = host.rstrip("/") + HEALTH_PATH
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (the user's KFP host)
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ServiceUnavailable(
                f"Kubeflow Pipelines at {host} refused the credentials (HTTP {exc.code}): set KFP_TOKEN to a "
                "valid bearer token"
            ) from exc
        raise ServiceUnavailable(
            f"Kubeflow Pipelines at {host}: HTTP {exc.code} from {HEALTH_PATH}; is the host the KFP API "
            "endpoint (e.g. https://kubeflow.example.com/pipeline)?"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServiceUnavailable(
            f"Kubeflow Pipelines at {host} is unreachable ({reason}); check --host or KFP_HOST"
        ) from exc
    try:
        return json.loads(body)
    except ValueError:
        log.warning("%s answered with a non-JSON page (a login redirect?); going on", url)
        return {}


@contextmanager
def _kfp_errors(host: str, what: str) -> Iterator[None]:
    """KFP API refusals as one-line ``ServiceUnavailable``: a refused token, a missing experiment or namespace."""
    from dcgrpo.errors import ServiceUnavailable

    try:
        yield
    except Exception as exc:
        status = getattr(exc, "status", None)
        if type(exc).__name__ != "ApiException" or status is None:
            raise
        detail = " ".join(str(getattr(exc, "body", "") or getattr(exc, "reason", "")).split())[:300]
        hint = {401: "set KFP_TOKEN to a valid token", 403: "this token or service account may not do that here",
                404: "check --experiment and --namespace"}.get(status, "")  # fmt: skip
        raise ServiceUnavailable(
            f"Kubeflow Pipelines at {host}: {what} failed (HTTP {status}: {detail}); {hint}"
        ) from exc


def _client(host: str, namespace: str | None = None):
    """``kfp.Client`` for ``host`` after a health check; a bearer token comes from ``$KFP_TOKEN`` when set.

    Multi-user Kubeflow (the health check says so) needs the profile namespace.
    """
    import os

    import kfp

    from dcgrpo.config import ConfigError

    token = os.environ.get("KFP_TOKEN") or None
    health = check_kfp(host, token)
    if health.get("multi_user") and not namespace:
        raise ConfigError(f"{host} is multi-user Kubeflow: pass --namespace <your profile namespace>")
    with _kfp_errors(host, "connecting"):
        return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


def submit(
    host: str,
    arguments: dict[str, Any],
    experiment: str = "dcgrpo",
    package: Path = COMPILED_PATH,
    namespace: str | None = None,
    service_account: str | None = None,
    wait_s: float | None = None,
) -> tuple[str, str | None]:
    """Submit one run of the compiled pipeline; returns (run id, final state or None when not waited for).

    ``wait_s``: follow the run up to that many seconds (``wait_for_run_completion``).
    """
    check_rounds(arguments, package)
    client = _client(host, namespace)
    with _kfp_errors(host, f"creating a run in experiment {experiment!r}"):
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, experiment_name=experiment, namespace=namespace,
            enable_caching=False, service_account=service_account or None,
        )  # fmt: skip
    log.info("submitted run %s to %s (experiment %s)", result.run_id, host, experiment)
    if wait_s is None:
        return result.run_id, None
    try:
        with _kfp_errors(host, f"following run {result.run_id}"):
            run = client.wait_for_run_completion(result.run_id, timeout=int(wait_s), sleep_duration=30)
        state = str(getattr(run, "state", "") or "UNKNOWN")
    except TimeoutError:  # the run goes on; the caller's wait is over
        state = f"STILL RUNNING after {wait_s:.0f} s"
    log.info("run %s ended: %s", result.run_id, state)
    return result.run_id, state


def schedule(
    host: str,
    cron: str,
    arguments: dict[str, Any],
    experiment: str = "dcgrpo",
    job_name: str = "dcgrpo-retrain",
    package: Path = COMPILED_PATH,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """A recurring run: max concurrency 1 and no catch-up (a missed slot is not replayed).

    ``cron`` has KFP's 6 fields, seconds first (``0 0 3 * * 0``: Sundays 03:00).
    """
    if len(cron.split()) != 6:
        raise ValueError(f"cron {cron!r}: KFP expects 6 fields, seconds first (e.g. '0 0 3 * * 0')")
    check_rounds(arguments, package)
    client = _client(host, namespace)
    with _kfp_errors(host, f"creating experiment {experiment!r}"):
        experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    with _kfp_errors(host, f"creating recurring run {job_name!r}"):
        job = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            pipeline_package_path=str(package),
            params=arguments,
            service_account=service_account or None,  # None: Kubeflow's run account
        )
    log.info("scheduled %s (%s) on %s", job_name, cron, host)
    return job.recurring_run_id


def run_local(arguments: dict[str, Any], pipeline_root: str | Path, verbose: bool = False) -> Any:
    """Run the whole pipeline in-process with ``kfp.local`` (SubprocessRunner, this venv).

    Kubernetes settings (GPUs, node pools, secrets, PVCs) are ignored locally, and kfp.local's warnings saying so
    are not shown; neither is each task's executor input (a page of JSON per task) unless ``verbose``.
    """
    import sys
    import warnings

    import kfp.local

    from dcgrpo.pipelines.dc_grpo import ClusterSettings, build_pipeline

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    log.info("running the pipeline locally with %s", json.dumps(arguments))
    # No retries locally: a failure here is a bug or bad input, not a preempted node. Only the branch of the
    # asked round count is compiled in (rounds 0 = the preset's, as the pipeline's first step resolves it).
    rounds = resolve_run_parameters(
        arguments.get("preset", ""), arguments.get("overrides"), arguments.get("rounds") or 0, "", 10**9
    ).rounds
    pipeline = build_pipeline(ClusterSettings(retries=0, max_rounds=rounds, containerized=False))
    with warnings.catch_warnings():
        if not verbose:  # "settings have no effect locally", "non-Python base image": true of every task here
            warnings.filterwarnings("ignore", module=r"kfp\.local\..*")
        stdout, sys.stdout = sys.stdout, sys.stdout if verbose else _TaskLogFilter(sys.stdout)
        try:
            return pipeline(**arguments)
        finally:
            sys.stdout.flush()
            sys.stdout = stdout


class _TaskLogFilter:
    """A stdout that leaves out what KFP's executor logs for every task before the task's own output (the
    executor input, ``Got executor_input:`` and a page of JSON under it; where it found the component) from the
    task logs kfp.local prints; everything else passes through, line by line."""

    MARKER = "Got executor_input:"
    DROPPED = ("INFO]: Looking for component `", 'INFO]: Loading KFP component "')

    def __init__(self, out) -> None:
        self.out, self._pending, self._closing = out, "", None

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        if self._closing is not None:  # inside the JSON: it ends at the "}" indented as its "{"
            if self._closing == "":
                self._closing = line[: len(line) - len(line.lstrip())] + "}"
            elif line.rstrip() == self._closing:
                self._closing = None
            return
        if line.rstrip().endswith(self.MARKER):
            self._closing = ""
            return
        if any(d in line for d in self.DROPPED):
            return
        self.out.write(line + "\n")

    def flush(self) -> None:
        if self._pending and self._closing is None:
            self.out.write(self._pending)
            self._pending = ""
        self.out.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno: the real stream's
        return getattr(self.out, name)


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
    from dcgrpo.steps import EVAL_METRICS_TAG, LAMBDA_KEY, ROUND_DISCREPANCY
    from dcgrpo.tracking import mlflow_client

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
    """Why a method was not the one registered (``registry.rank_methods``' rule, as ``stages.registration.best_method_index`` applies it), saying so when it was a tie."""
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
    import shlex
    import sys

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
    import os
    import time

    from rich.console import Console
    from rich.table import Table

    from dcgrpo.config import load_config
    from dcgrpo.mlflow_server import start_local_server, stop_local_server
    from dcgrpo.steps import LAMBDA_KEY, ROUND_DISCREPANCY

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
    console = Console(width=max(Console().width, 150))
    # vLLM logs every engine start and weight sync at INFO/WARNING, and transformers draws a progress bar for every
    # model it loads or saves; kfp.local echoes it all. -v keeps them.
    # Libraries' deprecation notices about their own dependencies (vLLM on torch.distributed) and torch's C++ notes
    # (NUMA binding) repeat at every engine start of every task: nothing a demo user can act on.
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    t0 = time.time()
    try:
        run_local(arguments, root / "kfp", verbose=verbose)
        wall = time.time() - t0
        rows = summarize_pipeline_run(uri, cfg, int(t0 * 1000))
        experiment_id = _experiment_id(uri, cfg.tracking.experiment)
    finally:
        if proc is not None and not keep_server:
            stop_local_server(proc)
    gate = cfg.eval.gate_metric
    table = Table(title=f"dcgrpo demo: {preset}, methods {', '.join(arguments['methods'])}, {wall:.0f} s")
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
    reports = _reports(root / "kfp", t0)
    if reports:  # KFP names the artifact file "report": a browser shows it as text without the .html
        console.print("evaluation reports (open in a browser; KFP's artifacts copied from the task folders):")
        (root / "reports").mkdir(parents=True, exist_ok=True)
        for method, path in reports:
            page = root / "reports" / f"{method}.html"
            page.write_bytes(path.read_bytes())
            console.print(f"  {method}: {page.as_uri()}", soft_wrap=True)
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
    return rows


def _experiment_id(uri: str, name: str) -> str | None:
    from dcgrpo.tracking import mlflow_client

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
