"""One deployment contract (dcgrpo.deploy): the compiled pipeline, the rendered RayJob, every manifest
and docs/cluster.md agree with it, so a rename in one place cannot leave another behind.

Each test parses what a cluster receives (the committed compiled YAML, the RayJob that
`dcgrpo train-verl --dry-run` prints, `kubectl kustomize manifests/`) and compares its names with
``DeploymentContract()``. Everything a cluster receives also validates against the Kubernetes
schemas (kubernetes-validate); the RayJob and InferenceService CRDs have no bundled schema, so
their pod templates are validated as PodTemplates and their own fields checked by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dcgrpo import pipeline
from dcgrpo.config import RegistryConfig, VerlConfig, load_config
from dcgrpo.deploy import ENV_VAR, DeploymentContract
from dcgrpo.verl_plugin.config import render_overrides
from dcgrpo.verl_plugin.rayjob import render_rayjob
from tests.test_manifests import MANIFESTS, kustomize_build, validate

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.31.0"
C = DeploymentContract()
LIGHT = ("prepare-data", "select-best", "register-model", "promote", "mark-failed", "train-launcher")
GPU = ("warm-start", "train", "export-fp8", "evaluate")


@pytest.fixture(scope="module")
def compiled() -> tuple[dict, dict]:
    """(pipeline spec, kubernetes executors) of both committed packages, executors merged (test_pipeline_compile
    checks they are fresh): the GPU train task of dc_grpo.yaml and the RayJob launcher of dc_grpo_rayjob.yaml."""
    merged, k8s = None, {}
    for name in pipeline.PACKAGES.values():
        spec, platform = yaml.safe_load_all((pipeline.COMPILED_DIR / name).read_text())
        if merged is None:
            merged = spec
        merged["deploymentSpec"]["executors"] |= spec["deploymentSpec"]["executors"]
        k8s |= platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return merged, k8s


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return kustomize_build(MANIFESTS)


def _rayjob(cfg=None) -> dict:
    cfg = cfg or load_config(preset="qwen3-8b", overrides=["verl.nnodes=2"])
    return render_rayjob(cfg, render_overrides(cfg, train_files="/checkpoints/d.parquet"), name="r", contract=C)


def _pod_specs(obj: dict) -> list[dict]:
    """Pod specs inside a workload or a RayJob."""
    if obj["kind"] == "RayJob":
        cluster = obj["spec"]["rayClusterSpec"]
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        return [g["template"]["spec"] for g in groups]
    template = obj.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def _secret_refs(pod_spec: dict) -> set[tuple[str, str]]:
    refs = set()
    for container in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    return refs


def _contract_secrets() -> dict[str, set[str]]:
    return {
        C.s3_secret: set(C.s3_keys),
        C.mlflow_secret: set(C.mlflow_keys),
        C.postgres_secret: set(C.postgres_keys),
        C.hf_secret: set(C.hf_keys),
    }


# --- the compiled pipeline ------------------------------------------------------------------------------------------


def test_compiled_pipeline_uses_the_contracts_images_pool_secrets_and_volumes(compiled):
    spec, k8s = compiled
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    for name, image in images.items():
        step = re.sub(r"^exec-|-\d+$", "", name)
        assert image == (C.gpu_image if step in GPU else C.light_image), (name, image)
    assert {re.sub(r"^exec-|-\d+$", "", n) for n in images} == set(LIGHT) | set(GPU)
    for name, cfg in k8s.items():
        step = re.sub(r"^exec-|-\d+$", "", name)
        secrets = {s["secretName"]: {k["secretKey"] for k in s["keyToEnv"]} for s in cfg["secretAsEnv"]}
        light = {C.s3_secret: set(C.s3_keys), C.mlflow_secret: set(C.mlflow_keys)}
        # the steps that load a model also read the Hugging Face token (gated base models)
        assert secrets == (light | {C.hf_secret: set(C.hf_keys)} if step in GPU else light), name
        assert all(k["envVar"] == k["secretKey"] for s in cfg["secretAsEnv"] for k in s["keyToEnv"]), name
        if step not in GPU:
            assert "nodeSelector" not in cfg, name
            # the verl launcher round (no GPU) mounts the checkpoint volume its RayJob resumes from, nothing else
            volumes = {m["constant"]: m["mountPath"] for m in cfg.get("pvcMount", [])}
            assert volumes == ({C.checkpoint_pvc: C.checkpoint_mount} if step == "train-launcher" else {}), name
            continue
        assert cfg["nodeSelector"]["labels"] == C.gpu_node_selector, name
        assert [dict(t) for t in cfg["tolerations"]] == [dict(t) for t in C.gpu_tolerations], name
        mounts = {m["constant"]: m["mountPath"] for m in cfg["pvcMount"]}
        assert mounts[C.model_cache_pvc] == C.model_cache_mount, name
        assert mounts[C.checkpoint_pvc] == C.checkpoint_mount == VerlConfig().checkpoint_dir, name  # model store


def test_train_tasks_carry_the_contract_to_the_rayjobs_they_start(compiled):
    spec, _ = compiled
    for name, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        if name.startswith("exec-train"):
            assert DeploymentContract.model_validate_json(env[ENV_VAR]) == C, name


# --- the rendered RayJob and its committed example ------------------------------------------------------------------


@pytest.mark.parametrize("source", ["rendered", "manifests/examples/rayjob/rayjob.yaml"])
def test_rayjob_uses_the_contracts_names(source):
    job = _rayjob() if source == "rendered" else yaml.safe_load((ROOT / source).read_text())
    assert job["metadata"]["namespace"] == C.namespace
    for pod in _pod_specs(job):
        assert pod["nodeSelector"] == C.gpu_node_selector
        assert pod["tolerations"] == [dict(t) for t in C.gpu_tolerations]
        assert {c["image"] for c in pod["containers"]} == {C.verl_image}
        assert _secret_refs(pod) == {ref for ref in C.secret_env().values()}
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {C.checkpoint_pvc}
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod}},
            K8S_VERSION, strict=True,
        )  # fmt: skip


# --- the manifests --------------------------------------------------------------------------------------------------


def test_manifests_define_every_secret_and_key_anything_reads(manifests):
    generated = {(o["metadata"]["namespace"], o["metadata"]["name"]): set(o.get("data") or o.get("stringData") or {})
                 for o in manifests if o["kind"] == "Secret"}  # fmt: skip
    expected = _contract_secrets()
    for (ns, name), keys in generated.items():
        assert keys == expected[name], (ns, name)
    assert {n for _, n in generated} == set(expected)
    # every secretKeyRef of every workload (and of the RayJob, the pipeline's pods) resolves in its namespace
    readers = [*manifests, _rayjob()]
    for obj in readers:
        ns = obj["metadata"].get("namespace", C.namespace)
        for pod in _pod_specs(obj):
            for secret, key in _secret_refs(pod):
                assert key in generated.get((ns, secret), set()), (obj["metadata"]["name"], ns, secret, key)
    for secret, keys in C.secret_env().values():  # the pipeline's optional refs: defined where the runs are
        assert keys in generated[(C.namespace, secret)]
    assert C.s3_keys and set(C.s3_keys) == generated[(C.serving_namespace, C.s3_secret)]  # KServe's copy


def test_manifests_use_the_contracts_namespaces_accounts_images_and_volumes(manifests):
    serving = {C.serving_namespace}
    for obj in manifests:
        ns = obj["metadata"].get("namespace")
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] in serving
        elif obj["kind"] in ("InferenceService",) or obj["metadata"]["name"] in (
            C.serving_service_account, "dcgrpo-inferenceservices"
        ):  # fmt: skip
            assert ns == C.serving_namespace, obj["metadata"]["name"]
        elif not (obj["kind"] == "Secret" and ns == C.serving_namespace):
            assert ns == C.namespace, (obj["kind"], obj["metadata"]["name"], ns)
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in manifests if o["kind"] == "ServiceAccount"}
    assert (C.serving_namespace, C.serving_service_account) in accounts
    for binding in (o for o in manifests if o["kind"] == "RoleBinding"):  # our verbs, on Kubeflow's run accounts
        # A RoleBinding's ServiceAccount subject without a namespace is one of the binding's own namespace (RBAC).
        ns = binding["metadata"]["namespace"]
        subjects = [(s["kind"], s["name"], s.get("namespace", ns)) for s in binding["subjects"]]
        assert subjects == [("ServiceAccount", name, C.namespace) for name in C.run_accounts]
    sa = next(
        o for o in manifests if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == C.serving_service_account
    )
    assert {s["name"] for s in sa["secrets"]} == {C.s3_secret}
    claims = {o["metadata"]["name"] for o in manifests if o["kind"] == "PersistentVolumeClaim"}
    assert {C.model_cache_pvc, C.checkpoint_pvc} <= claims
    mlflow = next(o for o in manifests if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    assert [c["image"] for c in _pod_specs(mlflow)[0]["containers"]] == [C.mlflow_image]
    for obj in manifests:
        for pod in _pod_specs(obj):
            if "nodeSelector" in pod:
                assert pod["nodeSelector"] == C.gpu_node_selector


def test_run_config_defaults_agree_with_the_contract():
    reg = RegistryConfig()
    assert (reg.serving_namespace, reg.serving_service_account) == (C.serving_namespace, C.serving_service_account)
    rr = yaml.safe_load((MANIFESTS / "kfp" / "recurring-run.yaml").read_text())
    assert rr.get("service_account", "") == C.service_account
    # not run config: two runs deployed differently train the same thing (same config hash)
    assert not {"image", "namespace", "node_selector", "tolerations", "secret_env", "checkpoint_pvc"} & set(
        VerlConfig.model_fields
    )


def test_cluster_docs_name_the_contracts_values():
    readme = (ROOT / "docs" / "cluster.md").read_text()
    label = ",".join(f"{k}={v}" for k, v in C.gpu_node_selector.items())
    for value in (C.light_image, C.gpu_image, C.verl_image, C.s3_secret, C.mlflow_secret, C.postgres_secret,
                  C.hf_secret, *C.s3_keys, *C.mlflow_keys, *C.hf_keys, label, *C.run_accounts, C.model_cache_pvc, C.checkpoint_pvc,
                  C.namespace, C.serving_namespace):  # fmt: skip
        assert value in readme, f"docs/cluster.md does not mention {value}"


# --- static validation of everything a cluster receives -------------------------------------------------------------


def test_everything_a_cluster_receives_validates(manifests):
    """Manifests (Secrets from the templates included) and rendered objects: core kinds against the Kubernetes
    schema, strict; RayJob/InferenceService (no bundled CRD schema) by their required fields and pod templates."""
    for obj in [*manifests, _rayjob(), _rayjob(load_config(overrides=["model.path=/m"]))]:
        validate(obj)
    for obj in manifests:
        for pod in _pod_specs(obj):
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": {"spec": pod}},
                K8S_VERSION, strict=True,
            )  # fmt: skip
    assert json.dumps(manifests)  # serialisable as sent
