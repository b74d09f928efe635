"""The deployment contract: every name a cluster and this code must agree on, in one place.

Images, Secrets and their keys, the GPU pool's node label and tolerations, the
namespace, the pipeline's service account and the PVCs. The compiled pipeline
(``dcgrpo compile``), the rendered RayJob (``dcgrpo train-verl``), the
manifests under ``manifests/`` and the README come from or agree with
``DeploymentContract()`` (tests/test_contract.py checks every one of them), so
a rename here cannot leave another place behind.

It is not part of the run config: where a run is deployed does not change what
it trains, so it stays out of ``RunConfig.config_hash``. A compiled pipeline
carries its contract to the steps as the ``DCGRPO_DEPLOYMENT`` env var (JSON);
``current()`` reads it back, so a RayJob started by a pipeline step uses the
images, pool and secrets the pipeline was compiled with.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dcgrpo import __version__

ENV_VAR = "DCGRPO_DEPLOYMENT"
"""Env var holding the contract (JSON) in the pipeline's pods."""
POD_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
"""Where Kubernetes tells a pod its own namespace (a Kubeflow profile's, in multi-user Kubeflow)."""

REGISTRY = "ghcr.io/dcgrpo"
"""Image registry; images are ``<REGISTRY>/<name>:<package version>``, name = the suffix of containers/Dockerfile.<name>."""


def image(name: str, registry: str = REGISTRY, tag: str = __version__) -> str:
    """``<registry>/<name>:<tag>``: the tag of ``containers/Dockerfile.<name>`` built by ``make images``."""
    return f"{registry}/{name}:{tag}"


class DeploymentContract(BaseModel):
    """Names shared by the compiled pipeline, the RayJob, the manifests and the cluster."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    light_image: str = image("light")
    """Light pipeline steps (prepare, select, register, promote, mark-failed): no torch, no vLLM."""
    gpu_image: str = image("gpu")
    """GPU pipeline steps (warm start, built-in rounds, export, evaluate): CUDA vLLM = the serving engine."""
    verl_image: str = image("verl")
    """Every Ray node of a verl RayJob (verl with its own pinned vLLM)."""
    mlflow_image: str = image("light")
    """The MLflow tracking server (manifests/mlflow; extra ``server``)."""
    namespace: str = "kubeflow"
    """Where pipeline runs, RayJobs, MLflow and the PVCs live. Multi-user Kubeflow: the profile namespace
    (``dcgrpo submit --namespace``; a step in a pod uses its own pod's namespace)."""
    service_account: str = ""
    """The runs' service account. Empty (default): the account Kubeflow gives pipeline runs, which already may do
    what KFP's driver/launcher and Argo's executor do in every pod (read the ``kfp-launcher`` ConfigMap and the
    artifact store's Secret, get pods, create/patch ``workflowtaskresults``); manifests/rbac binds our extra verbs
    (RayJobs; InferenceServices in the serving namespace) to both of Kubeflow's run accounts, ``run_accounts``.
    A name: an account of your own, which then needs all of the above too."""
    run_accounts: tuple[str, ...] = ("pipeline-runner", "default-editor")
    """Kubeflow's run accounts: standalone KFP runs as ``pipeline-runner`` (in the KFP namespace), multi-user
    Kubeflow as ``default-editor`` (in the profile namespace). manifests/rbac binds our verbs to both."""
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"dcgrpo/pool": "gpu"})
    """Label of the GPU node pool (label your pool's nodes with it: see the README)."""
    gpu_tolerations: tuple[dict[str, str], ...] = (
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    )
    gpu_resource: str = "nvidia.com/gpu"
    s3_secret: str = "dcgrpo-s3"
    s3_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")
    """Keys of ``s3_secret``; each becomes the env var of the same name (the names boto3, MinIO and KServe read)."""
    mlflow_secret: str = "dcgrpo-mlflow"
    mlflow_keys: tuple[str, ...] = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
    """Keys of ``mlflow_secret`` (basic auth or a bearer token: MLflow reads whichever is set)."""
    hf_secret: str = "dcgrpo-hf"
    hf_keys: tuple[str, ...] = ("HF_TOKEN",)
    """Keys of ``hf_secret``: a Hugging Face token for gated or private base models (``model.path`` a Hub id),
    read where models are loaded (the GPU steps and the Ray nodes)."""
    postgres_secret: str = "mlflow-postgres"
    postgres_keys: tuple[str, ...] = ("POSTGRES_USER", "POSTGRES_PASSWORD")
    """MLflow's backend store (manifests/mlflow only)."""
    model_cache_pvc: str = "dcgrpo-model-cache"
    model_cache_mount: str = "/cache"
    checkpoint_pvc: str = "dcgrpo-checkpoints"
    """verl's checkpoint volume: the train rounds and every Ray node mount it ("" = none, single node only)."""
    checkpoint_mount: str = "/checkpoints"
    """Where it is mounted: must equal ``verl.checkpoint_dir``."""
    serving_namespace: str = "dcgrpo"
    serving_service_account: str = "dcgrpo-serving"

    def secret_env(self) -> dict[str, tuple[str, str]]:
        """Env var -> (secret, key) for every pod that trains or loads a model (GPU steps, Ray nodes): S3, MLflow
        and Hugging Face credentials (env var = key). The light steps take ``light_secret_env()``."""
        return self.light_secret_env() | {k: (self.hf_secret, k) for k in self.hf_keys}

    def light_secret_env(self) -> dict[str, tuple[str, str]]:
        """Env var -> (secret, key) for the light steps: S3 and MLflow credentials (they load no model)."""
        return {k: (self.s3_secret, k) for k in self.s3_keys} | {k: (self.mlflow_secret, k) for k in self.mlflow_keys}

    def to_env(self) -> str:
        """The JSON the pipeline puts in ``DCGRPO_DEPLOYMENT``: the fields that differ from the defaults (the images
        are tagged with this package's version, so their defaults are the compiling version's; every round
        executor carries this, so a full dump would cost ~1 KB of the compiled YAML each)."""
        return self.model_dump_json(exclude_defaults=True)


def pod_namespace() -> str | None:
    """The namespace this process's pod runs in, None outside Kubernetes."""
    try:
        return POD_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


def current() -> DeploymentContract:
    """The contract of this process: the pipeline's (``$DCGRPO_DEPLOYMENT``) or the defaults.

    Inside a pod the namespace is the pod's own: a pipeline run in a Kubeflow
    profile namespace starts its RayJobs there, where its service account may create them.
    """
    raw = os.environ.get(ENV_VAR)
    contract = DeploymentContract.model_validate_json(raw) if raw else DeploymentContract()
    ns = pod_namespace()
    return contract.model_copy(update={"namespace": ns}) if ns else contract
