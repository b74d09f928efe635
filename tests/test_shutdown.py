"""SIGTERM to `dcgrpo demo` (a CI timeout, `docker stop`, an evicted pod): it stops what it started and says so."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))
pytestmark = pytest.mark.slow


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def test_sigterm_to_the_demo_stops_its_mlflow_server_and_exits_143(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([DCGRPO, "demo", "--set", f"storage.root={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines, uri, deadline = [], None, time.monotonic() + 180
    while uri is None:
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, "".join(lines)[-3000:]
        lines.append(line)
        found = re.search(r"local MLflow server at (http://\S+)", line)
        uri = found.group(1) if found else None
    assert _answers(f"{uri}/health")
    time.sleep(3)  # the pipeline's first step is starting
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 143, out[-3000:]
    assert "dcgrpo demo: stopped: SIGTERM received" in out and "Traceback" not in out
    assert not _answers(f"{uri}/health"), "the demo's MLflow server was left running"
