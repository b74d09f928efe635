"""A local MLflow tracking server on sqlite (the demo, kfp.local runs and the tests): start and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start_local_server(
    backend_dir: str | Path, port: int | None = None, timeout: float = 90.0, artifacts_destination: str | None = None
):
    """Start ``mlflow server`` on sqlite under ``backend_dir``; returns ``(uri, Popen)``.

    Artifacts are proxied by the server to ``artifacts_destination`` (default
    ``backend_dir/artifacts``; an ``s3://`` URI uses the server's AWS env).

    The caller owns the process (``proc.terminate()``); its log is ``backend_dir/server.log``.
    """

    backend_dir = Path(backend_dir).resolve()
    backend_dir.mkdir(parents=True, exist_ok=True)
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{backend_dir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(backend_dir / "artifacts"),
        "--serve-artifacts", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    logf = open(backend_dir / "server.log", "ab")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner: stops in ~1 s, not ~28
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    logf.close()
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}); see {backend_dir / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise TimeoutError(f"mlflow server at {uri} not healthy within {timeout:.0f}s")


def stop_local_server(proc: subprocess.Popen, kill: bool = False) -> None:
    """Stop a server from ``start_local_server`` and its worker processes (its own process group)."""

    try:
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
