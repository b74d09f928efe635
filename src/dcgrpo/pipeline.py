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
from dcgrpo.config import resolve_run_parameters

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


def run_local(arguments: dict[str, Any], pipeline_root: str | Path) -> Any:
    """Run the whole pipeline in-process with ``kfp.local`` (SubprocessRunner, this venv).

    Kubernetes settings (GPUs, node pools, secrets, PVCs) are ignored locally.
    """
    import kfp.local

    from dcgrpo.pipelines.dc_grpo import ClusterSettings, build_pipeline

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    log.info("running the pipeline locally with %s", json.dumps(arguments))
    # No retries locally: a failure here is a bug or bad input, not a preempted node. Only the branch of the
    # asked round count is compiled in (rounds 0 = the preset's, as the pipeline's first step resolves it).
    rounds = resolve_run_parameters(
        arguments.get("preset", ""), arguments.get("overrides"), arguments.get("rounds") or 0, "", 10**9
    ).rounds
    return build_pipeline(ClusterSettings(retries=0, max_rounds=rounds, containerized=False))(**arguments)


def _pipeline_runs(client, experiment: str, since_ms: int) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}")
    return [r for r in runs if r.data.tags.get("method")]


def summarize_pipeline_run(tracking_uri: str, cfg, since_ms: int) -> list[dict[str, Any]]:
    """Per method: accuracy before/after training, eval gate metric, discrepancy, lambda,
    registered version and aliases (read back from MLflow, the record of the run)."""
    from dcgrpo.steps import EVAL_METRICS_TAG
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
        decision = mv.tags.get("promotion.reason", "") if mv is not None else "not selected"
        rows.append({
            "decision": decision,
            "method": run.data.tags["method"], "run_id": run.info.run_id, "status": run.info.status,
            "acc_start": acc[0].value if acc else float("nan"), "acc_end": acc[-1].value if acc else float("nan"),
            "gate": evals.get(cfg.eval.gate_metric, float("nan")),
            "discrepancy": run.data.metrics.get("dc/discrepancy_mean", float("nan")),
            "lambda": run.data.metrics.get("dc/lambda", float("nan")),
            "version": mv.version if mv is not None else "-", "aliases": ",".join(aliases) or "-",
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["method"])


def demo(
    preset: str = "tiny-cpu",
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    rounds: int | None = None,
    data_uri: str = "",
    keep_server: bool = False,
) -> list[dict[str, Any]]:
    """The main job: the whole pipeline through ``kfp.local`` on this machine, then a summary.

    Starts a local MLflow server (sqlite, under ``storage.root/mlflow``) when no
    tracking URI is configured; prints how to open the UI on the results.
    """
    import os
    import time

    from rich.console import Console
    from rich.table import Table

    from dcgrpo.config import load_config
    from dcgrpo.mlflow_server import start_local_server, stop_local_server

    overrides = list(overrides or [])
    cfg = load_config(preset=preset, overrides=overrides)
    if storage.is_s3(cfg.storage.root):
        raise ValueError("dcgrpo demo runs locally: storage.root must be a local directory")
    root = Path(cfg.storage.root).resolve()
    uri, proc = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), None
    if not uri:
        uri, proc = start_local_server(root / "mlflow")
        log.info("local MLflow server at %s", uri)
    console = Console(width=max(Console().width, 120))
    # vLLM logs every engine start and weight sync at INFO/WARNING; kfp.local echoes it all.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    t0 = time.time()
    try:
        arguments = pipeline_arguments(preset, overrides, methods, rounds, data_uri, mlflow_uri=uri)
        run_local(arguments, root / "kfp")
        wall = time.time() - t0
        rows = summarize_pipeline_run(uri, cfg, int(t0 * 1000))
    finally:
        if proc is not None and not keep_server:
            stop_local_server(proc)
    table = Table(title=f"dcgrpo demo: {preset}, methods {', '.join(arguments['methods'])}, {wall:.0f} s")
    for col in (
        "method",
        "val acc start -> end",
        cfg.eval.gate_metric + " (fp8)",
        "d (last step)",
        "lambda",
        "version",
        "aliases",
    ):
        table.add_column(col)
    for r in rows:
        table.add_row(r["method"], f"{r['acc_start']:.3f} -> {r['acc_end']:.3f}", f"{r['gate']:.3f}",
                      f"{r['discrepancy']:.2e}", f"{r['lambda']:.3g}", str(r["version"]), r["aliases"])  # fmt: skip
    console.print(table)
    console.print(
        f"promotion gate: {cfg.eval.gate_metric} >= champion's, mean d <= {cfg.promotion_discrepancy_limit():.3g}"
    )
    for r in rows:
        console.print(f"  {r['method']}: {r['decision']}")
    console.print(f"pipeline artifacts: {root / 'kfp'}")
    db = root / "mlflow" / "mlflow.db"
    if proc is not None and keep_server:
        console.print(f"MLflow UI (still running): {uri}")
    elif proc is not None:
        console.print(
            f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///{db} --port 5000  (http://127.0.0.1:5000)"
        )
    else:
        console.print(f"MLflow: {uri}")
    return rows
