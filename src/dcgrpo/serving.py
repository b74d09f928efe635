"""Serving the champion: render its KServe InferenceService (or a plain `vllm serve` Deployment) and apply it.

``registry.promote(..., serve=server(cfg, name))`` applies the promoted
version's InferenceService before it moves the ``champion`` alias (why that
order: ``registry.promotion._commit``); ``dcgrpo.stages.registration`` passes
it. Serving sits above the registry: it imports the registry, never the
reverse. The object is applied by server-side apply as
field manager ``dcgrpo``: applying the same version twice changes nothing,
applying another version re-points the one InferenceService of the model.

The storage URI is what KServe's storage initializer fetches: a version's
``storage_uri`` tag (an s3:// export), else its MLflow source mapped from
``mlflow-artifacts:/`` onto the server's artifacts bucket
(``registry.artifacts_destination``, default manifests/mlflow's).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

import yaml

from dcgrpo import storage
from dcgrpo.config import RegistryConfig
from dcgrpo.errors import DcgrpoError, ServiceUnavailable
from dcgrpo.registry import TAG_QUANTIZATION, TAG_STORAGE_URI, RegistryError, alias_version

log = logging.getLogger(__name__)

FIELD_MANAGER = "dcgrpo"
APPLY_PATCH = "application/apply-patch+yaml"
FETCHABLE = ("s3://", "gs://", "hf://", "pvc://", "https://", "http://")
"""storageUri schemes KServe's storage initializer fetches; a local path on the promoting machine is not one."""


class ServingError(DcgrpoError, RuntimeError):
    """The cluster refused the InferenceService (names the object and the API server's reason)."""


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


# --- rendering -------------------------------------------------------------------------------------------------------


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


def _annotations(model_name: str, version: str, quantization: str) -> dict[str, str]:
    """Which registry version the object serves, readable with ``kubectl get isvc -o yaml``."""
    return {"dcgrpo/registered-model": f"models:/{model_name}/{version}", "dcgrpo/model-name": model_name,
            "dcgrpo/model-version": str(version), "dcgrpo/quantization": quantization}  # fmt: skip


def _labels(model_name: str, version: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": _k8s_name(model_name), "app.kubernetes.io/part-of": "dcgrpo",
            "dcgrpo/model-version": str(version)}  # fmt: skip


def render_inference_service(
    model_name: str, version: str, uri: str, cfg: RegistryConfig, quantization: str = "fp8"
) -> dict[str, Any]:
    """A KServe InferenceService on the Hugging Face runtime with its vLLM backend.

    One object per registered model (its name does not carry the version), so
    promoting re-points the same InferenceService: KServe rolls out the new
    revision and keeps the old one serving until the new one is ready.
    """
    name = _k8s_name(model_name)
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": cfg.serving_namespace,
            "labels": _labels(model_name, version),
            "annotations": _annotations(model_name, version, quantization),
        },
        "spec": {
            "predictor": {
                "serviceAccountName": cfg.serving_service_account,
                "model": {
                    "modelFormat": {"name": "huggingface"},
                    "storageUri": uri,
                    "args": ["--backend=vllm", f"--model_name={name}", *vllm_args(cfg, name, quantization)[1:]],
                    "resources": _resources(cfg),
                },
            }
        },
    }


def _resources(cfg: RegistryConfig) -> dict[str, Any]:
    gpu = {"nvidia.com/gpu": str(cfg.serving_gpus)}
    return {"requests": {"cpu": "4", "memory": "32Gi", **gpu}, "limits": {"cpu": "8", "memory": "64Gi", **gpu}}


def _vllm_pod_spec(name: str, uri: str, cfg: RegistryConfig, quantization: str) -> dict[str, Any]:
    """The pod of the plain Deployment: an init container fetches ``uri`` into /mnt/models, `vllm serve` reads it."""
    models = {"name": "models", "mountPath": "/mnt/models"}
    return {
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
                "resources": _resources(cfg),
                "volumeMounts": [models, {"name": "shm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [
            {"name": "models", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }


def render_vllm_deployment(
    model_name: str, version: str, uri: str, cfg: RegistryConfig, quantization: str = "fp8"
) -> list[dict[str, Any]]:
    """The KServe-free alternative: a `vllm serve` Deployment (model fetched by an init container) + Service."""
    name = _k8s_name(model_name)
    labels = _labels(model_name, version)
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "vllm"}
    metadata = {"name": f"{name}-vllm", "namespace": cfg.serving_namespace, "labels": labels}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels, **selector}},
                "spec": _vllm_pod_spec(name, uri, cfg, quantization),
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": dict(metadata),
        "spec": {"selector": selector, "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    return [deployment, service]


def render_champion_manifests(mlflow_client, cfg: RegistryConfig, out_dir: str | None = None) -> dict[str, str]:
    """Render both serving options for ``models:/<name>@champion``; write them (local or s3://) if ``out_dir``.

    Returns ``{filename: yaml text}``.
    """
    mv = alias_version(mlflow_client, cfg.model_name, cfg.champion_alias)
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


# --- applying ---------------------------------------------------------------------------------------------------------


def kube_api_client():
    """A ``kubernetes.client.ApiClient``: the pod's service account in the cluster, else the kubeconfig.

    Loaded into its own Configuration (not the client's global default), so
    a test's or a caller's client is never overwritten.
    """
    from kubernetes import client, config  # kubernetes: 0.9 s to load; only applying manifests needs it

    conf = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=conf)
    except config.ConfigException as in_cluster:
        try:
            config.load_kube_config(client_configuration=conf)
        except (config.ConfigException, OSError) as kubeconfig:
            raise ServiceUnavailable(
                f"no Kubernetes credentials to apply the InferenceService: not in a pod ({in_cluster}) and no "
                f"usable kubeconfig ($KUBECONFIG or ~/.kube/config: {kubeconfig})"
            ) from kubeconfig
    return client.ApiClient(conf)


def _isvc_path(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"/apis/{obj['apiVersion']}/namespaces/{meta['namespace']}/inferenceservices/{meta['name']}"


def _api_reason(exc) -> str:
    """The API server's own message (a Status object's ``message``), else the HTTP reason."""
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def apply_inference_service(obj: dict[str, Any], *, api_client=None) -> dict[str, Any]:
    """Server-side apply ``obj`` (field manager ``dcgrpo``, conflicts forced); returns the object as stored.

    Server-side apply creates or updates in one request and is all-or-nothing
    per object: a refused apply leaves the stored InferenceService as it was.
    Conflicts are forced because promotion owns these fields (a hand edit of
    storageUri must not keep an old model served).
    """
    from kubernetes.client.exceptions import ApiException  # kubernetes: 0.9 s to load; only applying manifests needs it
    from urllib3.exceptions import HTTPError  # urllib3: only applying manifests needs it

    api_client = api_client or kube_api_client()
    where = f"InferenceService {obj['metadata']['namespace']}/{obj['metadata']['name']}"
    try:
        return api_client.call_api(
            _isvc_path(obj), "PATCH",
            query_params=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            header_params={"Accept": "application/json", "Content-Type": APPLY_PATCH},
            body=obj, response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
        )  # fmt: skip
    except ApiException as exc:
        raise ServingError(f"{where}: apply refused, HTTP {exc.status}: {_api_reason(exc)}") from exc
    except HTTPError as exc:
        host = api_client.configuration.host
        raise ServiceUnavailable(f"{where}: Kubernetes API {host} unreachable ({exc})") from exc


def inference_service_for(mv, cfg: RegistryConfig, model_name: str) -> dict[str, Any]:
    """The InferenceService that serves model version ``mv``; refuses a URI KServe cannot fetch.

    Checked before anything is applied, so such a version never reaches the alias.
    """
    uri = storage_uri(mv, cfg)
    if not uri.startswith(FETCHABLE):
        raise RegistryError(
            f"{model_name} v{mv.version}: storage URI {uri!r} is not one KServe can fetch ({', '.join(FETCHABLE)}); "
            "register an s3:// export or use an MLflow server with S3 artifacts"
        )
    quantization = mv.tags.get(TAG_QUANTIZATION, "fp8")
    return render_inference_service(model_name, str(mv.version), uri, cfg, quantization)


def server(cfg: RegistryConfig, model_name: str, api_client=None) -> Callable[[Any], dict[str, Any]]:
    """The ``serve`` callback for ``registry.promote``/``rollback``: render and apply a version's InferenceService.

    Kubernetes credentials are loaded here, before the registry is touched: missing ones fail with nothing written.
    """
    api_client = api_client or kube_api_client()

    def serve(mv) -> dict[str, Any]:
        obj = inference_service_for(mv, cfg, model_name)
        stored = apply_inference_service(obj, api_client=api_client)
        log.info("serving: applied InferenceService %s/%s -> %s v%s (%s)", obj["metadata"]["namespace"],
                 obj["metadata"]["name"], model_name, mv.version, obj["spec"]["predictor"]["model"]["storageUri"])  # fmt: skip
        return stored

    return serve
