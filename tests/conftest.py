"""Shared fixtures: real servers, started once per test session.

- ``mlflow_server``: a real ``mlflow server`` on sqlite (a subprocess on a free
  loopback port), yields its URI.
- ``mlc`` / ``model_dir``: a registry client of that server and a minimal model directory.
- ``s3_server``: a real S3 endpoint (``moto_server`` in a subprocess), yields
  its endpoint URL with credentials set in the environment and the bucket
  ``dcgrpo-test`` created.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_BUCKET = "dcgrpo-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server in its own process: in-process (ThreadedMotoServer) it
    loads flask into the test process, after which vLLM's kernel registration
    fails ("Working outside of application context")."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    cmd = [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    keys = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DCGRPO_S3_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        wait_http(f"{endpoint}/moto-api/", timeout=60, proc=proc)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=TEST_BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on sqlite with a local artifact root."""
    from dcgrpo.mlflow_server import start_local_server, stop_local_server

    uri, proc = start_local_server(tmp_path_factory.mktemp("mlflow"))
    try:
        yield uri
    finally:
        stop_local_server(proc)  # the whole process group: uvicorn and job workers too


@pytest.fixture
def mlc(mlflow_server):
    """An MLflow tracking + registry client of the session's server."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture
def model_dir(tmp_path):
    """The smallest directory the registry accepts as a model (config.json + one weight file)."""
    import json

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The data samples shipped in the package (dcgrpo/data/samples, with their PROVENANCE.md): real rows of
    DAPO-Math-17K and the six benchmarks, present in every clone and every installed copy."""
    from dcgrpo.data.benchmarks import samples_dir

    d = samples_dir()
    assert (d / "PROVENANCE.md").is_file(), f"{d}: the package's data samples are missing"
    return d
