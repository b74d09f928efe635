"""The verl backend's cluster launch: rendered RayJob, its manifest, and following it.

The one fake here is the Kubernetes API server (no cluster on this machine):
a small HTTP server that speaks the two RayJob endpoints (tests/kube_fake.py), driven through the
real ``kubernetes`` client. Everything of ours runs for real. No verl import.
"""

import logging
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dcgrpo.cli import main as cli_main
from dcgrpo.config import ConfigError, load_config
from dcgrpo.deploy import ENV_VAR, DeploymentContract
from dcgrpo.verl_plugin.config import render_env, render_overrides
from dcgrpo.verl_plugin.rayjob import RayJobFailed, follow_rayjob, job_name, render_rayjob, run_rayjob
from tests.kube_fake import FakeKubeAPI

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "manifests" / "examples" / "rayjob"
K8S_VERSION = "1.30.0"


def _cfg(*sets):
    return load_config(overrides=["model.path=/models/m", *sets])


def _job(cfg, name="run-1", env=None):
    return render_rayjob(cfg, render_overrides(cfg, train_files="/checkpoints/data/train.parquet"), name=name, env=env)


def _pod_templates(job):
    spec = job["spec"]["rayClusterSpec"]
    yield spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["template"]


def _check_required(job):
    """Required fields of KubeRay's ray.io/v1 RayJob CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml),
    plus entrypoint (required for the default K8sJobMode submission)."""
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"] and job["metadata"]["namespace"]
    assert job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert "template" in cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for template in _pod_templates(job):  # each pod template against the real Kubernetes schema
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)


def test_multi_node_rayjob_validates_and_targets_the_gpu_pool():
    cfg = _cfg("verl.nnodes=4", "rollout.precision=fp8", "train.group_size=8", "method.budget=2e-3")
    job = _job(cfg, "Qwen3 8B/DC-GRPO round_1", env={"MLFLOW_RUN_ID": "abc123"})
    _check_required(job)
    assert job["metadata"]["name"] == "qwen3-8b-dc-grpo-round-1"
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 3  # 4 nodes = head + 3 GPU workers
    for template in _pod_templates(job):
        spec = template["spec"]
        assert spec["nodeSelector"] == DeploymentContract().gpu_node_selector == {"dcgrpo/pool": "gpu"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        (c,) = spec["containers"]
        assert c["image"] == DeploymentContract().verl_image and c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        env = {e["name"]: e for e in c["env"]}
        # the pipeline's keys, optional like the pipeline's: an unused key cannot stop the pod
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "dcgrpo-s3", "key": "AWS_SECRET_ACCESS_KEY", "optional": True
        }  # fmt: skip
        assert env["MLFLOW_RUN_ID"]["value"] == "abc123"
    entry = job["spec"]["entrypoint"]
    for part in (
        "python -m dcgrpo.verl_plugin.launch trainer.use_v1=true",
        "trainer.v1.trainer_mode=dc_grpo",
        "reward.custom_reward_function.path=pkg://dcgrpo.verl_plugin.reward",
        "trainer.nnodes=4",
        "actor_rollout_ref.rollout.calculate_log_probs=true",
        "actor_rollout_ref.rollout.quantization=fp8",
        "actor_rollout_ref.rollout.n=8",
        "+algorithm.dc_grpo.budget=0.002",
        "+ray_kwargs.ray_init.runtime_env.env_vars.MLFLOW_RUN_ID=abc123",
    ):
        assert part in entry


def test_single_node_rayjob_has_only_a_head():
    job = _job(_cfg("verl.nnodes=1"))
    _check_required(job)
    assert "workerGroupSpecs" not in job["spec"]["rayClusterSpec"]


def test_bad_configs_fail_naming_fields():
    with pytest.raises(ConfigError, match="verl.nnodes x verl.gpus_per_node"):
        render_overrides(_cfg("verl.gpus_per_node=3"), train_files="x.parquet")
    with pytest.raises(ConfigError, match="model.path"):
        render_overrides(load_config(), train_files="x.parquet")
    with pytest.raises(ConfigError, match="verl.image"):  # deployment names are not run config
        _cfg("verl.image=x")
    with pytest.raises(ConfigError, match="checkpoint_pvc"):
        render_rayjob(_cfg("verl.nnodes=2"), [], name="x", contract=DeploymentContract(checkpoint_pvc=""))
    with pytest.raises(ConfigError, match="needs dc_grpo"):
        render_overrides(_cfg("verl.trainer_mode=sync"), train_files="x.parquet")
    assert render_env(_cfg("tracking.mlflow_uri=http://m:5000"), mlflow_run_id="r") == {
        "MLFLOW_TRACKING_URI": "http://m:5000",
        "MLFLOW_RUN_ID": "r",
    }


def test_manifest_template_is_the_rendered_rayjob_and_kustomizes(capsys):
    header = (MANIFEST / "rayjob.yaml").read_text().splitlines()
    argv = next(line for line in header if "dcgrpo train-verl" in line).split("dcgrpo train-verl")[1].split()
    argv += next(line for line in header if "--train-files" in line).lstrip("# ").split()
    argv += next(line for line in header if "--dry-run" in line).lstrip("# ").split()[:3]
    assert cli_main(["train-verl", *[a for a in argv if a != "\\"]]) == 0
    rendered = yaml.safe_load(capsys.readouterr().out)
    committed = yaml.safe_load((MANIFEST / "rayjob.yaml").read_text())
    assert committed == rendered, (
        "manifests/examples/rayjob/rayjob.yaml is stale: regenerate it with the command in its header"
    )
    _check_required(committed)
    kustomization = yaml.safe_load((MANIFEST / "kustomization.yaml").read_text())
    assert all((MANIFEST / r).is_file() for r in kustomization["resources"])
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "kustomize", str(MANIFEST)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert yaml.safe_load(out.stdout)["kind"] == "RayJob"


# ---- following a RayJob: the real kubernetes client against a fake API server -----------


class ScriptedKubeAPI(FakeKubeAPI):
    """Each GET of a job returns the next scripted status (the last one repeats)."""

    def __init__(self, statuses):
        super().__init__()
        self.statuses = list(statuses)
        self.gets = 0

    def status_of(self, name):
        status = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        return status


RUNNING = [
    {},
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
]


def test_run_rayjob_submits_and_follows_to_success(caplog):
    cfg = _cfg("verl.poll_s=0.01")
    overrides = render_overrides(cfg, train_files="/checkpoints/data/train.parquet")
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "Job finished successfully."}
    with caplog.at_level(logging.INFO, logger="dcgrpo"), ScriptedKubeAPI([*RUNNING, done]) as kube:
        status = run_rayjob(cfg, overrides, name="round-1", api=kube.api)
    assert status["jobStatus"] == "SUCCEEDED"
    assert kube.created == [render_rayjob(cfg, overrides, name="round-1")]
    log = caplog.text
    assert "submitted (1 nodes" in log
    order = ["deployment=New", "deployment=Initializing", "job=PENDING", "job=RUNNING", "job=SUCCEEDED", "succeeded"]
    positions = [log.index(s) for s in order]
    assert positions == sorted(positions)
    assert log.count("job=RUNNING") == 1  # changes are logged, repeats are not


def test_failed_rayjob_raises_with_kuberays_message():
    failed = {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "reason": "AppFailed",
        "message": "Job entrypoint command failed with exit code 1: CUDA out of memory",
    }
    with ScriptedKubeAPI([*RUNNING[:3], failed]) as kube:
        kube.api.create_namespaced_custom_object("ray.io", "v1", "kubeflow", "rayjobs", _job(_cfg()))
        with pytest.raises(RayJobFailed, match=r"kubeflow/run-1 failed \(AppFailed\): .*CUDA out of memory"):
            follow_rayjob(kube.api, "run-1", "kubeflow", poll_s=0, sleep=lambda s: None)


def test_follow_gives_up_after_timeout():
    now = [0.0]

    def sleep(s):
        now[0] += s

    with ScriptedKubeAPI(RUNNING) as kube:
        kube.api.create_namespaced_custom_object("ray.io", "v1", "kubeflow", "rayjobs", _job(_cfg()))
        with pytest.raises(RayJobFailed, match="still Running after 30 s"):
            follow_rayjob(kube.api, "run-1", "kubeflow", poll_s=10, timeout_s=30, sleep=sleep, clock=lambda: now[0])


def test_cli_single_node_dry_run_prints_the_verl_command(capsys):
    rc = cli_main(
        ["train-verl", "--set", "model.path=/m", "--train-files", "/d/t.parquet", "--mode", "single-node", "--dry-run"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.split()[1:3] == ["-m", "dcgrpo.verl_plugin.launch"]
    assert "trainer.v1.trainer_mode=dc_grpo" in out and "data.train_files=/d/t.parquet" in out
    assert job_name("--") == "dcgrpo-verl"


def test_cli_round_stops_at_the_rounds_step_with_the_whole_runs_total(capsys):
    common = ["train-verl", "--preset", "qwen3-8b", "--train-files", "/checkpoints/d/train.parquet"]
    assert cli_main([*common, "--round", "2", "--dry-run"]) == 0
    entry = yaml.safe_load(capsys.readouterr().out)["spec"]["entrypoint"]
    assert entry.startswith("python -m dcgrpo.verl_plugin.launch --stop-at-step 40 ")  # 2 x steps_per_round 20
    assert "trainer.total_training_steps=200" in entry  # 10 rounds x 20: the LR horizon of the whole run
    assert cli_main([*common, "--round", "11", "--dry-run"]) == 2
    assert "--round 11: must be between 1 and train.rounds (10)" in capsys.readouterr().err


def test_rayjob_takes_the_pipelines_contract_and_the_pods_namespace(monkeypatch, tmp_path):
    """In a pipeline pod: the contract the pipeline was compiled with ($DCGRPO_DEPLOYMENT) and the
    pod's own namespace (a Kubeflow profile's), not the defaults."""
    from dcgrpo import deploy

    contract = DeploymentContract(verl_image="reg/t:9", gpu_node_selector={"pool": "h100"}, namespace="ns-x")
    monkeypatch.setenv(ENV_VAR, contract.to_env())
    job = _job(_cfg("verl.nnodes=2"))
    assert job["metadata"]["namespace"] == "ns-x"
    for template in _pod_templates(job):
        assert template["spec"]["nodeSelector"] == {"pool": "h100"}
        assert template["spec"]["containers"][0]["image"] == "reg/t:9"
    ns_file = tmp_path / "namespace"
    ns_file.write_text("team-a\n")
    monkeypatch.setattr(deploy, "POD_NAMESPACE_FILE", ns_file)
    assert _job(_cfg())["metadata"]["namespace"] == "team-a"
    assert _cfg().config_hash() == load_config(overrides=["model.path=/models/m"]).config_hash()


def test_train_verl_dry_run_takes_namespace_and_image_flags(capsys):
    argv = ["train-verl", "--set", "model.path=/m", "--train-files", "/d/t.parquet", "--dry-run"]
    assert cli_main([*argv, "--namespace", "team-a", "--image", "reg/verl:2"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["metadata"]["namespace"] == "team-a"
    assert {t["spec"]["containers"][0]["image"] for t in _pod_templates(job)} == {"reg/verl:2"}


def test_a_lab_weight_grid_is_refused_before_a_rayjob_is_rendered():
    """verl's vLLM rollout serves the checkpoint as it is: a simulated 4-bit grid must not be silently dropped."""
    with pytest.raises(ConfigError, match="rollout.weight_grid=int4_g32 is simulated by the built-in loop only"):
        render_overrides(_cfg("rollout.weight_grid=int4_g32"), train_files="/checkpoints/data/train.parquet")


# ---- names KubeRay accepts ------------------------------------------------------------------------------------------

DNS_1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"  # KubeRay's ValidateRayJobMetadata: IsDNS1035Label


class KubeRayNameRule(FakeKubeAPI):
    """KubeRay (v1.4+) marks a RayJob named over 47 characters ``ValidationFailed``; here every job fails, so each
    retried launch (submit_rayjob again) submits the next attempt's name."""

    def status_of(self, name):
        if len(name) > 47:
            return {"jobDeploymentStatus": "ValidationFailed", "reason": "RayJob name should be no more than 47"}
        return {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "an earlier attempt failed"}


def test_every_rayjob_name_the_pipeline_can_produce_passes_kuberays_rule():
    """Round k of a method in a KFP run (run ids are 36-character UUIDs), and each retry attempt of it."""
    from dcgrpo.verl_plugin.rayjob import MAX_NAME, submit_rayjob

    run_id = "0f5a1c6e-7d2b-4c3a-9e8f-1a2b3c4d5e6f"
    methods = ["grpo", "dual-grpo", "dc-grpo", "tis", "mis", "icepop"]
    bases = [f"r{k}-{m}-{run_id}" for k in (1, 9, 10, 25, 100, 1000) for m in methods]
    names = [job_name(b) for b in bases]
    assert len(set(names)) == len(names), "two rounds or methods share a RayJob name"
    body = render_rayjob(_cfg(), render_overrides(_cfg(), train_files="/t.parquet"), name=bases[-1])
    with KubeRayNameRule() as kube:
        for base in names[:4]:
            b = {**body, "metadata": {**body["metadata"], "name": base}}
            tried = [submit_rayjob(kube.api, b, max_attempts=5) for _ in range(5)]  # the launcher retried 4 times
            assert tried[0] == base and len(set(tried)) == 5
            with pytest.raises(RayJobFailed, match="5 attempts exist and all failed"):
                submit_rayjob(kube.api, b, max_attempts=5)
    created = [j["metadata"]["name"] for j in kube.created]
    assert len(created) == 20 and len(set(created)) == 20
    for name in [*names, *created]:
        assert len(name) <= MAX_NAME == 47 and re.fullmatch(DNS_1035_LABEL, name), name
    assert job_name("r1-grpo-short") == "r1-grpo-short"  # short names are kept as they are


def test_a_rayjob_name_starting_with_a_digit_gets_a_letter_first(capsys):
    """KubeRay refuses a RayJob name that is not a DNS-1035 label (``ValidationFailed``: "RayJob name should be a
    valid DNS1035 label"): ``train-verl --name`` or ``tracking.run_name`` may well start with a date or a digit."""
    for run_name in ["2026-12-06-qwen3", "1st-try", "42", "0" * 60, "-7-b"]:
        name = job_name(run_name)
        assert len(name) <= 47 and re.fullmatch(DNS_1035_LABEL, name), (run_name, name)
    assert job_name("2026-12-06-qwen3") == "dcgrpo-2026-12-06-qwen3"
    assert job_name("0" * 60) != job_name("0" * 61)  # cut names stay distinct
    rc = cli_main(["train-verl", "--set", "model.path=/m", "--train-files", "/d/t.parquet", "--name", "1st-try",
                   "--dry-run"])  # fmt: skip
    assert rc == 0 and yaml.safe_load(capsys.readouterr().out)["metadata"]["name"] == "dcgrpo-1st-try"
