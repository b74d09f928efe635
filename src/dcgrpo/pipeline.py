"""Compile, submit, schedule and run locally the `dc_grpo` Kubeflow pipeline.

The pipeline definition lives in ``pipelines/dc_grpo.py`` and its components
in ``components/``; this module is what the CLI and tests call.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from dcgrpo.config import ConfigError, load_config
from dcgrpo.deploy import DeploymentContract
from dcgrpo.errors import ServiceUnavailable
from dcgrpo.stages.parameters import PACKAGES, check_train_pod, resolve_run_parameters, train_pod

log = logging.getLogger(__name__)

COMPILED_DIR = Path(str(resources.files("dcgrpo.pipelines") / "compiled"))
"""The compiled pipelines, package data of ``dcgrpo.pipelines`` (``pipelines/compiled/`` in a checkout): found the
same way in a checkout, an installed wheel and the light image. One per train pod (``stages.parameters.PACKAGES``)."""
COMPILED_PATH = COMPILED_DIR / PACKAGES["gpu"]
COMPILED_NAME = COMPILED_PATH.name


def package_for(arguments: dict[str, Any]) -> Path:
    """The packaged pipeline a run of these arguments needs: its preset's training on a GPU pod or on a RayJob."""
    cfg = load_config(preset=arguments.get("preset") or None, overrides=list(arguments.get("overrides") or []))
    return COMPILED_DIR / PACKAGES[train_pod(cfg)]


def default_compile_output(pod: str = "gpu") -> Path:
    """Where ``dcgrpo compile`` writes without ``--output``: the packaged file in a checkout (editable install),
    else ``./<package name>`` (an installed package is not the user's to rewrite, and may be read-only)."""
    in_checkout = (COMPILED_DIR.parents[1] / "pyproject.toml").is_file() and os.access(COMPILED_DIR, os.W_OK)
    return (COMPILED_DIR if in_checkout else Path.cwd()) / PACKAGES[pod]


def compile_yaml(out_path: str | Path, contract: Any = None, **settings: Any) -> Path:
    """Compile the pipeline (with ``ClusterSettings(contract, **settings)``; ``train_pod`` picks the package) to
    ``out_path``. ``contract``: a ``dcgrpo.deploy.DeploymentContract`` (default: the names manifests/ use)."""
    # kfp: 0.9 s to load; only compile, submit, schedule and the demo need it
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
    # kfp: 0.9 s to load; only compile, submit, schedule and the demo need it
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2  # kfp: as above

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


def compiled_train_pod(package: str | Path) -> str:
    """The train pod a compiled package was built for: the constant ``train_pod`` its prepare-data task gets."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    for component in spec.get("components", {}).values():
        for task in component.get("dag", {}).get("tasks", {}).values():
            pod = task.get("inputs", {}).get("parameters", {}).get("train_pod", {})
            if "runtimeValue" in pod:
                return pod["runtimeValue"]["constant"]
    raise ConfigError(f"{package}: no prepare-data task with a train_pod; is this the dc_grpo pipeline?")


def check_package(arguments: dict[str, Any], package: str | Path) -> None:
    """Refuse (``ConfigError``) a package whose train task cannot run the arguments' preset, before any request."""
    cfg = load_config(preset=arguments.get("preset") or None, overrides=list(arguments.get("overrides") or []))
    check_train_pod(cfg, compiled_train_pod(package))


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
) -> dict[str, Any]:
    """Pipeline parameters, validated through the one config before anything is submitted."""
    overrides = list(overrides or [])
    load_config(preset=preset, overrides=overrides)  # fail here, not in a pod
    methods = methods or ["grpo", "dc-grpo"]
    for method in methods:
        load_config(preset=preset, overrides=[*overrides, f"method.name={method}"])
    resolved = resolve_run_parameters(preset, overrides, rounds or 0, model_name or "")
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


HEALTH_PATH = "/apis/v2beta1/healthz"


def check_kfp(host: str, token: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """One quick request to ``<host>/apis/v2beta1/healthz`` before ``kfp.Client`` (which retries for minutes).

    Returns the health JSON (``multi_user`` says whether runs need a namespace).
    Raises ``ServiceUnavailable`` naming the host: unreachable, token refused, or no KFP API there.
    """
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
    import kfp  # kfp: 0.9 s to load; only compile, submit, schedule and the demo need it

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
    package: Path | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    wait_s: float | None = None,
) -> tuple[str, str | None]:
    """Submit one run of the compiled pipeline; returns (run id, final state or None when not waited for).

    ``package``: default, the packaged one for the preset (``package_for``). ``wait_s``: follow the run up to that
    many seconds (``wait_for_run_completion``).
    """
    package = package or package_for(arguments)
    check_package(arguments, package)
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
    package: Path | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> str:
    """A recurring run: max concurrency 1 and no catch-up (a missed slot is not replayed).

    ``cron`` has KFP's 6 fields, seconds first (``0 0 3 * * 0``: Sundays 03:00).
    """
    if len(cron.split()) != 6:
        raise ValueError(f"cron {cron!r}: KFP expects 6 fields, seconds first (e.g. '0 0 3 * * 0')")
    package = package or package_for(arguments)
    check_package(arguments, package)
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
    import kfp.local  # kfp: 0.9 s to load; only compile, submit, schedule and the demo need it

    from dcgrpo.pipelines.dc_grpo import ClusterSettings, build_pipeline  # kfp: as above

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    log.info("running the pipeline locally with %s", json.dumps(arguments))
    # No retries locally: a failure here is a bug or bad input, not a preempted node.
    cfg = load_config(preset=arguments.get("preset") or None, overrides=list(arguments.get("overrides") or []))
    pipeline = build_pipeline(ClusterSettings(retries=0, train_pod=train_pod(cfg), containerized=False))
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
