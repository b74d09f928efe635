"""MLflow model registry: register, gate against the champion, promote, render serving manifests.

Lifecycle of a model version (aliases, not the deprecated stages):

    register  -> version N with tags (run, metrics, lambda, d, config hash, quantization), alias ``challenger``
    promote   -> reads challenger + champion, checks the gate, writes the decision as tags,
                 then moves ``champion`` to N in ONE call (MLflow aliases are unique per model:
                 never two champions), or leaves everything as it was
    serve     -> KServe InferenceService / `vllm serve` Deployment for ``models:/name@champion``

Failure rules: a registration that fails after the version exists deletes that
version; a promotion that fails before the alias move leaves the champion where
it was and records ``promotion.decision=failed`` on the challenger.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.config import RegistryConfig
from dcgrpo.errors import DcgrpoError

log = logging.getLogger(__name__)

# Tag keys (one place, so the gate and the UI read the same names).
TAG_RUN_ID = "run_id"
TAG_METRICS = "eval_metrics"  # JSON {metric: value}: metric keys may hold characters tag keys cannot ("@")
TAG_LAMBDA = "dc/lambda_final"
TAG_DISCREPANCY = "dc/discrepancy_final"
TAG_CONFIG_HASH = "config_hash"
TAG_QUANTIZATION = "quantization"
TAG_STORAGE_URI = "storage_uri"
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_COMPARED_TO = "promotion.compared_to"
TAG_DECIDED_AT = "promotion.decided_at"


class RegistryError(DcgrpoError, RuntimeError):
    """Registration or promotion cannot proceed (names the model, version and reason)."""


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _tag_key(metric: str) -> str:
    """A metric name as a valid tag key (MLflow allows only [/\\w.\\- :])."""
    return "metric." + re.sub(r"[^/\w.\- :]", "_", metric)


def version_tags(
    run_id: str,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str,
    storage_uri: str | None = None,
) -> dict[str, str]:
    """The tags a model version carries: what the gate compares and what an operator reads."""
    tags = {
        TAG_RUN_ID: run_id,
        TAG_METRICS: json.dumps({k: float(v) for k, v in sorted(metrics.items())}),
        TAG_LAMBDA: repr(float(final_lambda)),
        TAG_DISCREPANCY: repr(float(discrepancy)),
        TAG_CONFIG_HASH: config_hash,
        TAG_QUANTIZATION: quantization,
    }
    tags.update({_tag_key(k): repr(float(v)) for k, v in metrics.items()})
    if storage_uri:
        tags[TAG_STORAGE_URI] = storage_uri
    return tags


def register_model(
    mlflow_client,
    name: str,
    run_id: str,
    model_dir: str,
    *,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str = "fp8",
    artifact_path: str = "model",
    alias: str = "challenger",
    endpoint_url: str | None = None,
):
    """Log ``model_dir`` (local or s3://) as run artifacts, register it as a new version, alias it.

    Tags go in with ``create_model_version`` (one request); the alias follows.
    If the alias cannot be set the new version is deleted again, so a failed
    registration leaves the registry as it was.
    """
    from mlflow.exceptions import MlflowException

    for key, value in {"final_lambda": final_lambda, "discrepancy": discrepancy, **metrics}.items():
        if not math.isfinite(float(value)):
            raise RegistryError(f"{name}: {key} is {value}; refusing to register a version with a non-finite value")
    run = mlflow_client.get_run(run_id)
    with storage.local_copy(model_dir, endpoint_url) as local:
        if not (Path(local) / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a model directory (no config.json)")
        mlflow_client.log_artifacts(run_id, str(local), artifact_path)
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = version_tags(
        run_id, metrics, final_lambda, discrepancy, config_hash, quantization,
        storage_uri=str(model_dir) if storage.is_s3(model_dir) else None,
    )  # fmt: skip
    mv = mlflow_client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id, tags=tags
    )
    try:
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
    except Exception:
        mlflow_client.delete_model_version(name, mv.version)
        raise
    log.info("registry: %s version %s registered (%s), alias %s", name, mv.version, quantization, alias)
    return mv


def _alias_version(mlflow_client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _metric(mv, metric: str) -> float | None:
    try:
        value = json.loads(mv.tags.get(TAG_METRICS, "{}")).get(metric)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {mv.version}: tag {TAG_METRICS} is not JSON: {exc}") from exc
    return None if value is None else float(value)


@dataclass
class Decision:
    """The outcome of one promotion attempt (also written as tags on the challenger)."""

    model_name: str
    challenger: str
    champion_before: str | None
    promoted: bool
    reason: str

    @property
    def champion_after(self) -> str | None:
        return self.challenger if self.promoted else self.champion_before


def gate(challenger, champion, gate_metric: str, max_discrepancy: float) -> tuple[bool, str]:
    """Pure decision: (promote?, reason). No registry writes.

    Promote when the challenger has the gate metric, its final discrepancy is
    within ``max_discrepancy``, and its metric is >= the champion's (or there
    is no champion yet).
    """
    value = _metric(challenger, gate_metric)
    if value is None or not math.isfinite(value):
        return False, f"challenger v{challenger.version} has no finite {gate_metric}"
    d = float(challenger.tags.get(TAG_DISCREPANCY, "nan"))
    if not math.isfinite(d) or d > max_discrepancy:
        return False, f"discrepancy {d:.4g} outside budget {max_discrepancy:.4g}"
    if champion is None:
        return True, f"first champion ({gate_metric}={value:.4g}, discrepancy {d:.4g})"
    best = _metric(champion, gate_metric)
    if best is not None and value < best:
        return False, f"{gate_metric} {value:.4g} < champion v{champion.version}'s {best:.4g}"
    shown = "n/a" if best is None else f"{best:.4g}"
    return True, f"{gate_metric} {value:.4g} >= champion v{champion.version}'s {shown}; discrepancy {d:.4g}"


def promote(
    mlflow_client,
    name: str,
    gate_metric: str,
    max_discrepancy: float,
    force: bool = False,
    champion_alias: str = "champion",
    challenger_alias: str = "challenger",
) -> Decision:
    """Compare the challenger with the champion and move ``champion`` if the gate passes (or ``force``).

    Order: read both versions -> decide -> write decision tags -> one alias
    move. Any exception before the move leaves the champion alias untouched;
    the challenger then carries ``promotion.decision=failed`` (best effort).
    """
    challenger = _alias_version(mlflow_client, name, challenger_alias)
    if challenger is None:
        raise RegistryError(f"{name}: no version has alias {challenger_alias!r}; register one first")
    champion = _alias_version(mlflow_client, name, champion_alias)
    before = None if champion is None else str(champion.version)
    if before == str(challenger.version):
        return Decision(name, str(challenger.version), before, False, "challenger is already the champion")

    ok, reason = gate(challenger, champion, gate_metric, max_discrepancy)
    if force and not ok:
        ok, reason = True, f"forced (gate said: {reason})"
    decision = Decision(name, str(challenger.version), before, ok, reason)
    try:
        for key, value in {
            TAG_DECISION: "promoted" if ok else "rejected",
            TAG_REASON: reason,
            TAG_COMPARED_TO: before or "none",
            TAG_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }.items():
            mlflow_client.set_model_version_tag(name, challenger.version, key, value)
        if ok:
            # The commit point: a single alias move (aliases are unique, so the old champion loses it).
            mlflow_client.set_registered_model_alias(name, champion_alias, challenger.version)
    except Exception as exc:
        try:
            mlflow_client.set_model_version_tag(name, challenger.version, TAG_DECISION, "failed")
            mlflow_client.set_model_version_tag(name, challenger.version, TAG_REASON, f"{type(exc).__name__}: {exc}")
        except Exception:  # the registry may be what failed; the alias has not moved either way
            log.warning("registry: could not record the failed promotion of %s v%s", name, challenger.version)
        raise
    log.info("registry: %s v%s %s: %s", name, challenger.version, "PROMOTED" if ok else "not promoted", reason)
    return decision


def storage_uri(mv, cfg: RegistryConfig) -> str:
    """Where a serving runtime fetches a version from: its ``storage_uri`` tag, else its source mapped
    from ``mlflow-artifacts:/`` onto the server's artifacts destination."""
    if mv.tags.get(TAG_STORAGE_URI):
        return mv.tags[TAG_STORAGE_URI]
    source = mv.source
    if source.startswith("mlflow-artifacts:"):
        if not cfg.artifacts_destination:
            raise RegistryError(
                f"version {mv.version}: source {source} is served by MLflow; set registry.artifacts_destination "
                "to the server's --artifacts-destination to serve it"
            )
        rel = re.sub(r"^mlflow-artifacts:(//[^/]*)?/", "", source)
        return storage.join(cfg.artifacts_destination, rel)
    return source


# --- serving manifests ---------------------------------------------------------------------------------------------


def _k8s_name(model_name: str) -> str:
    name = re.sub(r"[^a-z0-9-]", "-", model_name.lower()).strip("-")
    return name[:45] or "model"


def vllm_args(cfg: RegistryConfig, served_name: str, quantization: str) -> list[str]:
    """vLLM engine args for serving the champion (FP8: compressed-tensors, read from the checkpoint)."""
    args = [
        f"--served-model-name={served_name}",
        f"--max-model-len={cfg.serving_max_model_len}",
        f"--gpu-memory-utilization={cfg.serving_gpu_memory_utilization}",
        f"--tensor-parallel-size={cfg.serving_gpus}",
    ]
    if quantization == "fp8":
        args.append("--quantization=compressed-tensors")
    return args


def _labels(model_name: str, version: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": _k8s_name(model_name), "app.kubernetes.io/part-of": "dcgrpo",
            "dcgrpo/model-version": str(version)}  # fmt: skip


def render_inference_service(
    model_name: str, version: str, uri: str, cfg: RegistryConfig, quantization: str = "fp8"
) -> dict[str, Any]:
    """A KServe InferenceService on the Hugging Face runtime with its vLLM backend."""
    name = _k8s_name(model_name)
    gpu = {"nvidia.com/gpu": str(cfg.serving_gpus)}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": cfg.serving_namespace,
            "labels": _labels(model_name, version),
            "annotations": {"dcgrpo/registered-model": f"models:/{model_name}/{version}"},
        },
        "spec": {
            "predictor": {
                "serviceAccountName": cfg.serving_service_account,
                "model": {
                    "modelFormat": {"name": "huggingface"},
                    "storageUri": uri,
                    "args": ["--backend=vllm", f"--model_name={name}", *vllm_args(cfg, name, quantization)[1:]],
                    "resources": {
                        "requests": {"cpu": "4", "memory": "32Gi", **gpu},
                        "limits": {"cpu": "8", "memory": "64Gi", **gpu},
                    },
                },
            }
        },
    }


def render_vllm_deployment(
    model_name: str, version: str, uri: str, cfg: RegistryConfig, quantization: str = "fp8"
) -> list[dict[str, Any]]:
    """The KServe-free alternative: a `vllm serve` Deployment (model fetched by an init container) + Service."""
    name = _k8s_name(model_name)
    labels = _labels(model_name, version)
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "vllm"}
    gpu = {"nvidia.com/gpu": str(cfg.serving_gpus)}
    models = {"name": "models", "mountPath": "/mnt/models"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": f"{name}-vllm", "namespace": cfg.serving_namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": {
                    "serviceAccountName": cfg.serving_service_account,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
                    "initContainers": [
                        {
                            "name": "fetch-model",
                            "image": cfg.storage_initializer_image,
                            "args": [uri, "/mnt/models"],
                            "envFrom": [{"secretRef": {"name": "dcgrpo-s3"}}],
                            "volumeMounts": [models],
                        }
                    ],
                    "containers": [
                        {
                            "name": "vllm",
                            "image": cfg.vllm_image,
                            "command": ["vllm", "serve", "/mnt/models"],
                            "args": [*vllm_args(cfg, name, quantization), "--port=8000"],
                            "env": [{"name": "HOME", "value": "/tmp"}],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
                            "resources": {
                                "requests": {"cpu": "4", "memory": "32Gi", **gpu},
                                "limits": {"cpu": "8", "memory": "64Gi", **gpu},
                            },
                            "volumeMounts": [models, {"name": "shm", "mountPath": "/dev/shm"}],
                        }
                    ],
                    "volumes": [
                        {"name": "models", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"{name}-vllm", "namespace": cfg.serving_namespace, "labels": labels},
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    return [deployment, service]


def render_champion_manifests(mlflow_client, cfg: RegistryConfig, out_dir: str | None = None) -> dict[str, str]:
    """Render both serving options for ``models:/<name>@champion``; write them (local or s3://) if ``out_dir``.

    Returns ``{filename: yaml text}``.
    """
    import yaml

    mv = _alias_version(mlflow_client, cfg.model_name, cfg.champion_alias)
    if mv is None:
        raise RegistryError(f"{cfg.model_name}: no version has alias {cfg.champion_alias!r}; nothing to serve")
    uri = storage_uri(mv, cfg)
    quantization = mv.tags.get(TAG_QUANTIZATION, "fp8")
    docs = {
        "inferenceservice.yaml": yaml.safe_dump(
            render_inference_service(cfg.model_name, mv.version, uri, cfg, quantization), sort_keys=False
        ),
        "vllm-deployment.yaml": yaml.safe_dump_all(
            render_vllm_deployment(cfg.model_name, mv.version, uri, cfg, quantization), sort_keys=False
        ),
    }
    if out_dir:
        for fname, text in docs.items():
            storage.write_text(storage.join(out_dir, fname), text)
    return docs
