"""The promotion lock: one promotion of a registered model at a time, on a server with no compare-and-set.

The lock is a registered model ``<name>.promotion-lock`` (MLflow's unique names make its creation atomic);
the notes below say why deleting it is safe. Wait and stale times default to ``RegistryConfig``'s.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dcgrpo.config import RegistryConfig
from dcgrpo.registry.connection import MISSING as _MISSING
from dcgrpo.registry.connection import RegistryError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S: float = RegistryConfig.model_fields["promotion_lock_wait_s"].default
LOCK_STALE_S: float = RegistryConfig.model_fields["promotion_lock_stale_s"].default

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
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

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
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

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
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

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
    mlflow_client, name: str, purpose: str = "promotion", wait_s: float = LOCK_WAIT_S, stale_s: float = LOCK_STALE_S
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
