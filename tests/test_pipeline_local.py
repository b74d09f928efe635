"""The whole pipeline through kfp.local: real components, real vLLM CPU engine,
real MLflow server (artifacts on a moto S3 endpoint), real registry.

Shortened: one round of two steps per method and a few evaluation problems.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from dcgrpo.mlflow_server import start_local_server, stop_local_server
from tests.conftest import REPO_ROOT, TEST_BUCKET

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # the whole pipeline; ~4 min alone, more on a shared CPU

SHORT = [
    "train.steps_per_round=2",
    "train.prompts_per_batch=4",
    "train.ppo_mini_batch=2",
    "eval.max_problems=4",
    "eval.benchmarks=[synthetic,amc23]",
    "registry.model_name=dcgrpo-e2e",
    # The gate compares accuracy; a 2-step tiny run must not be blocked by its discrepancy.
    "registry.max_discrepancy=1.0",
]


@pytest.fixture(scope="module")
def mlflow_on_s3(s3_server, tmp_path_factory):
    """An MLflow server whose artifact store is the moto S3 endpoint."""
    uri, proc = start_local_server(
        tmp_path_factory.mktemp("mlflow-s3"), artifacts_destination=f"s3://{TEST_BUCKET}/mlflow"
    )
    try:
        yield uri
    finally:
        stop_local_server(proc)


def _run_pipeline(tmp_path, mlflow_uri, extra=(), data_uri="", methods=("grpo", "dc-grpo"), rounds=1, env=None):
    """Run the pipeline in a subprocess (kfp.local's executor and vLLM both own process state)."""
    code = f"""
import json, sys
from dcgrpo.pipeline import pipeline_arguments, run_local
args = pipeline_arguments("tiny-cpu", {json.dumps(SHORT + list(extra))}, {list(methods)!r}, rounds={rounds},
                          data_uri={data_uri!r}, mlflow_uri={mlflow_uri!r})
run_local(args, {str(tmp_path / "kfp")!r})
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1500, env=env)


def test_pipeline_end_to_end_registers_a_champion(tmp_path, s3_server, mlflow_on_s3):
    t0 = int(time.time() * 1000)
    proc = _run_pipeline(tmp_path, mlflow_on_s3, [f"storage.root={tmp_path / 'store'}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout + proc.stderr
    clean = out.replace("\x1b[96m", "").replace("\x1b[0m", "")
    for task in ("prepare-data", "warm-start", "train", "export-fp8", "evaluate", "select-best",
                 "register-model", "promote"):  # fmt: skip
        pattern = rf"Task '{task}' finished with status SUCCESS"
        assert re.search(pattern, clean.replace("\x1b[92m", "")), (task, clean[-4000:])
    assert "train-round" not in clean  # one train task per method, every round in it

    client = MlflowClient(mlflow_on_s3)
    exp = client.get_experiment_by_name("dcgrpo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {t0}")
    by_method = {r.data.tags.get("method"): r for r in runs if r.data.tags.get("method")}
    assert set(by_method) == {"grpo", "dc-grpo"}
    for method, run in by_method.items():
        assert run.info.status == "FINISHED", method
        for key in ("dc/lambda", "dc/discrepancy_mean", "dc/discrepancy_p99", "reward/accuracy", "actor/pg_loss",
                    "timing/rollout_s"):  # fmt: skip
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1, 2], (method, key)
        rounds = client.get_metric_history(run.info.run_id, "dc/discrepancy_round_mean")
        assert [m.step for m in rounds] == [2], method  # a point per round, at its last step
        evals = json.loads(run.data.tags["dcgrpo.eval_metrics"])
        assert "eval/synthetic/avg_1" in evals and "eval/amc23/avg_1" in evals

    champion = client.get_model_version_by_alias("dcgrpo-e2e", "champion")
    assert champion.tags["quantization"] == "fp8"
    assert champion.run_id in {r.info.run_id for r in by_method.values()}
    assert champion.source.startswith("mlflow-artifacts:")
    # the FP8 export went through MLflow's artifact proxy into the S3 bucket
    import boto3

    keys = [
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=TEST_BUCKET, Prefix="mlflow/")[
            "Contents"
        ]
    ]
    assert any(re.search(r"/model/fp8-[0-9a-f]{12}/config\.json$", k) for k in keys)  # one folder per registered dir


def test_failing_step_fails_the_run_and_registers_nothing(tmp_path, mlflow_server):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"this is not parquet")
    t0 = int(time.time() * 1000)
    proc = _run_pipeline(tmp_path, mlflow_server, [f"storage.root={tmp_path / 'store'}", "registry.model_name=never"],
                         data_uri=str(bad))  # fmt: skip
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "corrupt.parquet" in out, out[-3000:]  # the step's error names the file
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("dcgrpo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {t0}")
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert client.search_model_versions("name = 'never'") == []


def test_pipeline_with_verl_rounds_hands_verls_model_to_export_and_registry(tmp_path, mlflow_server):
    """train.backend=verl through kfp.local: two rounds in one launch and one MLflow run, verl's HF model exported,
    evaluated and registered. verl itself needs GPUs: tests/fake_verl stands in for its main_ppo
    (see tests/test_verl_backend.py)."""
    (tmp_path / "ckpt").mkdir()
    fake = str(REPO_ROOT / "tests" / "fake_verl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [fake, os.environ.get("PYTHONPATH")]))}
    extra = [f"storage.root={tmp_path / 'store'}", "train.backend=verl", "verl.launch=single-node",
             "verl.gpus_per_node=1", f"verl.checkpoint_dir={tmp_path / 'ckpt'}", "model.sft_steps=20",
             "registry.model_name=dcgrpo-verl-e2e"]  # fmt: skip
    t0 = int(time.time() * 1000)
    proc = _run_pipeline(tmp_path, mlflow_server, extra, methods=("dc-grpo",), rounds=2, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("dcgrpo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {t0}")
    (run,) = [r for r in runs if r.data.tags.get("method") == "dc-grpo"]
    assert run.info.status == "FINISHED" and run.data.tags["backend"] == "verl"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dc/discrepancy_mean")] == [1, 2, 3, 4]
    assert "eval/synthetic/avg_1" in json.loads(run.data.tags["dcgrpo.eval_metrics"])
    (version,) = client.search_model_versions("name = 'dcgrpo-verl-e2e'")
    assert version.run_id == run.info.run_id and version.tags["quantization"] == "fp8"
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert len((run_dir / "launches.log").read_text().splitlines()) == 1  # one launch for every round
