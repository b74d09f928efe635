"""Crash and resume keep the record straight: real `dcgrpo train` processes killed with SIGKILL.

- A kill after steps past a checkpoint were flushed, then a resume: every
  metric has each step exactly once, and the run ends FINISHED.
- ``--resume`` of a finished job: exit 0, nothing touched, the run stays FINISHED.
- A kill before the first checkpoint: resume exits 2 saying to start fresh,
  and the run left RUNNING is closed as FAILED.
- A checkpoints directory whose newest checkpoint is incomplete resumes from
  the newest complete one.
- SIGTERM (an eviction): the step in flight is finished and checkpointed, the
  run marked KILLED, exit 143 with one line; ``--resume auto`` finishes the job.
  While it runs, a second process on the same ``--out`` is refused; a fresh
  run into a folder with checkpoints, or a resume with other settings, too.

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
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoints: no (complete|such) checkpoint .*start it fresh"):
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
                    proxy.held.set()  # the server has it; the client waits until the release (or its kill)
                    proxy.release.wait()
                try:
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client was killed while held
                    pass

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
    assert f"{job['ckpts']}: no such checkpoint" in resumed.stderr and "does not exist" in resumed.stderr
    assert "start it fresh" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    closed = client.get_run(run.info.run_id)
    assert closed.info.status == "FAILED" and "ended without closing" in closed.data.tags["dcgrpo.closed_reason"]
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the failed resume made no run"


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_resume_auto_finishes_and_the_folder_has_one_owner(job, proxy, mlflow_server):
    client = MlflowClient(mlflow_server)
    proxy.hold = metrics_at_or_after(1)  # step 1 of a 2-step round: the process is alive and mid-round
    log = job["dir"] / "first.log"
    first = _start(job["args"], job["dir"], log)
    deadline = time.monotonic() + 300
    while not proxy.held.wait(0.2):
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]

    second = _train(job["args"], job["dir"])  # the same --out while the first trains
    assert second.returncode == 2 and "is in use by another training process" in second.stderr, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)  # what Kubernetes sends on eviction
    time.sleep(1)
    proxy.hold = None
    proxy.release.set()
    assert first.wait(timeout=120) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "dcgrpo train: stopped: SIGTERM after step 1: checkpoint" in text and "Traceback" not in text
    assert (job["ckpts"] / "step_000001" / "manifest.json").is_file(), "the step in flight is checkpointed"
    run = _only_run(client, job["experiment"])
    assert run.info.status == "KILLED" and "SIGTERM after step 1" in run.data.tags["dcgrpo.closed_reason"]

    again = _train([*job["args"], "--resume", "auto"], job["dir"])  # a restarted pod's command
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step 4" in again.stdout
    run = _only_run(client, job["experiment"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "dc/lambda")) == [1, 2, 3, 4]

    fresh = _train(job["args"], job["dir"])  # a new run into the same folder would interleave its checkpoints
    assert fresh.returncode == 2 and "already holds checkpoints of another run" in fresh.stderr, fresh.stderr[-2000:]
    other = _train([*job["args"], "--resume", "auto", "--set", "method.name=grpo", "--set", "train.rounds=3"],
                   job["dir"])  # fmt: skip
    assert other.returncode == 2, other.stderr[-2000:]
    assert "method.name: 'dc-grpo' -> 'grpo'" in other.stderr and "train.rounds: " not in other.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 1, "the refusals made no run"


def test_resume_auto_on_an_empty_folder_starts_and_a_missing_resume_path_is_named(tmp_path):
    assert ckpt.find_resume_point(str(tmp_path / "never-written")) is None
    with pytest.raises(ckpt.CheckpointError, match=r"no-such/checkpoints: no such checkpoint .*does not exist"):
        ckpt.resolve_checkpoint(str(tmp_path / "no-such" / "checkpoints"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_retention_keeps_the_newest_complete_checkpoints(where, tiny_parts, tmp_path, request):
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        root = f"s3://{TEST_BUCKET}/keep-{uuid.uuid4().hex[:6]}/checkpoints"
    else:
        endpoint, root = None, str(tmp_path / "checkpoints")
    model, tok, opt = tiny_parts
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(storage.join(root, f"step_{step:06d}"), model, tok, opt, {"step": step}, endpoint,
                             keep=2)  # fmt: skip
    assert [n for n in storage.list_dirs(root, endpoint) if n.startswith("step_")] == ["step_000006", "step_000008"]
    assert ckpt.load_checkpoint(root, tmp_path / "cache", endpoint).state["step"] == 8


UPLOAD_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from dcgrpo import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    storage.upload_dir(sys.argv[1], sys.argv[2])
except storage.StorageError as exc:
    print(exc)
    sys.exit(3)
"""


def test_a_write_that_runs_out_of_space_leaves_no_partial_folder(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\1" * 65536)  # over the 4 KiB the child may write
    dest = tmp_path / "out" / "step_000002"
    dest.parent.mkdir()
    proc = subprocess.run([sys.executable, "-c", UPLOAD_UNDER_A_FILE_SIZE_LIMIT, str(src), str(dest)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{dest}: could not write (" in proc.stdout and "File too large" in proc.stdout
    assert "the partial copy was removed" in proc.stdout
    assert list(dest.parent.iterdir()) == [], "neither the checkpoint nor its .partial staging folder remains"


def _unwritable_dir(tmp_path: Path) -> tuple[Path, str]:
    """A real folder this process cannot write, and the reason the OS gives: mode 555, or for root (who writes
    through permission bits) sysfs, which refuses new entries to every user."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        return ro / "run", "Permission denied"
    if not Path("/sys").is_mount():
        pytest.skip("running as root without sysfs: no folder here refuses root")
    return Path("/sys/fs/dcgrpo-readonly-test/run"), "Operation not permitted"


@pytest.mark.slow
def test_an_unwritable_out_fails_before_any_work_naming_it(s3_server, mlflow_server, tmp_path):
    unwritable, reason = _unwritable_dir(tmp_path)
    experiment = f"ro-{uuid.uuid4().hex[:6]}"
    common = ["--set", f"storage.root={tmp_path / 'root'}", "--set", f"tracking.mlflow_uri={mlflow_server}",
              "--set", f"tracking.experiment={experiment}", "--set", f"storage.s3_endpoint_url={s3_server}"]  # fmt: skip
    for out, why in ((str(unwritable), reason), (f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run", "no such bucket")):
        t0 = time.monotonic()
        proc = subprocess.run([DCGRPO, "train", *common, "--out", out], capture_output=True, text=True, env=_env(),
                              timeout=120, cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"--out: cannot write to {out}" in proc.stderr and why in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60
    assert MlflowClient(mlflow_server).get_experiment_by_name(experiment) is None, "no run was created"
