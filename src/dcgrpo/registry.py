"""MLflow model registry: register, gate against the champion, promote (and serve), roll back.

Lifecycle of a model version (aliases, not the deprecated stages):

    register  -> version N with tags (run, metrics, lambda, d, config hash, quantization, source), alias
                 ``challenger``; registering the same (run, source, quantization) again returns N
    promote N -> under the model's promotion lock: reads the champion, gates N against it, writes the
                 decision as tags on N, then moves ``champion`` to N in ONE call (MLflow aliases are
                 unique per model: never two champions), or leaves everything as it was
    serve     -> with ``serve=`` (dcgrpo.serving.server): the version's InferenceService is applied BEFORE the
                 alias move, so ``champion`` never names a version the cluster was not told to serve; an apply
                 that fails leaves alias and InferenceService as they were (see ``_commit``)
    rollback  -> ``rollback(V)``: the same serve-then-move for an older version, without the gate

Promotion is bound to the version it gates, never to whatever holds an alias
when it runs: two pipelines promoting at once each gate their own version, one
after the other (the lock), so the better one ends as champion.

Failure rules: a registration that fails writes nothing (inputs are checked
first; a version or registered model it created is deleted again); a
promotion that fails before the alias move leaves the champion where it was
and records ``promotion.decision=failed`` on the version it gates.

The pipeline's steps (``dcgrpo.stages``) and the ``dcgrpo`` CLI go through the same functions at the end of this
module: ``rank_methods`` (which method's model to register), ``register_and_gate``, ``promote_version`` and
``rollback_version`` (the run config unpacked once: gate, budget, aliases, lock settings, serving).

Rendering and applying serving manifests live in ``dcgrpo.serving``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from dcgrpo import storage
from dcgrpo.errors import DcgrpoError, ServiceUnavailable

if TYPE_CHECKING:
    from dcgrpo.config import RunConfig

log = logging.getLogger(__name__)

# Tag keys (one place, so the gate and the UI read the same names).
TAG_RUN_ID = "run_id"
TAG_METRICS = "eval_metrics"  # JSON {metric: value}: metric keys may hold characters tag keys cannot ("@")
TAG_LAMBDA = "dc/lambda_final"
TAG_DISCREPANCY = "dc/discrepancy_final"
TAG_CONFIG_HASH = "config_hash"
TAG_QUANTIZATION = "quantization"
TAG_STORAGE_URI = "storage_uri"
TAG_SOURCE_DIR = "source_dir"  # the registered directory (absolute path or s3:// URI): the idempotency key
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_COMPARED_TO = "promotion.compared_to"
TAG_DECIDED_AT = "promotion.decided_at"

LOCK_SUFFIX = ".promotion-lock"
HEALTH_TIMEOUT_S = 5.0
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class RegistryError(DcgrpoError, RuntimeError):
    """Registration or promotion cannot proceed (names the model, version and reason)."""


def client(tracking_uri: str | None = None):
    """The registry's MLflow client (``tracking.mlflow_client``: bounded HTTP retries), after one ``/health``
    request, so that a server that is down fails in seconds naming the URI rather than after the retries."""
    import mlflow

    from dcgrpo.tracking import mlflow_client

    check_server(tracking_uri or mlflow.get_tracking_uri())
    return mlflow_client(tracking_uri, registry_uri=tracking_uri)


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """One GET ``<uri>/health`` for http(s) URIs; ``ServiceUnavailable`` naming the URI if nobody answers.

    Any HTTP answer below 500 counts as up (a proxy may guard /health); other
    URI schemes (sqlite, file) have no server to ask.
    """
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        reason = f"HTTP {exc.code} {exc.reason}"
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, malformed URLs
        reason = str(getattr(exc, "reason", exc))
    raise ServiceUnavailable(f"MLflow server {uri} unreachable ({reason}); check the tracking URI")


def _tag_key(metric: str) -> str:
    """A metric name as a valid tag key (MLflow allows only [/\\w.\\- :])."""
    return "metric." + re.sub(r"[^/\w.\- :]", "_", metric)


def version_tags(
    run_id: str,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str,
    storage_uri: str | None = None,
    source_dir: str | None = None,
    engines: dict[str, str] | None = None,
) -> dict[str, str]:
    """The tags a model version carries: what the gate compares and what an operator reads.

    ``engines``: the vLLM versions of the rollouts the discrepancy was measured on, of evaluation and of
    serving (``engine_tags``); a verl run's rollout engine differs from the served one (README, images)."""
    tags = {
        TAG_RUN_ID: run_id,
        TAG_METRICS: json.dumps({k: float(v) for k, v in sorted(metrics.items())}),
        TAG_LAMBDA: repr(float(final_lambda)),
        TAG_DISCREPANCY: repr(float(discrepancy)),
        TAG_CONFIG_HASH: config_hash,
        TAG_QUANTIZATION: quantization,
    }
    tags.update({_tag_key(k): repr(float(v)) for k, v in metrics.items()})
    if storage_uri:
        tags[TAG_STORAGE_URI] = storage_uri
    if source_dir:
        tags[TAG_SOURCE_DIR] = source_dir
    tags.update(engines or {})
    return tags


TAG_ENGINE_PREFIX = "dcgrpo.engine."


def engine_tags(rollout: str | None, evaluation: str | None, serving_image: str) -> dict[str, str]:
    """``dcgrpo.engine.{rollout,eval,serving}`` and ``dcgrpo.engine.rollout_matches_serving``.

    ``serving_image`` is ``registry.vllm_image`` (``vllm/vllm-openai:v0.33.0`` -> ``vllm 0.33.0``). The match
    says whether the discrepancy DC-GRPO constrained is the served engine's: "false" for verl rounds (vLLM
    0.24.0 in the verl image), "unknown" when a round did not record its engine.
    """
    tag = serving_image.rsplit(":", 1)[-1].removeprefix("v") if ":" in serving_image else ""
    serving = f"vllm {tag}" if tag else serving_image
    tags = {"rollout": rollout or "unknown", "eval": evaluation or "unknown", "serving": serving}
    match = "unknown" if not rollout else str(rollout.split(" (")[0] == serving).lower()
    return {TAG_ENGINE_PREFIX + k: v for k, v in tags.items()} | {TAG_ENGINE_PREFIX + "rollout_matches_serving": match}


def load_metrics(value: str, what: str = "metrics") -> dict[str, float]:
    """Eval metrics given as a JSON object of numbers, inline or in a file (the CLI's ``--metrics``).

    Checked before anything is written, so a typo fails with one line naming
    ``what`` instead of a traceback or a version with unusable gate tags.
    """
    text = value
    try:
        if Path(value).is_file():
            text = Path(value).read_text()
    except OSError:  # too long to be a path: inline JSON
        pass
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{what}: not JSON ({exc}): {text[:80]!r}") from exc
    numbers = isinstance(data, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
    )
    if not numbers or not data:
        raise RegistryError(f'{what}: expected a JSON object of numbers, e.g. {{"eval/aime24/avg_16": 0.3}}; '
                            f"got {text[:80]!r}")  # fmt: skip
    return {one_spelling(str(k)): float(v) for k, v in data.items()}


def _source_id(model_dir: str) -> str:
    """The registered directory as recorded in ``source_dir``: s3:// as given, local paths absolute."""
    model_dir = str(model_dir).rstrip("/")
    return model_dir if storage.is_s3(model_dir) else str(Path(model_dir).resolve())


def _artifact_key(source_dir: str, quantization: str) -> str:
    """The run-artifact folder name of one registered directory: stable, so a retried registration of the same
    directory writes the same folder, and distinct for distinct directories."""
    return f"{quantization}-{hashlib.sha256(source_dir.encode()).hexdigest()[:12]}"


def check_model_name(name: str) -> str:
    """Refuse a registered-model name MLflow's search filters cannot hold (a quote), before anything is written."""
    if not name or any(q in name for q in "'\"`"):
        raise RegistryError(f"registered model name {name!r}: must be non-empty and contain no quotes")
    return name


def _get_run(mlflow_client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise RegistryError(f"{name}: run_id {run_id!r}: no such MLflow run") from exc
        raise


def _existing_version(mlflow_client, name: str, run_id: str, source_dir: str, quantization: str):
    """The version already registered from this run, directory and quantization, if any (oldest first)."""
    found = [
        mv
        for mv in mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if mv.tags.get(TAG_SOURCE_DIR) == source_dir and mv.tags.get(TAG_QUANTIZATION) == quantization
    ]
    return min(found, key=lambda mv: int(mv.version), default=None)


def _oldest_of_duplicates(mlflow_client, name: str, mv, run_id: str, source_dir: str, quantization: str):
    """The version to keep when this directory got registered twice: a create retried after the server had done it
    (MLflow's HTTP retries), or two registrations racing. The oldest stays; ours is deleted if it is not that one."""
    oldest = _existing_version(mlflow_client, name, run_id, source_dir, quantization)
    if oldest is None or oldest.version == mv.version:
        return mv
    log.warning("registry: %s v%s duplicates v%s (same run %s, %s): deleting v%s",
                name, mv.version, oldest.version, run_id, source_dir, mv.version)  # fmt: skip
    _delete_version_quietly(mlflow_client, name, mv.version)
    return oldest


def _delete_version_quietly(mlflow_client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.delete_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in _MISSING:  # a retried delete that went through the first time
            raise


def _ensure_registered_model(mlflow_client, name: str) -> bool:
    """Create the registered model if it is missing; True if this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def _undo_registration(mlflow_client, name: str, version: str | None, created_model: bool) -> None:
    """Best-effort removal of what a failed registration wrote (the caller re-raises its error)."""
    try:
        if version is not None:
            mlflow_client.delete_model_version(name, version)
        # Only a model this call created, and only while empty: another run may have registered meanwhile.
        if created_model and not mlflow_client.search_model_versions(f"name='{name}'"):
            mlflow_client.delete_registered_model(name)
    except Exception as exc:  # the registry may be what failed
        log.warning("registry: could not undo the failed registration of %s v%s: %s", name, version, exc)


def register_model(
    mlflow_client,
    name: str,
    run_id: str,
    model_dir: str,
    *,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str = "fp8",
    artifact_path: str = "model",
    alias: str = "challenger",
    endpoint_url: str | None = None,
    by_reference: bool = False,
    engines: dict[str, str] | None = None,
):
    """Log ``model_dir`` (local or s3://) as run artifacts, register it as a new version, alias it.

    ``by_reference``: ``model_dir`` is an object-store URI (a pipeline's artifact on the cluster) that
    becomes the version's source and ``storage_uri`` as it is: nothing is downloaded or uploaded.

    Idempotent: if this run already registered this directory with this
    quantization (a retried pipeline step, a repeated command), that version
    gets the alias and is returned; nothing is uploaded or created again.
    Inputs (values, run, directory) are checked before anything is written;
    if a later write fails, the version (and a registered model this call
    created) is deleted again, so a failed registration leaves the registry as it was.
    """
    check_model_name(name)
    for key, value in {"final_lambda": final_lambda, "discrepancy": discrepancy, **metrics}.items():
        if not math.isfinite(float(value)):
            raise RegistryError(f"{name}: {key} is {value}; refusing to register a version with a non-finite value")
    run = _get_run(mlflow_client, name, run_id)
    source_dir = str(model_dir).rstrip("/") if by_reference else _source_id(model_dir)
    mv = _existing_version(mlflow_client, name, run_id, source_dir, quantization)
    if mv is not None:
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
        log.info("registry: %s version %s reused (same run %s, %s, %s), alias %s",
                 name, mv.version, run_id, source_dir, quantization, alias)  # fmt: skip
        return mv
    source = source_dir
    if not by_reference:
        # One artifact folder per (directory, quantization) of the run: a second directory registered from the same
        # run never rewrites the files an earlier version (a served champion) points at.
        artifact_path = f"{artifact_path}/{_artifact_key(source_dir, quantization)}"
        with storage.local_copy(model_dir, endpoint_url) as local:
            if not (Path(local) / "config.json").is_file():
                raise RegistryError(f"{model_dir}: not a model directory (no config.json)")
            mlflow_client.log_artifacts(run_id, str(local), artifact_path)
        source = f"{run.info.artifact_uri}/{artifact_path}"
    tags = version_tags(
        run_id, metrics, final_lambda, discrepancy, config_hash, quantization,
        storage_uri=str(model_dir) if by_reference or storage.is_s3(model_dir) else None, source_dir=source_dir,
        engines=engines,
    )  # fmt: skip
    created_model = _ensure_registered_model(mlflow_client, name)
    version = None
    try:
        mv = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        version = mv.version
        mv = _oldest_of_duplicates(mlflow_client, name, mv, run_id, source_dir, quantization)
        if mv.version != version:
            version = None  # ours was the duplicate (deleted); the one kept may be another caller's: not ours to undo
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
    except Exception:
        _undo_registration(mlflow_client, name, version, created_model)
        raise
    log.info("registry: %s version %s registered (%s), alias %s", name, mv.version, quantization, alias)
    return mv


def _alias_version(mlflow_client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise


def version_by_alias(mlflow_client, name: str, alias: str) -> str:
    """The version number ``alias`` points at now (resolved once, e.g. for ``dcgrpo promote``)."""
    mv = _alias_version(mlflow_client, name, alias)
    if mv is None:
        raise RegistryError(f"{name}: no version has alias {alias!r}; register one first")
    return str(mv.version)


def _model_version(mlflow_client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise RegistryError(f"{name}: no version {version!r} to promote") from exc
        raise


def _metric(mv, metric: str) -> float | None:
    """A version's eval metric; versions registered before the one spelling (``avg@k``) are read as ``avg_k``."""
    try:
        stored = json.loads(mv.tags.get(TAG_METRICS, "{}"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {mv.version}: tag {TAG_METRICS} is not JSON: {exc}") from exc
    value = {one_spelling(k): v for k, v in stored.items()}.get(one_spelling(metric))
    return None if value is None else float(value)


def one_spelling(metric: str) -> str:
    """``eval/aime24/avg@32`` -> ``eval/aime24/avg_32``: the spelling MLflow stores, used everywhere."""
    return metric.replace("@", "_")


# --- the promotion lock ----------------------------------------------------------------------------------------------
#
# MLflow has no compare-and-set, but registered-model names are unique in its store: creating
# "<name>.promotion-lock" succeeds for exactly one caller (the others get RESOURCE_ALREADY_EXISTS).
# The lock model carries its holder's token in tags; the server's creation time dates it.
#
# Nor has MLflow a conditional delete: delete_registered_model removes whatever model has the name when the request
# lands. A holder that reads "my token" and then deletes would delete a successor's lock if, in between, its own
# lock were broken as stale and taken again. So the lock is deleted only by someone holding the guard
# "<lock>.breaking" (a second create-once model), after re-reading the lock under it:
#   release  takes the guard (waiting for it), re-reads, deletes only if the token is its own;
#   break    takes the guard (one try: whoever holds it is deleting already), re-reads, deletes only if it is still
#            the lock it saw stale (same token) and still older than ``stale_s``.
# Nobody else can delete the lock while we hold the guard, and a lock that exists cannot change, so the re-read and
# the delete see the same lock: a holder never deletes a lock it does not hold, and two breakers that saw the same
# stale lock never delete the fresh lock a third caller took after the first break.
#
# Any read may find the lock or the guard gone: its holder deleted it between our create and our read. MLflow says
# RESOURCE_DOES_NOT_EXIST then, even from create_registered_model (on a duplicate name its SQL store re-reads the
# existing model to word its error, and that model may be gone by then: issue 22). "Does not exist" means free,
# try again; "already exists" means taken; every other MLflow error surfaces.
#
# What is left is the guard's own deletion, as unconditional. A guard is held for three calls (read, delete, read);
# it counts as stale (its holder died in between) after max(stale_s, GUARD_STALE_MIN_S), and its holder deletes it
# only while it is younger than half that, so a holder's delete could hit a successor's guard only if the request
# took over GUARD_STALE_MIN_S / 2 = 15 s to land after its own read. Two waiters that both break the same dead
# guard could both end up holding the next one only if one's delete lands after the other's back-off (>= 50 ms)
# and create; two "holders" of the guard could then again delete a successor's lock. Both cases need a process
# that died or stalled inside the guard first. A release that cannot take the guard within RELEASE_GUARD_WAIT_S
# (its holder died) deletes its lock only while younger than stale_s / 2 (see ``_release``).
# Ages are the server's creation time against this machine's clock: skew beyond the stale ages defeats any lease.

GUARD_SUFFIX = ".breaking"
GUARD_STALE_MIN_S = 30.0
RELEASE_GUARD_WAIT_S = 10.0
_GONE = "RESOURCE_DOES_NOT_EXIST"
_TAKEN = "RESOURCE_ALREADY_EXISTS"


@dataclass
class _Held:
    token: str
    holder: str
    age_s: float


def _lock_state(mlflow_client, lock: str) -> _Held | None:
    """Who holds ``lock`` (or its guard) and for how long (None: nobody, or it vanished as we read it)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlflow_client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise
    age = max(0.0, time.time() - (rm.creation_timestamp or 0) / 1000)
    return _Held(rm.tags.get("token", ""), rm.tags.get("holder", "unknown"), age)


def _try_create(mlflow_client, lock: str, token: str, holder: str) -> bool:
    """Atomically create the lock (or guard) model; False if it exists, or existed a moment ago."""
    from mlflow.exceptions import MlflowException

    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        mlflow_client.create_registered_model(
            lock, tags={"token": token, "holder": holder, "acquired_at": since},
            description=f"dcgrpo promotion lock held by {holder} since {since}; deleted when the promotion ends",
        )  # fmt: skip
        return True
    except MlflowException as exc:
        if exc.error_code in (_TAKEN, _GONE):  # _GONE: taken when we asked, released before the server answered
            return False
        raise


def _delete_quietly(mlflow_client, model: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.delete_registered_model(model)
    except MlflowException as exc:
        if exc.error_code not in _MISSING:
            raise


def _take_guard(mlflow_client, lock: str, purpose: str, stale_s: float, wait_s: float) -> str | None:
    """Create ``<lock>.breaking``: its token, or None if someone else held it for all of ``wait_s`` (0: one try).

    A guard older than ``max(stale_s, GUARD_STALE_MIN_S)`` was left by a process that died holding it: it is
    deleted (with a warning) and taken on a later try, after the back-off (see the notes above)."""
    guard, token = lock + GUARD_SUFFIX, uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        if _try_create(mlflow_client, guard, token, _holder(purpose)):
            return token
        held = _lock_state(mlflow_client, guard)
        if held is None:
            continue  # dropped between our create and our read: try again at once
        if held.token == token:
            return token  # our create went through on a retried request
        if held.age_s > max(stale_s, GUARD_STALE_MIN_S):
            log.warning("registry: removing %s left by %s %.0f s ago", guard, held.holder, held.age_s)
            _delete_quietly(mlflow_client, guard)
        if time.monotonic() >= deadline:
            return None
        time.sleep(random.uniform(0.05, 0.3))


def _drop_guard(mlflow_client, lock: str, token: str, stale_s: float) -> None:
    """Delete our guard, unless it is old enough that someone may be removing it as stale (then it expires)."""
    guard = lock + GUARD_SUFFIX
    held = _lock_state(mlflow_client, guard)
    if held is None or held.token != token:
        log.warning("registry: %s was removed as stale while this process held it", guard)
    elif held.age_s < max(stale_s, GUARD_STALE_MIN_S) / 2:
        _delete_quietly(mlflow_client, guard)
    else:
        log.warning("registry: held %s for %.0f s; left to expire as stale", guard, held.age_s)


def _break_stale(mlflow_client, lock: str, stale: _Held, stale_s: float) -> None:
    """Delete a lock left by a crashed holder, unless someone else holds the guard (breaking or releasing it).

    Under the guard the lock is read again and deleted only if it is still the one seen stale: two breakers
    that saw the same stale lock cannot delete the fresh one the first breaker's successor just took, and the
    first read, which may mix a deleted lock's age with its successor's tags, decides nothing by itself.
    """
    guard = _take_guard(mlflow_client, lock, "breaking a stale lock", stale_s, wait_s=0)
    if guard is None:
        return
    try:
        now = _lock_state(mlflow_client, lock)
        if now is not None and now.token == stale.token and now.age_s > stale_s:
            log.warning("registry: breaking stale promotion lock %s held by %s for %.0f s (> %.0f s)",
                        lock, now.holder, now.age_s, stale_s)  # fmt: skip
            _delete_quietly(mlflow_client, lock)
    finally:
        _drop_guard(mlflow_client, lock, guard, stale_s)


def _holder(purpose: str) -> str:
    return f"{socket.gethostname()} pid {os.getpid()}: {purpose}"


@contextmanager
def promotion_lock(
    mlflow_client, name: str, purpose: str = "promotion", wait_s: float = 60.0, stale_s: float = 600.0
) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` for the block: one promotion of a model at a time.

    Waits up to ``wait_s`` for another holder (then ``RegistryError`` naming
    it), breaks a lock older than ``stale_s`` with a warning, and always
    releases its own lock (only its own: a lock broken as stale and re-taken
    by someone else is left alone). A lock that vanishes while we look at it
    is free: we try again.
    """
    lock, token, holder = name + LOCK_SUFFIX, uuid.uuid4().hex, _holder(purpose)
    deadline = time.monotonic() + wait_s
    while not _try_create(mlflow_client, lock, token, holder):
        held = _lock_state(mlflow_client, lock)
        if held is None:
            continue  # released between our create and our read: try again at once
        if held.token == token:
            break  # our create went through on a retried request
        if held.age_s > stale_s:
            _break_stale(mlflow_client, lock, held, stale_s)
        elif time.monotonic() >= deadline:
            raise RegistryError(
                f"{name}: another promotion holds {lock!r} ({held.holder}, for {held.age_s:.0f} s); gave up after "
                f"{wait_s:.0f} s. If no promotion is running, delete that registered model or wait {stale_s:.0f} s"
            )
        time.sleep(random.uniform(0.05, 0.3))  # jitter: waiters do not retry in lockstep
    try:
        yield
    finally:
        _release(mlflow_client, lock, token, holder, stale_s, min(wait_s, RELEASE_GUARD_WAIT_S))


def _release(mlflow_client, lock: str, token: str, holder: str, stale_s: float, guard_wait_s: float) -> None:
    """Delete our own lock, under the guard; best effort (an error here must not mask the promotion's outcome).

    The guard is held for milliseconds; if it stays taken for ``guard_wait_s``, its holder died in it. Then our
    lock is deleted without the guard if it is younger than ``stale_s / 2``: nobody breaks a lock younger than
    ``stale_s``, so that delete is ours unless it takes ``stale_s / 2`` to land. Otherwise it is left to expire.
    """
    try:
        guard = _take_guard(mlflow_client, lock, f"releasing the lock of {holder}", stale_s, guard_wait_s)
        try:
            held = _lock_state(mlflow_client, lock)
            if held is None or held.token != token:
                log.warning("registry: promotion lock %s was broken while %s held it", lock, holder)
            elif guard is not None or held.age_s < stale_s / 2:
                _delete_quietly(mlflow_client, lock)
            else:
                log.warning("registry: %s taken for %.0f s; promotion lock %s left to expire after %.0f s",
                            lock + GUARD_SUFFIX, guard_wait_s, lock, stale_s)  # fmt: skip
        finally:
            if guard is not None:
                _drop_guard(mlflow_client, lock, guard, stale_s)
    except Exception as exc:
        log.warning("registry: could not release %s (%s); it counts as stale after the stale timeout", lock, exc)


@dataclass
class Decision:
    """The outcome of one promotion attempt (also written as tags on the version it gates)."""

    model_name: str
    challenger: str
    champion_before: str | None
    promoted: bool
    reason: str

    @property
    def champion_after(self) -> str | None:
        return self.challenger if self.promoted else self.champion_before


def gate(challenger, champion, gate_metric: str, max_discrepancy: float) -> tuple[bool, str]:
    """Pure decision: (promote?, reason). No registry writes.

    Promote when the challenger has the gate metric, its final discrepancy is
    within ``max_discrepancy``, and its metric is >= the champion's (or there
    is no champion yet).
    """
    value = _metric(challenger, gate_metric)
    if value is None or not math.isfinite(value):
        return False, f"challenger v{challenger.version} has no finite {gate_metric}"
    d = float(challenger.tags.get(TAG_DISCREPANCY, "nan"))
    if not math.isfinite(d) or d > max_discrepancy:
        return False, f"discrepancy {d:.4g} outside budget {max_discrepancy:.4g}"
    if champion is None:
        return True, f"first champion ({gate_metric}={value:.4g}, discrepancy {d:.4g})"
    best = _metric(champion, gate_metric)
    if best is not None and value < best:
        return False, f"{gate_metric} {value:.4g} < champion v{champion.version}'s {best:.4g}"
    shown = "n/a" if best is None else f"{best:.4g}"
    return True, f"{gate_metric} {value:.4g} >= champion v{champion.version}'s {shown}; discrepancy {d:.4g}"


Serve = Callable[[Any], Any]
"""Makes the cluster serve a model version (``dcgrpo.serving.server``); raises if it could not."""


ALREADY = "already the champion"


def _decide(mlflow_client, name, mv, gate_metric, max_discrepancy, force, champion_alias, serve=None) -> Decision:
    """Read the champion, gate ``mv`` against it, tag ``mv`` with the decision, serve and move the alias if it
    passed."""
    champion = _alias_version(mlflow_client, name, champion_alias)
    before = None if champion is None else str(champion.version)
    if before == str(mv.version):
        return Decision(name, before, before, False, ALREADY)
    ok, reason = gate(mv, champion, gate_metric, max_discrepancy)
    if force and not ok:
        ok, reason = True, f"forced (gate said: {reason})"
    for key, value in {
        TAG_DECISION: "promoted" if ok else "rejected",
        TAG_REASON: reason,
        TAG_COMPARED_TO: before or "none",
        TAG_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }.items():
        mlflow_client.set_model_version_tag(name, mv.version, key, value)
    if ok:
        _commit(mlflow_client, name, champion_alias, mv, champion, serve)
    return Decision(name, str(mv.version), before, ok, reason)


def _commit(mlflow_client, name: str, alias: str, mv, previous, serve: Serve | None) -> None:
    """Serve ``mv`` (if asked), then move ``alias`` to it; undo the serving if the move fails.

    Serve first: applying to Kubernetes is the step most likely to fail (RBAC,
    admission webhooks, an unmappable storage URI), and when it fails nothing
    has changed anywhere, so the previous champion keeps serving and keeps the
    alias. The alias move is the commit point (one call; aliases are unique,
    so the old champion loses it). If it fails after a successful apply, the
    previous champion's InferenceService is applied again (best effort: the
    error raised is the move's), so alias and cluster agree on the old version.
    """
    if serve is not None:
        serve(mv)
    try:
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
    except Exception:
        if serve is not None and previous is not None:
            _serve_again(serve, name, previous)
        elif serve is not None:
            log.error("registry: %s v%s is applied but %r did not move and no previous champion exists; "
                      "delete the InferenceService or promote again", name, mv.version, alias)  # fmt: skip
        raise


def _serve_again(serve: Serve, name: str, previous) -> None:
    try:
        serve(previous)
        log.warning("registry: alias move failed; %s v%s applied again", name, previous.version)
    except Exception as exc:  # the cluster may be what failed; report, keep the move's error
        log.error("registry: could not re-apply %s v%s after a failed alias move: %s", name, previous.version, exc)


def promote(
    mlflow_client,
    name: str,
    version: str | int,
    gate_metric: str,
    max_discrepancy: float,
    force: bool = False,
    champion_alias: str = "champion",
    *,
    lock_wait_s: float = 60.0,
    lock_stale_s: float = 600.0,
    serve: Serve | None = None,
) -> Decision:
    """Gate ``version`` against the champion and move ``champion`` to it if the gate passes (or ``force``).

    Bound to ``version``: never to whatever holds an alias by the time this
    runs. Under the model's promotion lock: read the champion -> decide ->
    tag ``version`` -> ``serve(version)`` if given -> one alias move. Any
    exception before the move leaves the champion alias (and, serve failing,
    the served object) untouched, and ``version`` (only it) carries
    ``promotion.decision=failed`` (best effort).
    """
    check_model_name(name)
    version = str(version)
    with promotion_lock(mlflow_client, name, f"promoting v{version}", lock_wait_s, lock_stale_s):
        mv = _model_version(mlflow_client, name, version)
        try:
            decision = _decide(mlflow_client, name, mv, gate_metric, max_discrepancy, force, champion_alias, serve)
        except Exception as exc:
            _record_failure(mlflow_client, name, version, exc)
            raise
        _serve_champion_again(serve, decision, mv)
    log.info("registry: %s v%s %s: %s", name, version, "PROMOTED" if decision.promoted else "not promoted",
             decision.reason)  # fmt: skip
    return decision


def rollback(
    mlflow_client,
    name: str,
    version: str | int,
    champion_alias: str = "champion",
    *,
    lock_wait_s: float = 60.0,
    lock_stale_s: float = 600.0,
    serve: Serve | None = None,
) -> Decision:
    """Make ``version`` (an earlier champion, say) the champion again, without the gate.

    The gate would refuse it (the newer champion scores higher): a rollback is
    an operator's decision. Same order and failure rules as ``promote``
    (serve first, then the alias move); ``version`` is tagged
    ``promotion.decision=rolled_back`` naming the version it replaced.
    """
    check_model_name(name)
    version = str(version)
    with promotion_lock(mlflow_client, name, f"rolling back to v{version}", lock_wait_s, lock_stale_s):
        mv = _model_version(mlflow_client, name, version)
        champion = _alias_version(mlflow_client, name, champion_alias)
        before = None if champion is None else str(champion.version)
        if before == version:
            decision = Decision(name, version, before, False, ALREADY)
            _serve_champion_again(serve, decision, mv)
            return decision
        reason = f"rolled back from v{before}" if before else "rolled back (no champion before)"
        try:
            for key, value in {TAG_DECISION: "rolled_back", TAG_REASON: reason, TAG_COMPARED_TO: before or "none",
                               TAG_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}.items():  # fmt: skip
                mlflow_client.set_model_version_tag(name, version, key, value)
            _commit(mlflow_client, name, champion_alias, mv, champion, serve)
        except Exception as exc:
            _record_failure(mlflow_client, name, version, exc)
            raise
    log.info("registry: %s v%s is champion again (%s)", name, version, reason)
    return Decision(name, version, before, True, reason)


def _serve_champion_again(serve: Serve | None, decision: Decision, mv) -> None:
    """Apply the unchanged champion again when asked to serve it: idempotent, and it repairs a deleted or
    hand-edited InferenceService. Not recorded as a failed promotion if it fails: nothing was promoted."""
    if serve is not None and decision.reason == ALREADY:
        serve(mv)


def _record_failure(mlflow_client, name: str, version: str, exc: Exception) -> None:
    try:
        mlflow_client.set_model_version_tag(name, version, TAG_DECISION, "failed")
        mlflow_client.set_model_version_tag(name, version, TAG_REASON, f"{type(exc).__name__}: {exc}"[:5000])
    except Exception:  # the registry may be what failed; the alias has not moved either way
        log.warning("registry: could not record the failed promotion of %s v%s", name, version)


# --- one path for the pipeline's steps and the CLI ------------------------------------------------------------------


def rank_methods(gate_values: Sequence[float], discrepancies: Sequence[float], budget: float) -> int:
    """The index of the best of several methods' models: what the pipeline registers (``select_best``).

    Best = the highest gate metric among the models whose discrepancy is within ``budget`` (a model the gate
    will refuse is not worth registering); if none is, the highest gate metric overall. Ties go to the lower
    discrepancy, then to the earlier method. A NaN discrepancy is never within the budget.
    """
    if not gate_values or len(gate_values) != len(discrepancies):
        raise ValueError(f"{len(gate_values)} gate values, {len(discrepancies)} discrepancies")
    within = [j for j, d in enumerate(discrepancies) if d <= budget]
    return max(within or range(len(gate_values)), key=lambda j: (gate_values[j], -discrepancies[j], -j))


class Registered(NamedTuple):
    version: str
    passes_gate: bool
    """The gate passed, or ``force``: whether a promotion should follow."""
    reason: str
    model_name: str
    """The registered model the version belongs to (``+ registry.bf16_suffix`` for a bf16 registration)."""


def register_and_gate(
    mlflow_client,
    cfg: RunConfig,
    model_name: str,
    run_id: str,
    model_dir: str,
    *,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    quantization: str = "fp8",
    bf16_twin: str | None = None,
    by_reference: bool = False,
    rollout_engine: str | None = None,
    eval_engine: str | None = None,
    force: bool = False,
) -> Registered:
    """Register ``model_dir`` (alias ``registry.challenger_alias``) and gate it against its model's champion.

    The pipeline's ``register_model`` step and ``dcgrpo register`` both come here. ``quantization`` "bf16"
    registers under ``model_name + registry.bf16_suffix``; ``bf16_twin``: the unquantised checkpoint of an FP8
    export, registered there first. The tags (metrics, lambda, discrepancy, config hash, engines) are the same
    for both versions. ``by_reference``: the directories are object-store URIs registered as they are
    (``register_model``).

    A failed gate is recorded on the version (``promotion.decision=rejected`` and its reason) unless ``force``:
    then a promotion follows, which records its own decision. Returns ``passes_gate`` = passed or forced.
    """
    reg = cfg.registry
    common = dict(
        metrics=metrics, final_lambda=final_lambda, discrepancy=discrepancy, config_hash=cfg.config_hash(),
        alias=reg.challenger_alias, endpoint_url=cfg.storage.s3_endpoint_url, by_reference=by_reference,
        engines=engine_tags(rollout_engine, eval_engine, reg.vllm_image),
    )  # fmt: skip
    twin_name = model_name + reg.bf16_suffix
    if bf16_twin is not None:
        register_model(mlflow_client, twin_name, run_id, bf16_twin, quantization="bf16", artifact_path="model-bf16",
                       **common)  # fmt: skip
    name = twin_name if quantization == "bf16" else model_name
    artifact_path = "model-bf16" if quantization == "bf16" else "model"
    mv = register_model(mlflow_client, name, run_id, model_dir, quantization=quantization,
                        artifact_path=artifact_path, **common)  # fmt: skip
    champion = _alias_version(mlflow_client, name, reg.champion_alias)
    ok, reason = gate(mv, champion, cfg.eval.gate_metric, cfg.promotion_discrepancy_limit())
    if not ok and not force:  # no promotion (which records its own decision) follows: record this one
        mlflow_client.set_model_version_tag(name, mv.version, TAG_DECISION, "rejected")
        mlflow_client.set_model_version_tag(name, mv.version, TAG_REASON, reason)
    log.info("registered %s v%s; gate: %s (%s)%s", name, mv.version, ok, reason, "; forced" if force else "")
    return Registered(str(mv.version), ok or force, reason if ok or not force else f"forced (gate said: {reason})",
                      name)  # fmt: skip


def _promotion_settings(cfg: RunConfig, model_name: str, serve: bool) -> dict[str, Any]:
    """The lock settings and, with ``serve``, the InferenceService applier of ``promote``/``rollback``."""
    from dcgrpo.serving import server

    reg = cfg.registry
    return dict(lock_wait_s=reg.promotion_lock_wait_s, lock_stale_s=reg.promotion_lock_stale_s,
                serve=server(reg, model_name) if serve else None)  # fmt: skip


def promote_version(
    mlflow_client, cfg: RunConfig, model_name: str, version: str | int, *, force: bool = False, serve: bool = False
) -> Decision:
    """``promote`` with the run config's gate metric, discrepancy limit, champion alias and lock settings.

    ``serve`` (``registry.serve_on_promote``, ``dcgrpo promote --serve``): the version's InferenceService is
    applied before the alias moves (``_commit``). The pipeline's ``promote`` step and ``dcgrpo promote`` both
    come here.
    """
    return promote(mlflow_client, model_name, version, cfg.eval.gate_metric, cfg.promotion_discrepancy_limit(),
                   force, cfg.registry.champion_alias, **_promotion_settings(cfg, model_name, serve))  # fmt: skip


def rollback_version(mlflow_client, cfg: RunConfig, model_name: str, version: str | int, *, serve: bool = False
                     ) -> Decision:  # fmt: skip
    """``rollback`` with the run config's champion alias and lock settings (``serve`` as in ``promote_version``)."""
    return rollback(mlflow_client, model_name, version, cfg.registry.champion_alias,
                    **_promotion_settings(cfg, model_name, serve))  # fmt: skip
