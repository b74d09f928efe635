"""Promotion that serves: the champion's InferenceService is applied before the alias moves.

Real MLflow server (sqlite, served artifacts: sources are ``mlflow-artifacts:/``) and the real
``kubernetes`` client against the fake Kubernetes API server the RayJob tests use
(tests/kube_fake.py: server-side apply of custom objects). Everything of ours runs for real.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s
from mlflow import MlflowClient

from dcgrpo import registry, serving, storage
from dcgrpo.cli import main as cli_main
from dcgrpo.config import RegistryConfig
from dcgrpo.deploy import DeploymentContract
from dcgrpo.errors import ServiceUnavailable
from tests.kube_fake import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
GATE = "eval/synthetic/avg_1"
BUDGET = 5e-3
CFG = RegistryConfig()  # the defaults: what a cluster gets out of the box
K8S_VERSION = "1.31.0"


@pytest.fixture
def kube():
    with FakeKubeAPI() as fake:
        yield fake


def _name() -> str:
    return f"dcgrpo-serve-{uuid.uuid4().hex[:8]}"


def _register(mlc, name, model_dir, acc: float):
    exp = mlc.get_experiment_by_name("serving-tests") or mlc.get_experiment(mlc.create_experiment("serving-tests"))
    run = mlc.create_run(exp.experiment_id)
    mlc.set_terminated(run.info.run_id)
    return registry.register_model(
        mlc, name, run.info.run_id, str(model_dir), metrics={GATE: acc}, final_lambda=0.25, discrepancy=1e-3,
        config_hash="abc123",
    )  # fmt: skip


def _promote(mlc, name, mv, kube, **kw):
    return registry.promote(mlc, name, mv.version, GATE, BUDGET, serve=serving.server(CFG, name, kube.api_client), **kw)


def _served(kube, name) -> dict:
    return kube.stored("inferenceservices", CFG.serving_namespace, serving._k8s_name(name))


def _served_version(kube, name) -> str:
    return _served(kube, name)["metadata"]["annotations"]["dcgrpo/model-version"]


def _champion(mlc, name) -> str:
    return mlc.get_model_version_by_alias(name, "champion").version


def _expected_uri(mv) -> str:
    """manifests/mlflow's --artifacts-destination + the path MLflow proxies."""
    assert mv.source.startswith("mlflow-artifacts:/"), mv.source
    return storage.join("s3://mlflow/artifacts", re.sub(r"^mlflow-artifacts:(//[^/]*)?/", "", mv.source))


# --- promote -> apply --------------------------------------------------------------------------------------------------


def test_promote_applies_the_champions_inference_service(mlc, model_dir, kube):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5)
    assert _promote(mlc, name, v1, kube).promoted and _champion(mlc, name) == v1.version

    obj = _served(kube, name)
    model = obj["spec"]["predictor"]["model"]
    assert model["storageUri"] == _expected_uri(v1)  # default registry.artifacts_destination: no setting needed
    assert "--quantization=compressed-tensors" in model["args"] and "--backend=vllm" in model["args"]
    assert obj["metadata"]["annotations"].items() >= {
        "dcgrpo/registered-model": f"models:/{name}/{v1.version}", "dcgrpo/model-version": v1.version,
        "dcgrpo/quantization": "fp8",
    }.items()  # fmt: skip
    assert obj["spec"]["predictor"]["serviceAccountName"] == DeploymentContract().serving_service_account
    (request,) = kube.applies
    assert request["content_type"] == "application/apply-patch+yaml"
    assert request["query"] == {"fieldManager": ["dcgrpo"], "force": ["true"]}
    assert (
        request["path"]
        == f"/apis/serving.kserve.io/v1beta1/namespaces/dcgrpo/inferenceservices/{serving._k8s_name(name)}"
    )


def test_second_promotion_updates_the_same_inference_service(mlc, model_dir, kube):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5)
    _promote(mlc, name, v1, kube)
    v2 = _register(mlc, name, model_dir, acc=0.7)
    assert _promote(mlc, name, v2, kube).promoted

    assert len(kube.objects) == 1  # one InferenceService per model, re-pointed
    obj = _served(kube, name)
    assert obj["metadata"]["generation"] == 2 and _served_version(kube, name) == v2.version
    assert obj["spec"]["predictor"]["model"]["storageUri"] == _expected_uri(v2)

    worse = _register(mlc, name, model_dir, acc=0.1)  # rejected by the gate: nothing applied
    assert not _promote(mlc, name, worse, kube).promoted
    assert len(kube.applies) == 2 and _served_version(kube, name) == v2.version == _champion(mlc, name)

    assert not _promote(mlc, name, v2, kube).promoted  # the champion again: applied again, unchanged
    assert len(kube.applies) == 3 and _served_version(kube, name) == v2.version
    assert mlc.get_model_version(name, v2.version).tags[registry.TAG_DECISION] == "promoted"


class _AliasFails(MlflowClient):
    """A real client whose alias moves fail: a registry outage at the commit point."""

    def set_registered_model_alias(self, name, alias, version):
        raise RuntimeError("registry unavailable")


def test_a_failure_at_any_point_leaves_the_previous_champion_serving(mlc, mlflow_server, model_dir, kube):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5)
    _promote(mlc, name, v1, kube)
    before = _served(kube, name)

    # 1. The cluster refuses the apply (RBAC, an admission webhook): nothing moved anywhere.
    v2 = _register(mlc, name, model_dir, acc=0.9)
    kube.refuse_apply = (403, 'inferenceservices "x" is forbidden: User cannot patch')
    with pytest.raises(serving.ServingError, match=r"HTTP 403: .*forbidden"):
        _promote(mlc, name, v2, kube)
    assert _champion(mlc, name) == v1.version and _served(kube, name) == before
    tags = mlc.get_model_version(name, v2.version).tags
    assert tags[registry.TAG_DECISION] == "failed" and "403" in tags[registry.TAG_REASON]
    kube.refuse_apply = None

    # 2. The alias move fails after the apply: the previous champion is applied again.
    broken = _AliasFails(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    with pytest.raises(RuntimeError, match="registry unavailable"):
        registry.promote(broken, name, v2.version, GATE, BUDGET, serve=serving.server(CFG, name, kube.api_client))
    assert [a["body"]["metadata"]["annotations"]["dcgrpo/model-version"] for a in kube.applies[-2:]] == [
        v2.version, v1.version,
    ]  # fmt: skip
    assert _champion(mlc, name) == v1.version and _served_version(kube, name) == v1.version
    assert mlc.get_model_version(name, v2.version).tags[registry.TAG_DECISION] == "failed"

    # 3. No API server: ServiceUnavailable naming it, nothing moved.
    down = k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:9"))
    down.configuration.retries = 0
    with pytest.raises(ServiceUnavailable, match="127.0.0.1:9 unreachable"):
        registry.promote(mlc, name, v2.version, GATE, BUDGET, serve=serving.server(CFG, name, down))
    assert _champion(mlc, name) == v1.version and _served_version(kube, name) == v1.version

    # 4. A storage URI KServe cannot fetch is refused before anything is applied.
    applies = len(kube.applies)
    with pytest.raises(registry.RegistryError, match="artifacts_destination"):
        registry.promote(mlc, name, v2.version, GATE, BUDGET,
                         serve=serving.server(RegistryConfig(artifacts_destination=None), name, kube.api_client))  # fmt: skip
    assert len(kube.applies) == applies and _champion(mlc, name) == v1.version


def test_rollback_moves_the_alias_back_and_applies_the_old_version(mlc, model_dir, kube):
    name = _name()
    v1 = _register(mlc, name, model_dir, acc=0.5)
    _promote(mlc, name, v1, kube)
    v2 = _register(mlc, name, model_dir, acc=0.7)
    _promote(mlc, name, v2, kube)

    decision = registry.rollback(mlc, name, v1.version, serve=serving.server(CFG, name, kube.api_client))
    assert decision.promoted and decision.champion_before == v2.version
    assert _champion(mlc, name) == v1.version and _served_version(kube, name) == v1.version
    assert _served(kube, name)["spec"]["predictor"]["model"]["storageUri"] == _expected_uri(v1)
    tags = mlc.get_model_version(name, v1.version).tags
    assert (
        tags[registry.TAG_DECISION] == "rolled_back" and tags[registry.TAG_REASON] == f"rolled back from v{v2.version}"
    )


def test_cli_promote_serve_and_rollback(mlc, mlflow_server, model_dir, kube, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setattr(serving, "kube_api_client", lambda: kube.api_client)  # what in-cluster/kubeconfig give
    name = _name()
    args = ["--model-name", name, "--set", f"registry.max_discrepancy={BUDGET}", "--set", f"eval.gate_metric={GATE}"]
    v1 = _register(mlc, name, model_dir, acc=0.5)
    assert cli_main(["promote", *args, "--serve"]) == 0
    assert _served_version(kube, name) == v1.version
    v2 = _register(mlc, name, model_dir, acc=0.7)
    assert cli_main(["promote", *args, "--set", "registry.serve_on_promote=true"]) == 0  # the config switch
    assert _served_version(kube, name) == v2.version == _champion(mlc, name)
    assert "InferenceService applied in namespace dcgrpo" in capsys.readouterr().out

    assert cli_main(["promote", *args, "--serve", "--rollback-to", v1.version]) == 0
    assert _served_version(kube, name) == v1.version == _champion(mlc, name)
    assert f"v{v1.version}: promoted (rolled back from v{v2.version})" in capsys.readouterr().out


def test_no_kubernetes_credentials_fail_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    with pytest.raises(ServiceUnavailable, match=r"not in a pod .*kubeconfig"):
        serving.kube_api_client()


# --- defaults that make it work on the cluster -------------------------------------------------------------------------


def test_storage_uri_maps_served_artifacts_onto_the_mlflow_manifests_bucket():
    class MV:
        version, tags = "3", {}
        source = "mlflow-artifacts:/1/abc/artifacts/model"

    mlflow = next(o for o in yaml.safe_load_all((MANIFESTS / "mlflow" / "mlflow.yaml").read_text())
                  if o["kind"] == "Deployment")  # fmt: skip
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--artifacts-destination={CFG.artifacts_destination}" in args
    assert serving.storage_uri(MV, CFG) == "s3://mlflow/artifacts/1/abc/artifacts/model"
    with pytest.raises(registry.RegistryError, match="artifacts_destination"):
        serving.storage_uri(MV, RegistryConfig(artifacts_destination=None))


def test_serving_account_and_secret_carry_kserves_s3_annotations_for_minio():
    from tests.test_manifests import kustomize_build

    c = DeploymentContract()
    minio = next(
        o for o in yaml.safe_load_all((MANIFESTS / "minio" / "minio.yaml").read_text()) if o["kind"] == "Service"
    )
    port = minio["spec"]["ports"][0]["port"]
    expected = {
        "serving.kserve.io/s3-endpoint": f"{minio['metadata']['name']}.{c.namespace}.svc.cluster.local:{port}",
        "serving.kserve.io/s3-usehttps": "0",  # MinIO in-cluster speaks plain HTTP
        "serving.kserve.io/s3-region": "us-east-1",
    }
    objs = kustomize_build(MANIFESTS / "kserve")
    sa = next(o for o in objs if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == c.serving_service_account)
    secret = next(o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == c.s3_secret)
    assert sa["metadata"]["annotations"] == expected and secret["metadata"]["annotations"] == expected
    assert [s["name"] for s in sa["secrets"]] == [c.s3_secret]
    # KServe's credential builder reads these two keys (its default names) from the secret
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(c.s3_keys)


# --- every rendered object validates ----------------------------------------------------------------------------------

# KServe v1beta1 InferenceService: kubernetes-validate has no CRD schemas, so the CRD's own OpenAPI schema is kept
# under tests/schemas (pruned from KServe's published CRD; provenance in its "$comment" and prune_isvc_crd.py).
ISVC_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "kserve-inferenceservice-v1beta1.json").read_text())


def _strict(schema):
    """No unknown fields where the schema lists them: the API server would silently prune a misspelt field
    (structural schemas drop unknown ones), so a typo would serve with a default instead of failing here."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _check_inference_service(obj: dict) -> None:
    import jsonschema

    jsonschema.validate(obj, _strict(ISVC_SCHEMA))
    assert (obj["apiVersion"], obj["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    meta = obj["metadata"]  # the CRD leaves metadata to the API server: a DNS-1035 label for KServe's services
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    assert all(isinstance(v, str) for v in (*meta["labels"].values(), *meta["annotations"].values()))
    assert obj["spec"]["predictor"]["model"]["storageUri"].startswith(serving.FETCHABLE)


def test_every_rendered_object_validates():
    uri = "s3://dcgrpo/exports/run-7/fp8"
    for quantization in ("fp8", "bf16"):
        _check_inference_service(serving.render_inference_service("DCGRPO_Qwen3.8B", "7", uri, CFG, quantization))
        for obj in serving.render_vllm_deployment("DCGRPO_Qwen3.8B", "7", uri, CFG, quantization):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    committed = yaml.safe_load((MANIFESTS / "examples" / "inferenceservice" / "inferenceservice.yaml").read_text())
    _check_inference_service(committed)
    import jsonschema

    model = committed["spec"]["predictor"]["model"]
    for bad in (
        {**model, "storageURI": uri},
        {**model, "args": "--backend=vllm"},
        {**model, "resources": {"limits": {"cpu": "x y"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):  # a misspelt field, a wrong type, a bad quantity
            _check_inference_service(
                {**committed, "spec": {"predictor": {**committed["spec"]["predictor"], "model": bad}}}
            )


def test_pipeline_promote_step_serves_when_switched_on(mlc, mlflow_server, model_dir, kube, monkeypatch):
    from dcgrpo.config import load_config
    from dcgrpo.stages import publish

    monkeypatch.setattr(serving, "kube_api_client", lambda: kube.api_client)
    name = _name()
    sets = [f"registry.max_discrepancy={BUDGET}", f"eval.gate_metric={GATE}"]
    v1 = _register(mlc, name, model_dir, acc=0.5)
    assert publish.promote_step("", sets, mlflow_server, name, v1.version, False).startswith("promoted")
    assert not kube.applies  # off by default (local runs have no KServe)
    v2 = _register(mlc, name, model_dir, acc=0.7)
    on = [*sets, "registry.serve_on_promote=true"]
    assert publish.promote_step("", on, mlflow_server, name, v2.version, False).startswith("promoted")
    assert _served_version(kube, name) == v2.version == _champion(mlc, name)
    for preset in ("qwen3-8b", "qwen3-30b-a3b"):  # the cluster presets serve what they promote
        assert load_config(preset=preset).registry.serve_on_promote
