"""The pipeline train step's verl backend (``train.backend=verl``), both launches.

What cannot exist here is faked, and only that: verl's training itself needs
GPUs, so the launched process finds ``tests/fake_verl`` (a stand-in for
``verl.trainer.main_ppo`` that resumes, stops, logs to MLflow and writes
verl's checkpoint layout) on its PYTHONPATH; and the Kubernetes API server is
a small HTTP server that *runs* each created RayJob's entrypoint. Everything
else is real: our launcher, the step, a real MLflow server, the real
``kubernetes`` client. The dc_grpo trainer's round stop is tested against
real verl in tests/verl/test_plugin.py.
"""

import json
import logging
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dcgrpo.config import ConfigError, load_config
from dcgrpo.data.synthetic import write_synthetic_splits
from dcgrpo.models import build_tiny_model
from dcgrpo.steps import VERL_ROUND_FILE, _verl_round_metrics, train_round_step
from dcgrpo.verl_plugin import rayjob
from dcgrpo.verl_plugin.config import render_overrides
from dcgrpo.verl_plugin.launch import DC_METRICS_FILE, append_dc_metrics, local_dir_of, read_stop_step, write_round_file
from dcgrpo.verl_plugin.rayjob import RayJobFailed
from tests.kube_fake import FakeKubeAPI

FAKE_VERL = Path(__file__).parent / "fake_verl"
STEPS, ROUNDS = 2, 2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A prepared dataset and a base HF model, as the pipeline's first steps leave them."""
    root = tmp_path_factory.mktemp("verl-inputs")
    cfg = load_config(overrides=["data.synthetic_train_size=32", "data.synthetic_val_size=8"])
    write_synthetic_splits(cfg.data, root / "data")
    build_tiny_model(cfg.model, root / "model")
    return root / "data", root / "model"


@pytest.fixture
def fake_verl_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_VERL), os.environ.get("PYTHONPATH")])))


def _overrides(tmp_path, *extra):
    return [
        "train.backend=verl", f"train.steps_per_round={STEPS}", f"verl.checkpoint_dir={tmp_path / 'ckpt'}",
        "verl.gpus_per_node=1", "verl.poll_s=0.05", "method.budget=1e-4", "method.dual_lr=100", *extra,
    ]  # fmt: skip


def _round(tmp_path, inputs, mlflow_uri, k, meta, *extra, run_id="kfp-run-1"):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    data, model = inputs
    out = tmp_path / f"round-{k}"
    meta_out, scalars = train_round_step(
        "tiny-cpu", _overrides(tmp_path, *extra), "dc-grpo", k, ROUNDS, mlflow_uri, run_id,
        str(data), str(model) if k == 0 else str(tmp_path / f"round-{k - 1}"), meta, str(out),
    )  # fmt: skip
    return out, meta_out, scalars


def _launches(tmp_path, run_id="kfp-run-1"):
    log = tmp_path / "ckpt" / f"dc-grpo-{run_id}" / "launches.log"
    return log.read_text().splitlines() if log.is_file() else []


def test_single_node_rounds_resume_log_and_hand_over_the_model(tmp_path, inputs, mlflow_server, fake_verl_path):
    extra = ("verl.launch=single-node",)
    out1, meta1, scalars1 = _round(tmp_path, inputs, mlflow_server, 0, {}, *extra)
    assert json.loads((out1 / VERL_ROUND_FILE).read_text())["step"] == STEPS  # weights stay on the volume
    assert meta1["step"] == STEPS and meta1["backend"] == "verl" and meta1["round"] == 1
    assert meta1["rollout_engine"].startswith("vllm ") and "(verl " in meta1["rollout_engine"]  # the launch's
    assert meta1["discrepancy"] == pytest.approx((1e-3 / 1 + 1e-3 / 2) / 2)  # mean over this round's steps
    assert scalars1["dc/lambda_next"] == meta1["lambda"] > 0  # the KFP metrics carry MLflow's names and values
    assert scalars1["dc/discrepancy_mean"] == pytest.approx(1e-3 / 2)  # the round's last step, from the file
    assert scalars1["dc/discrepancy_round_mean"] == meta1["discrepancy"]
    assert set(scalars1) == {"dc/discrepancy_mean", "dc/lambda", "dc/lambda_next", "dc/discrepancy_round_mean"}

    out2, meta2, _ = _round(tmp_path, inputs, mlflow_server, 1, meta1, *extra)
    assert meta2["step"] == 2 * STEPS and meta2["mlflow_run_id"] == meta1["mlflow_run_id"]
    assert meta2["discrepancy"] == pytest.approx((1e-3 / 3 + 1e-3 / 4) / 2)
    # the last round's artifact is verl's HF model, what export and evaluation read
    assert (out2 / "config.json").is_file() and list(out2.glob("*.safetensors"))
    base = {p.name: p.read_bytes() for p in inputs[1].glob("*.safetensors")}
    assert {p.name: p.read_bytes() for p in out2.glob("*.safetensors")} == base  # (the stand-in trains nothing)

    mlc = MlflowClient(mlflow_server)
    run = mlc.get_run(meta1["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == "verl"
    assert [m.step for m in mlc.get_metric_history(run.info.run_id, "dc/discrepancy_mean")] == [1, 2, 3, 4]
    # verl logs its config on every launch: one total for the whole run, or round 2 would be refused
    assert run.data.params["trainer/total_training_steps"] == str(ROUNDS * STEPS)
    launches = _launches(tmp_path)
    assert len(launches) == 2
    lines = (tmp_path / "ckpt" / "dc-grpo-kfp-run-1" / DC_METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # what the step read, not MLflow

    _round(tmp_path, inputs, mlflow_server, 1, meta1, *extra)  # a retried round whose checkpoint exists
    assert len(_launches(tmp_path)) == 2  # not launched again


def test_on_the_checkpoint_volume_the_last_round_references_verls_model(
    tmp_path, inputs, mlflow_server, fake_verl_path, monkeypatch
):
    """With the checkpoint volume mounted (a cluster), the last round's artifact references the HF model verl
    saved there instead of copying it through the KFP artifact store; export and evaluation read through it."""
    from dcgrpo.steps import MODEL_REF_FILE, latest_model_dir

    (tmp_path / "ckpt").mkdir()
    monkeypatch.setenv("DCGRPO_MODEL_STORE", str(tmp_path / "ckpt"))  # verl.checkpoint_dir = the mount
    extra = ("verl.launch=single-node",)
    _, meta1, _ = _round(tmp_path, inputs, mlflow_server, 0, {}, *extra)
    out2, _, _ = _round(tmp_path, inputs, mlflow_server, 1, meta1, *extra)
    assert [p.name for p in out2.iterdir()] == [MODEL_REF_FILE]
    hf = Path(latest_model_dir(str(out2)))
    assert hf.is_relative_to(tmp_path / "ckpt") and (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))


class RunningKubeAPI(FakeKubeAPI):
    """Runs each created RayJob's entrypoint (with its head pod's plain env) and reports KubeRay's
    status for the outcome."""

    def on_create(self, body):
        self.jobs[body["metadata"]["name"]]["status"] = self.run(body)

    @staticmethod
    def run(body):
        container = body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e}}
        argv = shlex.split(body["spec"]["entrypoint"])
        argv[0] = sys.executable if argv[0] == "python" else argv[0]  # the trainer image's python is this venv's
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            return {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "Job finished"}
        tail = proc.stderr.strip().splitlines()[-1]
        return {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": tail}


@pytest.fixture
def kube(monkeypatch):
    fake = RunningKubeAPI()
    monkeypatch.setattr(rayjob, "kube_custom_objects_api", lambda: fake.api)
    with fake:
        yield fake


def test_rayjob_round_fails_with_the_jobs_error_then_a_retry_resubmits(
    tmp_path, inputs, mlflow_server, fake_verl_path, kube, monkeypatch
):
    monkeypatch.setenv("FAKE_VERL_FAIL", "1")
    with pytest.raises(RayJobFailed, match=r"AppFailed\): torch.OutOfMemoryError: CUDA out of memory"):
        _round(tmp_path, inputs, mlflow_server, 0, {}, run_id="kfp-run-2")
    (failed,) = kube.created
    assert failed["metadata"]["name"] == "r1-dc-grpo-kfp-run-2"
    assert " --stop-at-step 2 " in failed["spec"]["entrypoint"]
    mlc = MlflowClient(mlflow_server)
    (run,) = mlc.search_runs([mlc.get_experiment_by_name("dcgrpo").experiment_id], "tags.kfp_run_id = 'kfp-run-2'")
    assert run.info.status == "FAILED"  # the step's failure is the run's

    monkeypatch.delenv("FAKE_VERL_FAIL")  # the KFP retry: the failed RayJob is kept, a next attempt submitted
    out, meta, _ = _round(tmp_path, inputs, mlflow_server, 0, {}, run_id="kfp-run-2")
    assert [job["metadata"]["name"] for job in kube.created] == ["r1-dc-grpo-kfp-run-2", "r1-dc-grpo-kfp-run-2-a2"]
    assert kube.jobs["r1-dc-grpo-kfp-run-2-a2"]["status"]["jobStatus"] == "SUCCEEDED"
    assert meta["step"] == STEPS and (out / VERL_ROUND_FILE).is_file()
    assert len(_launches(tmp_path, "kfp-run-2")) == 2


def test_verl_backend_refuses_what_cannot_work(tmp_path, inputs):
    data, model = inputs
    common = ("tiny-cpu", "dc-grpo", 0, ROUNDS)

    def step(*extra, mlflow_uri=""):
        return train_round_step(
            common[0], _overrides(tmp_path, *extra), common[1], common[2], common[3], mlflow_uri, "r",
            str(data), str(model), {}, str(tmp_path / "out"),
        )  # fmt: skip

    with pytest.raises(ConfigError, match="tracking.mlflow_uri: a RayJob's nodes .* cannot reach 'sqlite:"):
        step(mlflow_uri=f"sqlite:///{tmp_path}/m.db")
    with pytest.raises(ConfigError, match="verl.checkpoint_dir: .*ckpt is not a directory"):
        step("verl.launch=single-node")  # no volume mounted
    cfg = load_config(overrides=["model.path=/m"])
    with pytest.raises(ConfigError, match="train files s3://b/t.parquet: verl reads local paths"):
        render_overrides(cfg, train_files="s3://b/t.parquet")


def test_launcher_round_file(tmp_path):
    assert local_dir_of(["a=1", f"trainer.default_local_dir={tmp_path}"]) == str(tmp_path)
    with pytest.raises(SystemExit, match="trainer.default_local_dir=... missing"):
        local_dir_of(["a=1"])
    write_round_file(tmp_path, 6)
    assert read_stop_step(tmp_path) == 6
    write_round_file(tmp_path, None)  # a whole-run launch clears a stale stop
    assert read_stop_step(tmp_path) is None


def test_round_metrics_come_from_the_trainers_file(tmp_path, caplog):
    """The step reads a round's dc/* from the trainer's DC_METRICS_FILE: the round's steps only, a redone step's
    last line, a line a crash cut short skipped with a warning; without the file, NaN and a warning."""
    for step in range(1, 6):  # round 2 of 2-step rounds is steps 3..4
        append_dc_metrics(tmp_path, step, {"dc/discrepancy_mean": step / 10, "dc/lambda": step, "dc/violation": 0.0})
    append_dc_metrics(tmp_path, 4, {"dc/discrepancy_mean": 0.8, "dc/lambda": 40.0})  # a retried launch redid 4
    with open(tmp_path / DC_METRICS_FILE, "a") as f:
        f.write('{"step": 4, "dc/discrepancy_mean": 9')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="dcgrpo"):
        scalars, d = _verl_round_metrics(tmp_path, 2, 4)
    assert d == pytest.approx((0.3 + 0.8) / 2)
    # each key's last value in the round: dc/violation from step 3, which the redone step 4 did not log
    assert scalars == {"dc/discrepancy_mean": 0.8, "dc/lambda": 40.0, "dc/violation": 0.0}
    assert "line 7: skipped" in caplog.text

    caplog.clear()  # the next append ends the cut line, so only that one line is lost
    append_dc_metrics(tmp_path, 4, {"dc/discrepancy_mean": 0.6})
    with caplog.at_level(logging.WARNING, logger="dcgrpo"):
        assert _verl_round_metrics(tmp_path, 2, 4)[1] == pytest.approx((0.3 + 0.6) / 2)
    assert "line 7: skipped" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcgrpo"):
        scalars, d = _verl_round_metrics(tmp_path / "elsewhere", 2, 4)
    assert scalars == {} and math.isnan(d)
    assert "recorded no dc/discrepancy_mean for steps 3..4" in caplog.text


def test_submit_reattaches_to_a_job_that_is_still_there(kube):
    cfg = load_config(overrides=["model.path=/m"])
    body = rayjob.render_rayjob(cfg, render_overrides(cfg, train_files="/d/t.parquet"), name="r1-grpo-x")
    kube.jobs["r1-grpo-x"] = {**body, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    assert rayjob.submit_rayjob(kube.api, body) == "r1-grpo-x"  # the retried step follows the running job
    assert kube.created == []
