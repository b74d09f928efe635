"""manifests/ (kustomize bases), checked without a cluster or a Docker daemon.

- every kustomization builds (`kubectl kustomize` when installed, else a Python equivalent), with
  the secret env files filled from their committed templates; no duplicate objects;
- core kinds validate against the Kubernetes OpenAPI schema (kubernetes-validate);
- custom resources (InferenceService, RayJob) have their required fields;
- the rendered serving manifests validate the same way;
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from dcgrpo.config import RegistryConfig
from dcgrpo.serving import render_inference_service, render_vllm_deployment

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.31.0"
CUSTOM_KINDS = {"InferenceService", "RayJob"}


def _kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))


def _env_keys(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a kustomize env file (comments and blank lines skipped)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.partition("=")[::2] for line in lines if line and not line.startswith("#"))


def _python_kustomize(directory: Path) -> list[dict]:
    """What `kubectl kustomize` does with our bases, for machines without kubectl: resources (files or
    directories, recursively), secretGenerator over env files (the committed ``*.env.example``),
    patches must exist, namespace (parent wins; RoleBinding subjects without one get it), labels."""
    kz = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kz["kind"] == "Kustomization", directory
    objects: list[dict] = []
    for res in kz.get("resources", []):
        path = directory / res
        assert path.exists(), f"{directory}/kustomization.yaml: resource {res} does not exist"
        objects += _python_kustomize(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for gen in kz.get("secretGenerator", []):
        data = {}
        for env in gen.get("envs", []):
            data |= _env_keys(directory / f"{env}.example")
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": gen["name"]}, "stringData": data})  # fmt: skip
    for patch in kz.get("patches", []) + kz.get("patchesStrategicMerge", []):
        target = patch.get("path") if isinstance(patch, dict) else patch
        if target:
            assert (directory / target).is_file(), f"{directory}: patch {target} does not exist"
    for obj in objects:
        if kz.get("namespace") and obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            obj["metadata"]["namespace"] = kz["namespace"]
            for subject in obj.get("subjects", []) if obj["kind"] == "RoleBinding" else []:
                subject.setdefault("namespace", kz["namespace"])
        for entry in kz.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
    return objects


def kustomize_build(directory: Path) -> list[dict]:
    """The objects ``kubectl apply -k directory`` would send: `kubectl kustomize` on a copy of manifests/
    whose secret env files are the committed templates (real ones are gitignored), else a Python
    equivalent. No duplicate objects."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "manifests"
            shutil.copytree(MANIFESTS, copy, ignore=shutil.ignore_patterns("*.env"))
            for example in copy.rglob("*.env.example"):
                shutil.copy(example, example.with_suffix(""))
            target = copy / directory.relative_to(MANIFESTS)
            out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"kubectl kustomize {directory}: {out.stderr}"
            objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    else:
        objects = _python_kustomize(directory)
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(ids) == len(set(ids)), f"{directory}: duplicate objects {ids}"
    return objects


def validate(obj: dict) -> None:
    """Core kinds: the Kubernetes schema (strict: unknown fields fail). Custom kinds: required fields."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind == "InferenceService":
        model = obj["spec"]["predictor"]["model"]
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"
        assert model["modelFormat"]["name"] and re.match(r"^(s3|gs|hf|pvc|https?)://", model["storageUri"]), name
        assert "nvidia.com/gpu" in model["resources"]["limits"], name
    elif kind == "RayJob":
        assert obj["apiVersion"] == "ray.io/v1"
        spec = obj["spec"]
        assert spec["entrypoint"] and spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"], name
    else:
        import kubernetes_validate

        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, f"bad name {name!r}"


@pytest.mark.parametrize("directory", _kustomization_dirs(), ids=lambda p: str(p.relative_to(MANIFESTS)) or "root")
def test_kustomization_builds_and_validates(directory):
    objects = kustomize_build(directory)
    assert objects
    for obj in objects:
        validate(obj)


def test_top_level_builds_everything_and_starts_no_work():
    """`kubectl apply -k manifests/` installs services, storage and RBAC; it starts no training and serves nothing
    (a RayJob would take 16 GPUs; an InferenceService would fight promotion's field manager on re-apply)."""
    kinds = {o["kind"] for o in kustomize_build(MANIFESTS)}
    assert {"Deployment", "StatefulSet", "Service", "Role", "RoleBinding", "PersistentVolumeClaim"} <= kinds
    assert not {"RayJob", "InferenceService", "Job", "Workflow"} & kinds
    examples = {o["kind"] for d in ("rayjob", "inferenceservice") for o in kustomize_build(MANIFESTS / "examples" / d)}
    assert examples == {"RayJob", "InferenceService"}  # kept, validated, applied by nobody


def test_statefulset_claim_templates_are_written_as_the_api_server_stores_them():
    """The API server defaults apiVersion, kind, volumeMode and status of each volumeClaimTemplate (an atomic list):
    held against kube-apiserver v1.36, a template without them made every `kubectl apply -k manifests/` report both
    StatefulSets "configured", and `kubectl apply --server-side -k manifests/` after a client-side apply failed with
    'conflict with "kubectl-client-side-apply" using apps/v1: .spec.volumeClaimTemplates'."""
    stateful = [o for o in kustomize_build(MANIFESTS) if o["kind"] == "StatefulSet"]
    assert {o["metadata"]["name"] for o in stateful} == {"minio", "mlflow-postgres"}
    for sts in stateful:
        for claim in sts["spec"]["volumeClaimTemplates"]:
            where = f"{sts['metadata']['name']}: volumeClaimTemplate {claim['metadata']['name']}"
            assert (claim.get("apiVersion"), claim.get("kind")) == ("v1", "PersistentVolumeClaim"), where
            assert claim["spec"].get("volumeMode") == "Filesystem", where
            assert claim.get("status") == {"phase": "Pending"}, where


def test_volumes_the_pipeline_and_rayjobs_mount_exist():
    from dcgrpo.config import VerlConfig
    from dcgrpo.deploy import DeploymentContract

    claims = {o["metadata"]["name"]: o for o in kustomize_build(MANIFESTS) if o["kind"] == "PersistentVolumeClaim"}
    contract = DeploymentContract()
    assert {contract.model_cache_pvc, contract.checkpoint_pvc} <= set(claims)
    assert contract.checkpoint_mount == VerlConfig().checkpoint_dir  # the step and the Ray nodes see one path
    for claim in claims.values():  # a new pod per round, several Ray nodes: shared read-write
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert claim["metadata"]["namespace"] == contract.namespace


def test_rbac_is_least_privilege():
    objects = kustomize_build(MANIFESTS)
    allowed = {
        "ray.io": {"rayjobs", "rayjobs/status"},
        "serving.kserve.io": {"inferenceservices", "inferenceservices/status"},
    }
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        assert role["kind"] == "Role", "no cluster-wide permissions"
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                assert set(rule["resources"]) <= allowed[group], rule
            assert not {"delete", "deletecollection", "*", "escalate", "bind"} & set(rule["verbs"]), rule


def test_secrets_come_from_secret_refs_only():
    """No credential values in git: env that looks like a credential is a secretKeyRef, and every Secret
    is generated from a gitignored env file whose committed template has no values."""
    committed = {o["metadata"]["name"] for d in _kustomization_dirs() for f in d.glob("*.yaml")
                 for o in yaml.safe_load_all(f.read_text()) if o and o.get("kind") == "Secret"}  # fmt: skip
    assert not committed, f"Secret objects committed under manifests/: {committed}"
    for example in MANIFESTS.rglob("*.env.example"):
        values = {k: v for k, v in _env_keys(example).items() if v and k != "POSTGRES_USER"}
        assert not values, f"{example}: template with values {values}"
        real = example.with_suffix("")
        ignored = subprocess.run(["git", "check-ignore", "-q", str(real)], cwd=ROOT).returncode == 0
        assert ignored, f"{real.relative_to(ROOT)} must be gitignored"
    for obj in kustomize_build(MANIFESTS):
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for env in container.get("env", []):
                if re.search(r"PASSWORD|SECRET|ACCESS_KEY|_USER$", env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), (obj["metadata"]["name"], env["name"])


def test_pods_run_as_non_root():
    for obj in kustomize_build(MANIFESTS):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]


def test_rendered_serving_manifests_validate():
    cfg = RegistryConfig(serving_gpus=2)
    uri = "s3://dcgrpo/exports/run-7/fp8"
    isvc = render_inference_service("DCGRPO_Qwen3.8B", "7", uri, cfg)
    validate(isvc)
    assert isvc["metadata"]["name"] == "dcgrpo-qwen3-8b"
    assert isvc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "--tensor-parallel-size=2" in isvc["spec"]["predictor"]["model"]["args"]
    deployment, service = render_vllm_deployment("DCGRPO_Qwen3.8B", "7", uri, cfg)
    validate(deployment)
    validate(service)
    assert "--quantization=compressed-tensors" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    bf16 = render_vllm_deployment("m", "1", uri, cfg, quantization="bf16")[0]
    assert not any("quantization" in a for a in bf16["spec"]["template"]["spec"]["containers"][0]["args"])


def test_committed_inferenceservice_is_the_rendered_one():
    committed = yaml.safe_load((MANIFESTS / "examples" / "inferenceservice" / "inferenceservice.yaml").read_text())
    model = committed["spec"]["predictor"]["model"]
    version = committed["metadata"]["labels"]["dcgrpo/model-version"]
    assert committed == render_inference_service(
        committed["metadata"]["name"], version, model["storageUri"], RegistryConfig()
    )


def test_recurring_run_example():
    """The example names files and parameters that exist, the contract's service account, KFP's cron."""
    from dcgrpo import pipeline
    from dcgrpo.deploy import DeploymentContract

    text = (MANIFESTS / "kfp" / "recurring-run.yaml").read_text()
    rr = yaml.safe_load(text)
    assert rr["max_concurrency"] == "1" and rr["no_catchup"] is True
    assert len(rr["trigger"]["cron_schedule"]["cron"].split()) == 6  # KFP cron: seconds first
    for path in re.findall(r"\b(?:pipelines|manifests)/[\w./-]+\.yaml", text):
        assert (ROOT / path).is_file(), f"recurring-run.yaml names {path}, which does not exist"
    spec, _ = pipeline.load_compiled(pipeline.COMPILED_PATH)
    assert set(rr["runtime_config"]["parameters"]) <= set(spec.root.input_definitions.parameters)
    assert "service_account" not in rr and DeploymentContract().service_account == ""  # Kubeflow's run account


def test_mlflow_server_runs_without_the_job_runner():
    """`mlflow server`'s GenAI job runner made its exit on SIGTERM take ~28 s (of the pod's 30 s grace period) here;
    the manifest and the demo's local server turn it off (dcgrpo uses no MLflow jobs)."""
    import inspect

    from dcgrpo import mlflow_server

    deploy = next(o for o in kustomize_build(MANIFESTS / "mlflow") if o["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert '"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"' in inspect.getsource(mlflow_server.start_local_server)
