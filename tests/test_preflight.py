"""Fail before the work: storage, inputs and MLflow are checked in seconds, before any engine or MLflow run.

Real endpoints only: a moto S3 server, a real MLflow server, closed ports for
the unreachable cases.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
from mlflow.tracking import MlflowClient

from dcgrpo.config import load_config
from dcgrpo.errors import ServiceUnavailable
from dcgrpo.preflight import check_run_environment
from dcgrpo.stages.train import train_step
from dcgrpo.storage import StorageError
from tests.conftest import TEST_BUCKET, free_port

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))


def cfg_with(*overrides: str):
    return load_config(overrides=list(overrides))


def test_local_root_is_made_and_probed_and_an_unwritable_one_is_named(tmp_path):
    check_run_environment(cfg_with(f"storage.root={tmp_path / 'new' / 'root'}"))
    assert list((tmp_path / "new" / "root").iterdir()) == [], "probe file removed"
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"storage.root: cannot write to .*file/root"):
        check_run_environment(cfg_with(f"storage.root={tmp_path / 'file' / 'root'}"))


def test_s3_root_ok_leaves_nothing_behind(s3_server):
    cfg = cfg_with(f"storage.root=s3://{TEST_BUCKET}/preflight-ok", f"storage.s3_endpoint_url={s3_server}")
    check_run_environment(cfg, tracking_uri="sqlite:///unused.db")
    listing = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=TEST_BUCKET, Prefix="preflight-ok")
    assert listing.get("KeyCount", 0) == 0


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing bucket", r"storage.root: cannot write to s3://no-such-bucket-x/p: no such bucket at endpoint http"),
        ("wrong endpoint", r"storage.root: cannot write to s3://dcgrpo-test/p: endpoint http://127.0.0.1:\d+ unreach"),
        ("no credentials", r"storage.root: cannot write to s3://dcgrpo-test/p: no S3 credentials"),
    ],
)
def test_s3_root_problems_fail_in_seconds_naming_field_and_uri(case, match, s3_server, tmp_path, monkeypatch):
    bucket, endpoint = TEST_BUCKET, s3_server
    if case == "missing bucket":
        bucket = "no-such-bucket-x"
    elif case == "wrong endpoint":
        endpoint = f"http://127.0.0.1:{free_port()}"
    else:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(var)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = cfg_with(f"storage.root=s3://{bucket}/p", f"storage.s3_endpoint_url={endpoint}")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=match):
        check_run_environment(cfg, tracking_uri="sqlite:///unused.db")
    assert time.monotonic() - t0 < 8


def test_missing_inputs_are_named(s3_server, tmp_path):
    base = [f"storage.root={tmp_path}", f"storage.s3_endpoint_url={s3_server}"]
    with pytest.raises(StorageError, match=rf"data.train_path: s3://{TEST_BUCKET}/nope.parquet does not exist"):
        check_run_environment(cfg_with(*base, f"data.train_path=s3://{TEST_BUCKET}/nope.parquet"))
    with pytest.raises(StorageError, match=r"model.path: .*no-model does not exist"):
        check_run_environment(cfg_with(*base, f"model.path={tmp_path / 'no-model'}"))


def test_unreachable_mlflow_fails_in_seconds_and_a_live_one_passes(mlflow_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=rf"tracking.mlflow_uri: MLflow server {dead} is unreachable"):
        check_run_environment(cfg_with(f"storage.root={tmp_path}", f"tracking.mlflow_uri={dead}"))
    assert time.monotonic() - t0 < 5
    check_run_environment(cfg_with(f"storage.root={tmp_path}", f"tracking.mlflow_uri={mlflow_server}"))


def test_pipeline_train_task_checks_mlflow_before_its_compute(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable, match="MLflow server"):
        train_step("tiny-cpu", [], "grpo", 1, dead, "kfp-1", str(tmp_path), str(tmp_path), str(tmp_path / "out"))


@pytest.mark.slow
def test_train_with_a_missing_bucket_exits_2_in_seconds_and_creates_no_run(s3_server, mlflow_server, tmp_path):
    """Before: a whole round of compute, then a failed upload and a FAILED MLflow run."""
    experiment = f"preflight-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    proc = subprocess.run(
        [DCGRPO, "train", "--set", "storage.root=s3://no-such-bucket-x/runs", "--set", f"tracking.mlflow_uri={mlflow_server}",
         "--set", f"tracking.experiment={experiment}", "--set", "model.sft_steps=20"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "storage.root: cannot write to s3://no-such-bucket-x/runs: no such bucket" in proc.stderr
    assert "Traceback" not in proc.stderr and elapsed < 60
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None, "no MLflow run (or experiment) made"
    assert not (tmp_path / "outputs" / "work").exists(), "no model built"
