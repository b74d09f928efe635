"""Crash and resume keep the record straight: real `dcgrpo train` processes killed with SIGKILL.

- A kill after steps past a checkpoint were flushed, then a resume: every
  metric has each step exactly once, and the run ends FINISHED.
- ``--resume`` of a finished job: exit 0, nothing touched, the run stays FINISHED.
- A kill before the first checkpoint: resume exits 2 saying to start fresh,
  and the run left RUNNING is closed as FAILED.
- A checkpoints directory whose newest checkpoint is incomplete resumes from
  the newest complete one.

To kill at a known point, the training process talks to MLflow through
``HoldingProxy``: it forwards a chosen request (so the server stores it) and
then withholds the answer, so the process is stuck right after that flush
and cannot reach the next checkpoint before the kill.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from dcgrpo import storage
from dcgrpo.config import load_config
from dcgrpo.data.synthetic import write_synthetic_splits
from dcgrpo.models import build_tiny_model
from dcgrpo.train import checkpoint as ckpt
from tests.conftest import TEST_BUCKET

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))
TINY = [
    "model.sft_steps=20", "train.rounds=2", "train.steps_per_round=2", "train.prompts_per_batch=4",
    "train.ppo_mini_batch=2", "data.synthetic_val_size=16", "tracking.flush_every=1",
]  # fmt: skip


# ----------------------------------------------------------------------------- the newest complete checkpoint


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    cfg = load_config(overrides=["model.sft_steps=0"])
    d = build_tiny_model(cfg.model, tmp_path_factory.mktemp("tiny") / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    return model, tok, opt


def _save(root: str, step: int, parts, endpoint=None) -> str:
    model, tok, opt = parts
    uri = storage.join(root, f"step_{step:06d}")
    return ckpt.save_checkpoint(uri, model, tok, opt, {"step": step}, endpoint)


def _remove(uri: str, endpoint: str | None) -> None:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        storage.s3_client(endpoint).delete_object(Bucket=bucket, Key=key)
    else:
        Path(uri).unlink()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_resume_takes_the_newest_complete_checkpoint(where, tiny_parts, tmp_path, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        root = f"s3://{TEST_BUCKET}/resolve-{uuid.uuid4().hex[:6]}/checkpoints"
    else:
        endpoint, root = None, str(tmp_path / "checkpoints")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints: no complete checkpoint .*start it fresh"):
        ckpt.load_checkpoint(root, tmp_path / "cache", endpoint)  # killed before the first checkpoint
    _save(root, 2, tiny_parts, endpoint)
    _remove(storage.join(root, "latest"), endpoint)  # killed after publishing step 2, before writing `latest`
    assert ckpt.load_checkpoint(root, tmp_path / "cache", endpoint).state["step"] == 2
    # Killed while writing step 4: locally a staging dir, on S3 objects without the completion marker.
    if where == "s3":
        storage.write_bytes(storage.join(root, "step_000004", "model.safetensors"), b"partial", endpoint)
    else:
        (Path(root) / ".step_000004.partial").mkdir()
        (Path(root) / "step_000004").mkdir()
        (Path(root) / "step_000004" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(root, endpoint) == storage.join(root, "step_000002")
    with pytest.raises(ckpt.CheckpointError, match=r"step_000004: no complete checkpoint"):
        ckpt.load_checkpoint(storage.join(root, "step_000004"), tmp_path / "cache", endpoint)


# ----------------------------------------------------------------------------- real processes, killed


class HoldingProxy:
    """An HTTP proxy in front of the MLflow server that can hold one request's answer (see module docstring)."""

    def __init__(self, target: str) -> None:
        self.target = urlsplit(target).netloc
        self.hold = None  # predicate(path, json body) -> bool
        self.held, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if proxy.hold is not None and not proxy.held.is_set() and proxy.hold(self.path, body):
                    proxy.held.set()  # the server has it; the client waits forever
                    proxy.release.wait()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


def metrics_at_or_after(step: int):
    """Hold the first metric batch holding a point at ``step`` or later."""

    def pred(path: str, body: bytes) -> bool:
        if not path.endswith("/runs/log-batch"):
            return False
        return any(m["step"] >= step for m in json.loads(body or b"{}").get("metrics", []))

    return pred


@pytest.fixture
def proxy(mlflow_server):
    p = HoldingProxy(mlflow_server)
    yield p
    p.close()


def _env() -> dict[str, str]:
    env = dict(os.environ, MLFLOW_HTTP_REQUEST_TIMEOUT="600")  # a held request must not time out before the kill
    env.pop("DCGRPO_S3_ENDPOINT_URL", None)  # the endpoint comes from the config alone (data on S3 below)
    return env


def _start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([DCGRPO, "train", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)  # fmt: skip


def _kill_when_held(proc: subprocess.Popen, proxy: HoldingProxy, log: Path, timeout: float = 300) -> None:
    """SIGKILL the training process (and its reward workers: the whole group) once the proxy holds it."""
    deadline = time.monotonic() + timeout
    while not proxy.held.wait(0.2):
        assert proc.poll() is None, (
            f"training exited ({proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, "kill point never reached"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proxy.hold = None
    proxy.release.set()


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DCGRPO, "train", *args], cwd=cwd, capture_output=True, text=True, env=_env(), timeout=400)


def _only_run(client: MlflowClient, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory):
    """Data on S3 and a storage root shared by this module's jobs (one SFT warm start, cached by config)."""
    tmp = tmp_path_factory.mktemp("resume")
    cfg = load_config(overrides=TINY)
    prefix = f"s3://{TEST_BUCKET}/resume-data-{uuid.uuid4().hex[:6]}"
    for p in write_synthetic_splits(cfg.data, tmp / "data"):
        storage.write_bytes(f"{prefix}/{p.name}", p.read_bytes(), s3_server)
    return [*TINY, f"data.train_path={prefix}/train.parquet", f"data.val_path={prefix}/val.parquet",
            f"storage.s3_endpoint_url={s3_server}", f"storage.root={tmp / 'root'}"]  # fmt: skip


@pytest.fixture
def job(shared, proxy, tmp_path):
    """One small job's CLI arguments: data reached through storage.s3_endpoint_url only (not the env)."""
    experiment = f"resume-{uuid.uuid4().hex[:8]}"
    sets = [*shared, f"tracking.mlflow_uri={proxy.uri}", f"tracking.experiment={experiment}"]
    args = [a for s in sets for a in ("--set", s)] + ["--out", str(tmp_path / "run")]
    return {"args": args, "experiment": experiment, "ckpts": tmp_path / "run" / "checkpoints", "dir": tmp_path}


@pytest.mark.slow
def test_kill_after_a_flush_past_the_checkpoint_then_resume_logs_each_point_once(job, proxy, mlflow_server):
    """Then ``--resume`` of the finished job is a no-op that leaves the run FINISHED (exit 0)."""
    client = MlflowClient(mlflow_server)
    proxy.hold = metrics_at_or_after(3)  # step 3 sent, after the checkpoint at step 2
    log = job["dir"] / "first.log"
    _kill_when_held(_start(job["args"], job["dir"], log), proxy, log)
    assert (job["ckpts"] / "step_000002" / "manifest.json").is_file() and not (job["ckpts"] / "step_000004").exists()
    run = _only_run(client, job["experiment"])
    assert run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dc/lambda")] == [1, 2, 3]

    resumed = _train([*job["args"], "--resume", str(job["ckpts"])], job["dir"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = _only_run(client, job["experiment"])
    assert run.info.status == "FINISHED"
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: duplicated steps {sorted(steps)}"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "dc/lambda")) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")) == [0, 2, 4]

    t0 = time.monotonic()
    again = _train([*job["args"], "--resume", str(job["ckpts"])], job["dir"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr and "step 4" in again.stdout and "Traceback" not in again.stderr
    assert time.monotonic() - t0 < 60
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_then_resume_says_start_fresh_and_closes_the_run(job, proxy, mlflow_server):
    client = MlflowClient(mlflow_server)
    proxy.hold = metrics_at_or_after(0)  # the first metric batch: held-out accuracy before step 1
    log = job["dir"] / "first.log"
    _kill_when_held(_start(job["args"], job["dir"], log), proxy, log)
    run = _only_run(client, job["experiment"])
    assert run.info.status == "RUNNING" and not list(job["ckpts"].glob("step_*"))

    resumed = _train([*job["args"], "--resume", str(job["ckpts"])], job["dir"])
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    assert f"{job['ckpts']}: no complete checkpoint" in resumed.stderr and "start it fresh" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and "ended without closing" in closed.data.tags["dcgrpo.closed_reason"]
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the failed resume made no run"
