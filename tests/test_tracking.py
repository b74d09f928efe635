"""MLflow tracking against real servers: batching, local fallback, FAILED runs, server loss."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from dcgrpo.config import TrackingConfig
from dcgrpo.mlflow_server import start_local_server, stop_local_server
from dcgrpo.tracking import TrackingUnavailable, resolve_tracking_uri, start_run

pytestmark = pytest.mark.slow


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig(), str(tmp_path)) == "http://env:5000"
    assert resolve_tracking_uri(TrackingConfig(mlflow_uri="http://cfg:1"), str(tmp_path)) == "http://cfg:1"


def test_local_fallback_batched_metrics_and_failed_status(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(flush_every=100)
    with start_run(cfg, storage_root=str(tmp_path), run_name="ok", params={"a.b": 1, "c": [1, 2]}) as run:
        for step in range(1, 6):
            run.log_metrics({"dc/lambda": step * 0.1, "reward/mean": 0.5}, step=step)
        run.log_dict({"x": 1}, "cfg/x.json")
    client = MlflowClient(resolve_tracking_uri(cfg, str(tmp_path)))
    hist = client.get_metric_history(run.run_id, "dc/lambda")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5]
    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.params["c"] == "[1, 2]"
    with pytest.raises(RuntimeError, match="boom"):
        with start_run(cfg, storage_root=str(tmp_path), run_name="bad") as bad:
            bad.log_metrics({"m": 1.0}, step=1)
            raise RuntimeError("boom")
    assert client.get_run(bad.run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(bad.run_id, "m")] == [1.0]  # flushed before failing


def test_server_goes_away_then_comes_back_loses_no_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # MLflow's retries would wait ~30 s per call here
    uri, proc = start_local_server(tmp_path / "srv")
    port = int(uri.rsplit(":", 1)[1])
    cfg = TrackingConfig(mlflow_uri=uri, flush_every=1, retry_timeout_s=1.0)
    try:
        with pytest.raises(TrackingUnavailable, match="unsent metric values saved"):
            with start_run(cfg, storage_root=str(tmp_path), run_name="flaky") as run:
                run.log_metrics({"dc/lambda": 0.1}, step=1)  # sent
                stop_local_server(proc, kill=True)  # the server dies mid-round
                run.log_metrics({"dc/lambda": 0.2}, step=2)  # buffered; no exception mid-round
                run.log_metrics({"dc/lambda": 0.3}, step=3)
                run.flush(strict=True)  # round boundary: retries, spills, raises
        assert run.spill_path.is_file()
        uri, proc = start_local_server(tmp_path / "srv", port=port)  # same store comes back
        with start_run(cfg, storage_root=str(tmp_path), run_id=run.run_id) as again:
            again.log_metrics({"dc/lambda": 0.4}, step=4)
        hist = MlflowClient(uri).get_metric_history(run.run_id, "dc/lambda")
        assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
        assert not run.spill_path.exists()
        assert MlflowClient(uri).get_run(run.run_id).info.status == "FINISHED"
    finally:
        stop_local_server(proc)


CHILD = """
import sys, time
from dcgrpo.config import TrackingConfig
from dcgrpo.tracking import start_run
with start_run(TrackingConfig(), storage_root=sys.argv[1], run_name="job", tags={"config_hash": "h1"}) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_runs_left_running_by_a_killed_process_are_closed_and_live_ones_kept(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    from dcgrpo.tracking import PROCESS_TAG, close_orphaned_runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    procs, ids = [], []
    try:
        for _ in range(2):  # one after the other: two first users of a sqlite store race on its schema
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                          text=True))  # fmt: skip
            ids.append(procs[-1].stdout.readline().strip())
        dead, alive = ids
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        cfg = TrackingConfig()
        assert close_orphaned_runs(cfg, storage_root=str(tmp_path), config_hash="h1") == [dead]
        client = MlflowClient(resolve_tracking_uri(cfg, str(tmp_path)))
        assert client.get_run(dead).info.status == "FAILED"
        assert client.get_run(alive).info.status == "RUNNING", "a live process's run is left alone"
        assert client.get_run(alive).data.tags[PROCESS_TAG].split(":")[1] == str(procs[1].pid)
        assert close_orphaned_runs(cfg, storage_root=str(tmp_path), config_hash="other") == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_resumed_run_does_not_send_points_the_server_has(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = TrackingConfig(flush_every=1)
    with pytest.raises(RuntimeError, match="killed"):
        with start_run(cfg, storage_root=str(tmp_path), run_name="r") as run:
            for step in (1, 2, 3):  # checkpoint at 2; step 3 sent before the crash
                run.log_metrics({"m": step * 1.0}, step=step)
            raise RuntimeError("killed")
    with start_run(cfg, storage_root=str(tmp_path), run_id=run.run_id) as again:
        assert again.skip_logged_after(2) == 1
        for step in (3, 4):
            again.log_metrics({"m": step * 1.0}, step=step)
    hist = MlflowClient(resolve_tracking_uri(cfg, str(tmp_path))).get_metric_history(run.run_id, "m")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]


@pytest.mark.parametrize("uri", ["mlflow:5000", "localhost:5000", "mlflow.kubeflow.svc:5000", "./mlruns"])
def test_a_tracking_uri_without_a_scheme_is_one_clear_error(uri, monkeypatch, tmp_path, capsys):
    """MLflow itself would read these as a file store and fail later about its filesystem backend."""
    from dcgrpo.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a local store (./outputs/mlflow.db) would appear here
    rc = main(["promote", "--version", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"MLFLOW_TRACKING_URI={uri!r} has no scheme" in err and "http://" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())
    assert resolve_tracking_uri(TrackingConfig(mlflow_uri="http://mlflow:5000"), str(tmp_path)) == "http://mlflow:5000"
