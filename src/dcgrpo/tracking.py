"""MLflow tracking: one run per training job, batched step metrics (plots: ``dcgrpo.plots``; a local server:
``dcgrpo.mlflow_server``).

URI resolution (``resolve_tracking_uri``): ``tracking.mlflow_uri`` from the
config, else ``$MLFLOW_TRACKING_URI``, else a local sqlite store
``<storage.root>/mlflow.db`` (artifacts beside it), so a run always records
somewhere.

Server-goes-away behaviour (decided here for the whole project):
- ``Run.log_metrics`` only appends to an in-memory buffer; ``flush`` sends it
  with ``MlflowClient.log_batch`` (chunks of 1,000). A failed send keeps the
  buffer and is retried at the next flush, so a server restart within a
  round costs nothing.
- At a round boundary the loop writes its checkpoint first and then calls
  ``flush(strict=True)``, which retries for ``tracking.retry_timeout_s``. If
  the server is still unreachable, the unsent metrics are spilled to
  ``<spill_dir>/<run_id>.jsonl`` and ``TrackingUnavailable`` is raised: the
  job stops cleanly at the round boundary with its checkpoint intact.
  Resuming with the same ``run_id`` replays the spilled metrics first, so no
  metric is lost.
- A run that ends with an exception is marked FAILED (KILLED for Ctrl-C),
  best effort when the server is gone.

Crashes (kill -9, OOM, a lost node) get no chance to mark their run, so:
- every run carries the tag ``dcgrpo.process`` (``host:pid:start time``) of
  the process writing to it, renewed when a resume re-attaches it;
  ``close_orphaned_runs`` (called by the next ``dcgrpo train`` of the same
  config) marks FAILED the RUNNING runs of that config whose process is gone
  from this host. Runs of another host are left alone (a pod cannot see
  another pod's processes): the pipeline's exit handler
  (``dcgrpo.stages.publish.mark_failed_step``) closes those.
- a resumed run recomputes the steps after its checkpoint, some of which the
  crashed process had already sent: ``Run.skip_logged_after`` reads what the
  server holds past the checkpoint once, and those (key, step) points are not
  sent again (the recomputed values are the same; exact resume).

Transient server errors (5xx, 429, refused or reset connections) are retried
on every MLflow call we make, by MLflow's own HTTP layer with a bounded budget
(``mlflow_client``: 5 retries, backoff 0, 2, 4, 8, 16 s, so a server restart
or one 503 costs nothing and a dead server surfaces in about 30 s; the
``MLFLOW_HTTP_REQUEST_*`` variables override it). A retried request may have
reached the server the first time, so every create we make is idempotent:
runs carry a creation token and duplicates are deleted (``start_run``), model
versions are looked up by run and directory (``dcgrpo.registry``), the
promotion lock recognises its own token; logging the same metric, param, tag
or alias twice is a no-op in MLflow.

Metrics become Python floats in exactly one place, ``scalarize``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcgrpo.config import ConfigError
from dcgrpo.errors import ServiceUnavailable
from dcgrpo.shutdown import Terminated
from dcgrpo.storage import local_root

log = logging.getLogger(__name__)

# The names of the quantities the demo table, MLflow, the KFP report and the registry's tags all show.
ROUND_DISCREPANCY = "dc/discrepancy_round_mean"
"""The mean over a round's steps of the batch-mean discrepancy ``dc/discrepancy_mean``: what method selection and
the promotion gate compare (the registry's ``dc/discrepancy_final`` of a version is its last round's), logged at
each round's last step."""
LAMBDA_KEY = "dc/lambda_next"
"""Lambda after a step's dual update (Eq. 11): the one a checkpoint keeps and the next round starts from. A run's
final lambda (the registry's ``dc/lambda_final``, the demo table, the report) is its last step's value of it."""
KFP_RUN_TAG = "kfp_run_id"
"""On every MLflow run a pipeline run creates, so the exit handler can find and fail them."""
EVAL_METRICS_TAG = "dcgrpo.eval_metrics"
EVAL_ENGINE_TAG = "dcgrpo.eval_engine"

MAX_BATCH = 1000  # MLflow's log_batch limit on metrics per request
ERROR_TAG = "dcgrpo.error"
"""On a run that ended FAILED in this process: the exception (type and message) that ended it."""
PROCESS_TAG = "dcgrpo.process"
"""``host:pid:start time`` of the process writing to a run (see module docstring)."""
CREATE_TOKEN_TAG = "dcgrpo.create_token"
"""A run's creation token: a create retried after the server had done it leaves a duplicate to delete."""
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",  # MLflow's default 7 with factor 2 waits ~4 min on a dead server
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # urllib3: 0, 2, 4, 8, 16 s between tries
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",  # waiters after one outage do not retry in lockstep
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # per request; a large artifact upload is chunked by MLflow
}
"""MLflow's own retry settings for every call we make (an environment variable of the same name wins)."""


def mlflow_client(uri: str, registry_uri: str | None = None):
    """The one way the project builds an ``MlflowClient``: MLflow's HTTP retries on, bounded (``HTTP_RETRY_ENV``).

    MLflow retries every method (POST included) on 429/500/502/503/504 and on
    refused or reset connections; it reads these variables at each request.
    """
    from mlflow.tracking import MlflowClient  # mlflow: `dcgrpo submit` runs without it

    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri, registry_uri=registry_uri)


class TrackingUnavailable(ServiceUnavailable):
    """The tracking server stayed unreachable past the retry budget."""


def scalarize(metrics: dict[str, Any]) -> dict[str, float]:
    """Tensors / numpy scalars -> floats, once per step (a host sync for device tensors)."""
    out = {}
    for k, v in metrics.items():
        out[k] = float(v.item() if hasattr(v, "item") else v)
    return out


def resolve_tracking_uri(tracking_cfg, storage_root: str) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else local sqlite under ``storage_root``."""
    if tracking_cfg.mlflow_uri:
        return _checked_uri(tracking_cfg.mlflow_uri, "tracking.mlflow_uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _checked_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    return f"sqlite:///{_local_root(storage_root) / 'mlflow.db'}"


def _checked_uri(uri: str, where: str) -> str:
    """A URI with a scheme: MLflow reads a bare ``host:port`` or path as a file store (deprecated, and not the
    server the user meant), failing later with a message about its filesystem backend."""
    if uri.strip() == "databricks":  # MLflow's one scheme-less URI
        return uri
    if not re.match(r"^[a-z][a-z0-9+.-]*:", uri.strip(), re.I) or re.match(r"^[^:/]+:\d+", uri.strip()):
        raise ConfigError(
            f"{where}={uri!r} has no scheme: use http(s)://host:port for a tracking server "
            "(e.g. http://mlflow:5000), or sqlite:///path/mlflow.db for a local store"
        )
    return uri


def tracking_uri(cfg, override: str | None = None) -> str:
    """The MLflow URI of a run config, as every path resolves it (CLI, pipeline steps, jobs, preflight):
    ``override`` (a command's ``--tracking-uri``), else ``resolve_tracking_uri`` under the local storage root."""
    return override or resolve_tracking_uri(cfg.tracking, cfg.storage.root)


def _local_root(storage_root: str) -> Path:
    # An s3:// storage root cannot hold a sqlite file: keep the local store in ./outputs.

    root = local_root(storage_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


class Run:
    """An MLflow run with buffered, batched metric logging (see module docstring)."""

    def __init__(self, client, run_id: str, *, spill_dir: Path, retry_timeout_s: float, flush_every: int) -> None:
        self.client = client
        self.run_id = run_id
        self.spill_path = Path(spill_dir) / f"{run_id}.jsonl"
        self.retry_timeout_s = retry_timeout_s
        self.flush_every = flush_every
        self._buffer: list[tuple[str, float, int, int]] = []  # (key, value, timestamp_ms, step)
        self._logged: set[tuple[str, int]] = set()  # (key, step) the server already holds (see skip_logged_after)
        self._calls = 0
        self.num_failed_flushes = 0

    # -- metrics ---------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffer metrics (floats; non-finite values are kept, MLflow stores NaN)."""
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if (k, int(step or 0)) not in self._logged:
                self._buffer.append((k, float(v), ts, int(step or 0)))
        self._calls += 1
        if self._calls % self.flush_every == 0:
            self.flush()

    def _send(self) -> None:
        from mlflow.entities import Metric  # mlflow: `dcgrpo submit` runs without it

        while self._buffer:
            chunk = self._buffer[:MAX_BATCH]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, s) for k, v, ts, s in chunk])
            del self._buffer[: len(chunk)]

    def flush(self, strict: bool = False) -> None:
        """Send buffered metrics. Non-strict: a failure keeps the buffer for later.
        Strict: retry up to ``retry_timeout_s``, then spill and raise ``TrackingUnavailable``."""
        deadline = time.monotonic() + (self.retry_timeout_s if strict else 0.0)
        delay = 0.5
        while True:
            try:
                self._send()
                return
            except Exception as exc:  # network errors come as several exception types
                self.num_failed_flushes += 1
                if time.monotonic() >= deadline:
                    if not strict:
                        log.warning("MLflow unreachable, keeping %d metrics buffered: %s", len(self._buffer), exc)
                        return
                    self._spill()
                    raise TrackingUnavailable(
                        f"MLflow run {self.run_id}: server unreachable for {self.retry_timeout_s:.0f}s ({exc}); "
                        f"{len(self._buffer)} unsent metric values saved to {self.spill_path}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spill(self) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "a") as f:
            for k, v, ts, s in self._buffer:
                f.write(json.dumps({"key": k, "value": v if math.isfinite(v) else str(v), "ts": ts, "step": s}) + "\n")
        self._buffer.clear()

    def replay_spilled(self) -> int:
        """Send metrics spilled by an earlier process for this run; returns how many."""
        if not self.spill_path.is_file():
            return 0
        lines = [json.loads(line) for line in self.spill_path.read_text().splitlines() if line.strip()]
        self._buffer = [(r["key"], float(r["value"]), r["ts"], r["step"]) for r in lines] + self._buffer
        self.flush(strict=True)
        self.spill_path.unlink()
        log.info("replayed %d spilled metric values into run %s", len(lines), self.run_id)
        return len(lines)

    def skip_logged_after(self, step: int) -> int:
        """Do not send again the points past ``step`` that the server already holds; returns how many.

        For a resume from the checkpoint at ``step``: the crashed process may
        have flushed steps after it, which the resumed loop recomputes. One
        metric-history request per key, once per resume. Best effort: if the
        server cannot be read, duplicates are possible but nothing is lost.
        """
        try:
            keys = self.client.get_run(self.run_id).data.metrics.keys()
            for key in keys:
                self._logged |= {
                    (key, m.step) for m in self.client.get_metric_history(self.run_id, key) if m.step > step
                }
        except Exception as exc:  # network errors come as several exception types
            log.warning("could not read run %s's metrics past step %d (points may repeat): %s", self.run_id, step, exc)
        return len(self._logged)

    # -- params, tags, artifacts -----------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param  # mlflow: `dcgrpo submit` runs without it

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's per-request param limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # mlflow: `dcgrpo submit` runs without it

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def get_metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]


def run_name(method: str, key: str = "") -> str:
    """The one MLflow run-naming rule: ``<method>-<first 8 characters of key>``. ``key`` is the pipeline run id (a
    pipeline's training runs) or the config hash (``dcgrpo train``), so runs of different pipeline runs or configs
    never share a name; precision and backend are in the run's tags, not its name."""
    return f"{method}-{key[:8]}" if key else method


def run_params(cfg) -> dict[str, Any]:
    """The run config as MLflow params, less what does not describe the training: the ``verl.*`` settings of a run
    on the built-in loop, and the tracking URI (where the run is recorded, and a local server's port is gone once
    the demo ends)."""
    return {
        k: v
        for k, v in cfg.to_flat_dict().items()
        if k != "tracking.mlflow_uri" and (cfg.train.backend == "verl" or not k.startswith("verl."))
    }


def _param_str(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return s[:6000]  # MLflow's param value limit


@contextmanager
def start_run(
    tracking_cfg,
    *,
    storage_root: str,
    run_name: str | None = None,
    params: dict | None = None,
    tags: dict | None = None,
    run_id: str | None = None,
) -> Iterator[Run]:
    """Create (or re-attach to, with ``run_id``) an MLflow run; yields a ``Run``.

    The run is FINISHED after a clean exit (metrics flushed strictly), FAILED
    after an exception, KILLED after Ctrl-C or SIGTERM (its reason in the tag ``dcgrpo.closed_reason``).
    """
    uri = resolve_tracking_uri(tracking_cfg, storage_root)
    client = mlflow_client(uri)
    if run_id is None:
        exp_id = _experiment_id(client, tracking_cfg.experiment, uri, storage_root)
        all_tags = {
            "mlflow.runName": run_name or tracking_cfg.run_name or "dcgrpo",
            PROCESS_TAG: this_process(),
            **(tags or {}),
        }
        run_id = _create_run_once(client, exp_id, {k: str(v) for k, v in all_tags.items()}, run_name)
        resumed = False
    else:
        client.update_run(run_id, status="RUNNING")
        resumed = True
    run = Run(
        client,
        run_id,
        spill_dir=_local_root(storage_root) / "mlflow-unsent",
        retry_timeout_s=tracking_cfg.retry_timeout_s,
        flush_every=tracking_cfg.flush_every,
    )
    if resumed:
        run.replay_spilled()
        run.set_tags({**(tags or {}), PROCESS_TAG: this_process()})  # the run's writer is this process now
    elif params:
        run.log_params(params)
    status, error = "FINISHED", ""
    try:
        yield run
        run.flush(strict=True)
    except (KeyboardInterrupt, Terminated) as exc:  # Ctrl-C, or SIGTERM (dcgrpo.shutdown): stopped, not broken
        status = "KILLED"
        with contextlib.suppress(Exception):
            run.set_tags({"dcgrpo.closed_reason": str(exc) or type(exc).__name__})
        raise
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        _close(run, status, error)


def _close(run: Run, status: str, error: str) -> None:
    """End ``run`` as ``status``: what is unsent is sent (or spilled to disk), a failure's error goes to a tag."""
    try:
        if status != "FINISHED":
            run.flush()
            if run._buffer:
                run._spill()
        if error:  # what a person opening the failed run in MLflow reads first
            run.client.set_tag(run.run_id, ERROR_TAG, error[:5000])
        run.client.set_terminated(run.run_id, status)
    except Exception as exc:  # the server may be what failed
        log.warning("could not mark MLflow run %s %s: %s", run.run_id, status, exc)


def _experiment_id(client, name: str, uri: str, storage_root: str) -> str:
    """The experiment's id, created if missing (a create retried after it went through finds it taken)."""
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = (_local_root(storage_root) / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id  # a retried create, or another job's


def _create_run_once(client, exp_id: str, tags: dict[str, str], run_name: str | None) -> str:
    """``create_run``, idempotent under retries: a POST retried after the server had created the run leaves a
    second run with the same token; the oldest is kept and the others deleted."""

    token = uuid.uuid4().hex
    run_id = client.create_run(exp_id, tags={**tags, CREATE_TOKEN_TAG: token}, run_name=run_name).info.run_id
    same = client.search_runs([exp_id], filter_string=f"tags.`{CREATE_TOKEN_TAG}` = '{token}'",
                              order_by=["attributes.start_time ASC"])  # fmt: skip
    if len(same) > 1:
        keep = same[0].info.run_id
        for dup in same[1:]:
            client.delete_run(dup.info.run_id)
        log.warning("MLflow created run %s %d times (a retried request): kept %s", run_name, len(same), keep)
        return keep
    return run_id


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), "" elsewhere: tells a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def process_gone(tag: str) -> bool:
    """True only when ``tag`` names a process of this host that no longer runs (unknown hosts: False)."""
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return bool(started) and _start_time(int(pid)) != started  # the pid was reused by another process


def close_orphaned_runs(tracking_cfg, *, storage_root: str, config_hash: str, keep: str | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs of ``config_hash`` left behind by a crashed process of this host.

    Called by a new training job of the same config before it starts: a
    ``kill -9`` gives the crashed process no chance to close its run. ``keep``
    is the run a resume is about to re-attach. Best effort (a warning if the
    server cannot be searched); returns the ids it closed.
    """
    try:
        client = mlflow_client(resolve_tracking_uri(tracking_cfg, storage_root))
        exp = client.get_experiment_by_name(tracking_cfg.experiment)
        if exp is None:
            return []
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.config_hash = '{config_hash}'"
        )
        closed = []
        for r in runs:
            tag = r.data.tags.get(PROCESS_TAG, "")
            if r.info.run_id == keep or not process_gone(tag):
                continue
            client.set_tag(r.info.run_id, "dcgrpo.closed_reason", f"process {tag} ended without closing the run")
            client.set_terminated(r.info.run_id, "FAILED")
            closed.append(r.info.run_id)
            log.warning("MLflow run %s was left RUNNING by crashed process %s: marked FAILED", r.info.run_id, tag)
        return closed
    except Exception as exc:  # never stop a job over bookkeeping of an older one
        log.warning("could not look for runs left RUNNING by crashed jobs: %s", exc)
        return []
