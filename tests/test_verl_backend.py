"""The pipeline train task's verl backend (``train.backend=verl``), both launches: one launch for all rounds.

What cannot exist here is faked, and only that: verl's training itself needs
GPUs, so the launched process finds ``tests/fake_verl`` (a stand-in for
``verl.trainer.main_ppo`` that resumes, stops, logs to MLflow and writes
verl's checkpoint layout) on its PYTHONPATH; and the Kubernetes API server is
a small HTTP server that *runs* each created RayJob's entrypoint. Everything
else is real: our launcher, the step, a real MLflow server, the real
``kubernetes`` client. The dc_grpo trainer's round stop is tested against
real verl in tests/verl/test_plugin.py.
"""

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
from dcgrpo.model_refs import MODEL_REF_FILE, latest_model_dir
from dcgrpo.models import build_tiny_model
from dcgrpo.stages.train import train_step
from dcgrpo.stages.train_verl import RUN_FILE, verl_round_metrics
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


def _train(tmp_path, inputs, mlflow_uri, *extra, run_id="kfp-run-1", out="model"):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    data, model = inputs
    return train_step("tiny-cpu", _overrides(tmp_path, *extra), "dc-grpo", ROUNDS, mlflow_uri, run_id, str(data),
                      str(model), str(tmp_path / out))  # fmt: skip


def _launches(tmp_path, run_id="kfp-run-1"):
    log = tmp_path / "ckpt" / f"dc-grpo-{run_id}" / "launches.log"
    return log.read_text().splitlines() if log.is_file() else []


def test_single_node_trains_every_round_in_one_launch_logs_each_round_and_hands_over_the_model(
    tmp_path, inputs, mlflow_server, fake_verl_path
):
    extra = ("verl.launch=single-node",)
    meta, scalars = _train(tmp_path, inputs, mlflow_server, *extra)
    assert len(_launches(tmp_path)) == 1  # all rounds, one launch: verl checkpoints each round itself
    assert meta["step"] == ROUNDS * STEPS and meta["backend"] == "verl" and meta["round"] == ROUNDS
    assert meta["rollout_engine"].startswith("vllm ") and "(verl " in meta["rollout_engine"]  # the launch's
    assert meta["discrepancy"] == pytest.approx((1e-3 / 3 + 1e-3 / 4) / 2)  # mean over the last round's steps
    assert scalars["dc/lambda_next"] == meta["lambda"] > 0  # the KFP metrics carry MLflow's names and values
    assert scalars["dc/discrepancy_mean"] == pytest.approx(1e-3 / 4)  # the last step, from the trainer's file
    assert scalars["dc/discrepancy_round_mean"] == meta["discrepancy"]
    out = tmp_path / "model"  # verl's HF model, what export and evaluation read
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    base = {p.name: p.read_bytes() for p in inputs[1].glob("*.safetensors")}
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == base  # (the stand-in trains nothing)

    mlc = MlflowClient(mlflow_server)
    run = mlc.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == "verl"
    assert [m.step for m in mlc.get_metric_history(run.info.run_id, "dc/discrepancy_mean")] == [1, 2, 3, 4]
    per_round = {m.step: m.value for m in mlc.get_metric_history(run.info.run_id, "dc/discrepancy_round_mean")}
    assert per_round == pytest.approx({2: (1e-3 / 1 + 1e-3 / 2) / 2, 4: (1e-3 / 3 + 1e-3 / 4) / 2})
    assert run.data.params["trainer/total_training_steps"] == str(ROUNDS * STEPS)

    again, _ = _train(tmp_path, inputs, mlflow_server, *extra, out="retry")  # a retried task, checkpoint complete
    assert len(_launches(tmp_path)) == 1  # not launched again
    assert again["mlflow_run_id"] == meta["mlflow_run_id"] and again["step"] == meta["step"]
    per_round = mlc.get_metric_history(run.info.run_id, "dc/discrepancy_round_mean")
    assert sorted(m.step for m in per_round) == [2, 4]  # no round logged twice


def test_on_the_checkpoint_volume_the_train_task_references_verls_model(
    tmp_path, inputs, mlflow_server, fake_verl_path, monkeypatch
):
    """With the checkpoint volume mounted (a cluster), the task's artifact references the HF model verl saved there
    instead of copying it through the KFP artifact store; export and evaluation read through it."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.setenv("DCGRPO_MODEL_STORE", str(tmp_path / "ckpt"))  # verl.checkpoint_dir = the mount
    _train(tmp_path, inputs, mlflow_server, "verl.launch=single-node")
    out = tmp_path / "model"
    assert [p.name for p in out.iterdir()] == [MODEL_REF_FILE]
    hf = Path(latest_model_dir(str(out)))
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


def test_rayjob_fails_with_the_jobs_error_then_a_retry_resubmits_in_the_same_run(
    tmp_path, inputs, mlflow_server, fake_verl_path, kube, monkeypatch
):
    monkeypatch.setenv("FAKE_VERL_FAIL", "1")
    with pytest.raises(RayJobFailed, match=r"AppFailed\): torch.OutOfMemoryError: CUDA out of memory"):
        _train(tmp_path, inputs, mlflow_server, run_id="kfp-run-2")
    (failed,) = kube.created
    assert failed["metadata"]["name"] == "dc-grpo-kfp-run-2"  # one RayJob per method, all rounds
    assert f" --stop-at-step {ROUNDS * STEPS} " in failed["spec"]["entrypoint"]
    mlc = MlflowClient(mlflow_server)
    (run,) = mlc.search_runs([mlc.get_experiment_by_name("dcgrpo").experiment_id], "tags.kfp_run_id = 'kfp-run-2'")
    assert run.info.status == "FAILED"  # the task's failure is the run's

    monkeypatch.delenv("FAKE_VERL_FAIL")  # the KFP retry: the failed RayJob is kept, a next attempt submitted
    meta, _ = _train(tmp_path, inputs, mlflow_server, run_id="kfp-run-2")
    assert [job["metadata"]["name"] for job in kube.created] == ["dc-grpo-kfp-run-2", "dc-grpo-kfp-run-2-a2"]
    assert kube.jobs["dc-grpo-kfp-run-2-a2"]["status"]["jobStatus"] == "SUCCEEDED"
    assert meta["step"] == ROUNDS * STEPS and meta["mlflow_run_id"] == run.info.run_id  # re-attached (RUN_FILE)
    assert (tmp_path / "ckpt" / "dc-grpo-kfp-run-2" / RUN_FILE).is_file()
    assert mlc.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(_launches(tmp_path, "kfp-run-2")) == 2


def test_verl_backend_refuses_what_cannot_work(tmp_path, inputs):
    data, model = inputs

    def step(*extra, mlflow_uri=""):
        return train_step("tiny-cpu", _overrides(tmp_path, *extra), "dc-grpo", ROUNDS, mlflow_uri, "r", str(data),
                          str(model), str(tmp_path / "out"))  # fmt: skip

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
        scalars, d = verl_round_metrics(tmp_path, 2, 4)
    assert d == pytest.approx((0.3 + 0.8) / 2)
    # each key's last value in the round: dc/violation from step 3, which the redone step 4 did not log
    assert scalars == {"dc/discrepancy_mean": 0.8, "dc/lambda": 40.0, "dc/violation": 0.0}
    assert "line 7: skipped" in caplog.text

    caplog.clear()  # the next append ends the cut line, so only that one line is lost
    append_dc_metrics(tmp_path, 4, {"dc/discrepancy_mean": 0.6})
    with caplog.at_level(logging.WARNING, logger="dcgrpo"):
        assert verl_round_metrics(tmp_path, 2, 4)[1] == pytest.approx((0.3 + 0.6) / 2)
    assert "line 7: skipped" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dcgrpo"):
        scalars, d = verl_round_metrics(tmp_path / "elsewhere", 2, 4)
    assert scalars == {} and math.isnan(d)
    assert "recorded no dc/discrepancy_mean for steps 3..4" in caplog.text


def test_submit_reattaches_to_a_job_that_is_still_there(kube):
    cfg = load_config(overrides=["model.path=/m"])
    body = rayjob.render_rayjob(cfg, render_overrides(cfg, train_files="/d/t.parquet"), name="r1-grpo-x")
    kube.jobs["r1-grpo-x"] = {**body, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}}
    assert rayjob.submit_rayjob(kube.api, body) == "r1-grpo-x"  # the retried step follows the running job
    assert kube.created == []
