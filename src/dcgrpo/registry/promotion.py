"""The promotion protocol: gate a version against the champion, then move the ``champion`` alias (or roll back).

    promote N -> under the model's promotion lock: reads the champion, gates N against it, writes the
                 decision as tags on N, then moves ``champion`` to N in ONE call (MLflow aliases are
                 unique per model: never two champions), or leaves everything as it was
    serve     -> with a ``serve`` hook (the caller's; ``dcgrpo.serving.server`` applies an InferenceService): the
                 hook runs BEFORE the alias move, so ``champion`` never names a version the cluster was not told
                 to serve; a hook that fails leaves alias and served object as they were (see ``_commit``)
    rollback  -> ``rollback(V)``: the same serve-then-move for an older version, without the gate

Promotion is bound to the version it gates, never to whatever holds an alias
when it runs: two pipelines promoting at once each gate their own version, one
after the other (the lock), so the better one ends as champion. A promotion
that fails before the alias move leaves the champion where it was and records
``promotion.decision=failed`` on the version it gates.

The registry knows nothing of serving: the hook is whatever callable the caller above passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dcgrpo.registry.connection import CHAMPION_ALIAS, alias_version, check_model_name, model_version
from dcgrpo.registry.lock import LOCK_STALE_S, LOCK_WAIT_S, promotion_lock
from dcgrpo.registry.tags import TAG_COMPARED_TO, TAG_DECIDED_AT, TAG_DECISION, TAG_DISCREPANCY, TAG_REASON, metric

log = logging.getLogger(__name__)

Serve = Callable[[Any], Any]
"""The hook run before the alias moves: makes the cluster serve a model version; raises if it could not."""

ALREADY = "already the champion"


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
    value = metric(challenger, gate_metric)
    if value is None or not math.isfinite(value):
        return False, f"challenger v{challenger.version} has no finite {gate_metric}"
    d = float(challenger.tags.get(TAG_DISCREPANCY, "nan"))
    if not math.isfinite(d) or d > max_discrepancy:
        return False, f"discrepancy {d:.4g} outside budget {max_discrepancy:.4g}"
    if champion is None:
        return True, f"first champion ({gate_metric}={value:.4g}, discrepancy {d:.4g})"
    best = metric(champion, gate_metric)
    if best is not None and value < best:
        return False, f"{gate_metric} {value:.4g} < champion v{champion.version}'s {best:.4g}"
    shown = "n/a" if best is None else f"{best:.4g}"
    return True, f"{gate_metric} {value:.4g} >= champion v{champion.version}'s {shown}; discrepancy {d:.4g}"


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _tag_decision(mlflow_client, name: str, version: str, decision: str, reason: str, before: str | None) -> None:
    for key, value in {TAG_DECISION: decision, TAG_REASON: reason, TAG_COMPARED_TO: before or "none",
                       TAG_DECIDED_AT: _now()}.items():  # fmt: skip
        mlflow_client.set_model_version_tag(name, version, key, value)


def _decide(mlflow_client, name, mv, gate_metric, max_discrepancy, force, champion_alias, serve=None) -> Decision:
    """Read the champion, gate ``mv`` against it, tag ``mv`` with the decision, serve and move the alias if it
    passed."""
    champion = alias_version(mlflow_client, name, champion_alias)
    before = None if champion is None else str(champion.version)
    if before == str(mv.version):
        return Decision(name, before, before, False, ALREADY)
    ok, reason = gate(mv, champion, gate_metric, max_discrepancy)
    if force and not ok:
        ok, reason = True, f"forced (gate said: {reason})"
    _tag_decision(mlflow_client, name, mv.version, "promoted" if ok else "rejected", reason, before)
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
    champion_alias: str = CHAMPION_ALIAS,
    *,
    lock_wait_s: float = LOCK_WAIT_S,
    lock_stale_s: float = LOCK_STALE_S,
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
        mv = model_version(mlflow_client, name, version)
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
    champion_alias: str = CHAMPION_ALIAS,
    *,
    lock_wait_s: float = LOCK_WAIT_S,
    lock_stale_s: float = LOCK_STALE_S,
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
        mv = model_version(mlflow_client, name, version)
        champion = alias_version(mlflow_client, name, champion_alias)
        before = None if champion is None else str(champion.version)
        if before == version:
            decision = Decision(name, version, before, False, ALREADY)
            _serve_champion_again(serve, decision, mv)
            return decision
        reason = f"rolled back from v{before}" if before else "rolled back (no champion before)"
        try:
            _tag_decision(mlflow_client, name, version, "rolled_back", reason, before)
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
