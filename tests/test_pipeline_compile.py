"""The compiled pipeline: fresh, parseable, and carrying the cluster settings."""

import json

import pytest
import yaml

from dcgrpo import pipeline
from dcgrpo.cli import main
from dcgrpo.config import ConfigError

GPU_STEPS = ("warm-start", "train-round", "export-fp8", "evaluate")
LIGHT_STEPS = ("prepare-data", "select-best", "register-model", "promote", "mark-failed")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "dc_grpo.yaml"
    pipeline.compile_yaml(path)
    return path


def test_committed_yaml_is_fresh(compiled):
    committed = pipeline.COMPILED_PATH
    assert committed.is_file(), "run `dcgrpo compile` and commit pipelines/compiled/dc_grpo.yaml"
    assert committed.read_text() == compiled.read_text(), (
        "pipelines/compiled/dc_grpo.yaml is stale: run `.venv/bin/dcgrpo compile` and commit it"
    )


def test_yaml_parses_into_pipeline_and_platform_protobufs(compiled):
    spec, executors = pipeline.load_compiled(compiled)
    assert spec.pipeline_info.name == "dc-grpo"
    params = set(spec.root.input_definitions.parameters)
    assert {"preset", "overrides", "data_uri", "model_uri", "methods", "rounds", "mlflow_uri", "model_name"} <= params
    assert executors, "no Kubernetes platform config"


def _executors(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    containers = docs[0]["deploymentSpec"]["executors"]
    return containers, k8s


def test_gpu_steps_request_gpus_on_the_gpu_pool_with_cache_and_secrets(compiled):
    containers, k8s = _executors(compiled)
    for step in GPU_STEPS:
        name = f"exec-{step}"
        resources = containers[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", step
        assert int(resources["accelerator"]["resourceCount"]) == 1, step
        cfg = k8s[name]
        assert cfg["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "gpu-pool"}, step
        assert cfg["tolerations"][0]["key"] == "nvidia.com/gpu", step
        assert cfg["pvcMount"][0]["mountPath"] == "/cache", step
        secrets = {s["secretName"] for s in cfg["secretAsEnv"]}
        assert secrets == {"dcgrpo-s3", "dcgrpo-mlflow"}, step


def test_train_rounds_share_the_verl_checkpoint_volume(compiled, tmp_path):
    _, k8s = _executors(compiled)
    rounds = [name for name in k8s if name.startswith("exec-train-round")]
    assert len(rounds) == 4  # --max-rounds default
    for name in rounds:
        mounts = {m["mountPath"]: m for m in k8s[name]["pvcMount"]}
        assert mounts["/checkpoints"]["constant"] == "dcgrpo-checkpoints", name  # = verl.checkpoint_dir's default
    assert all("/checkpoints" not in json.dumps(k8s[n]) for n in k8s if not n.startswith("exec-train-round"))
    bare = pipeline.compile_yaml(tmp_path / "bare.yaml", checkpoint_pvc="", accelerator_limit=8)
    containers, k8s = _executors(bare)
    assert "/checkpoints" not in json.dumps(k8s)
    assert int(containers["exec-train-round"]["container"]["resources"]["accelerator"]["resourceCount"]) == 8


def test_light_steps_have_cpu_limits_and_no_gpu(compiled):
    containers, k8s = _executors(compiled)
    for step in LIGHT_STEPS:
        resources = containers[f"exec-{step}"]["container"]["resources"]
        assert "accelerator" not in resources, step
        assert resources["cpuLimit"] == 2.0, step
        assert "nodeSelector" not in k8s.get(f"exec-{step}", {}), step


def test_retries_rounds_and_no_secret_values(compiled):
    text = compiled.read_text()
    docs = list(yaml.safe_load_all(text))
    tasks = docs[0]["root"]["dag"]["tasks"]
    body = json.dumps(docs[0])
    assert body.count('"retryPolicy"') >= 4 + 1 + 1 + 1  # 4 rounds, warm start, export, evaluate
    assert all(f"train-round-{k}" in body for k in range(1, 5))
    assert "exit-handler-1" in tasks or any("exit" in t for t in tasks)
    # Only secret names and key names appear; no credential values.
    assert "testing" not in text and "password:" not in text.lower()


def test_compile_cli_writes_yaml_with_custom_images(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--image", "reg/cpu:1", "--trainer-image", "reg/gpu:1",
                 "--max-rounds", "2", "--gpu-pool", "pool=a100"]) == 0  # fmt: skip
    text = out.read_text()
    assert "reg/cpu:1" in text and "reg/gpu:1" in text and "a100" in text
    assert "train-round-3" not in text
    assert main(["compile", "--output", str(out), "--gpu-pool", "nokey"]) == 2


def test_pipeline_arguments_are_validated_before_submission():
    args = pipeline.pipeline_arguments("tiny-cpu", ["train.lr=1e-3"], ["grpo", "dc-grpo"])
    assert args["rounds"] == 2 and args["methods"] == ["grpo", "dc-grpo"] and args["model_name"] == "dcgrpo-tiny"
    with pytest.raises(ConfigError, match="method.name"):
        pipeline.pipeline_arguments("tiny-cpu", [], ["grpo", "ppo"])
    with pytest.raises(ConfigError, match="train.lr"):
        pipeline.pipeline_arguments("tiny-cpu", ["train.lr=-1"])


def test_schedule_rejects_five_field_cron():
    with pytest.raises(ValueError, match="6 fields"):
        pipeline.schedule("http://127.0.0.1:9", "0 3 * * 0", {})


def test_retrain_workflow_compiles_and_submits_with_the_cli():
    workflow = yaml.safe_load((pipeline.COMPILED_PATH.parents[2] / ".github/workflows/retrain.yml").read_text())
    steps = " ".join(s.get("run", "") for s in workflow["jobs"]["submit"]["steps"])
    assert "dcgrpo compile" in steps and "dcgrpo submit --host" in steps
    assert workflow[True]["schedule"][0]["cron"]  # YAML 1.1 reads the key `on` as True
