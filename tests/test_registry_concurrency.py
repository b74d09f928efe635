"""Concurrent promotions of one model against a real MLflow server: each run gates its own version,
one at a time (the registry's promotion lock), so the better model ends as champion."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from mlflow import MlflowClient

from dcgrpo import registry

GATE = "eval/synthetic/avg@1"
BUDGET = 5e-3


class _Slow(MlflowClient):
    """A real client that dawdles before moving an alias: without serialisation, two promotions would both
    gate against the old champion and the last alias move would win, better or not."""

    def set_registered_model_alias(self, name, alias, version):
        time.sleep(0.3)
        return super().set_registered_model_alias(name, alias, version)


class _AliasFails(MlflowClient):
    def set_registered_model_alias(self, name, alias, version):
        raise RuntimeError("registry unavailable")


def _register(mlc, name, model_dir, acc: float) -> str:
    exp = mlc.get_experiment_by_name("registry-tests") or mlc.get_experiment(mlc.create_experiment("registry-tests"))
    run_id = mlc.create_run(exp.experiment_id).info.run_id
    mv = registry.register_model(mlc, name, run_id, str(model_dir), metrics={GATE: acc}, final_lambda=0.1,
                                 discrepancy=1e-3, config_hash="abc123")  # fmt: skip
    return mv.version


def _model_with_champion(mlc, model_dir) -> tuple[str, str]:
    name = f"dcgrpo-conc-{uuid.uuid4().hex[:8]}"
    v1 = _register(mlc, name, model_dir, 0.5)
    assert registry.promote(mlc, name, v1, GATE, BUDGET).promoted
    return name, v1


def _race(jobs: list[tuple]) -> list:
    """Run ``promote(client, name, version)`` for each job at the same instant; exceptions are returned."""
    barrier, results = threading.Barrier(len(jobs)), [None] * len(jobs)

    def run(i, client, name, version):
        barrier.wait()
        try:
            results[i] = registry.promote(client, name, version, GATE, BUDGET, lock_wait_s=30)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _tags(mlc, name, version) -> dict:
    return mlc.get_model_version(name, version).tags


def _lock_released(mlc, name) -> bool:
    return not mlc.search_registered_models(f"name='{name}{registry.LOCK_SUFFIX}'")


@pytest.mark.parametrize("trial", range(4))
def test_concurrent_promotions_end_with_the_better_champion(mlc, mlflow_server, model_dir, trial):
    name, v1 = _model_with_champion(mlc, model_dir)
    best, good = _register(mlc, name, model_dir, 0.9), _register(mlc, name, model_dir, 0.7)
    slow = _Slow(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    jobs = [(slow, name, best), (slow, name, good)]
    results = _race(jobs if trial % 2 else jobs[::-1])
    assert not [r for r in results if isinstance(r, Exception)], results

    assert mlc.get_model_version_by_alias(name, "champion").version == best
    mine, other = _tags(mlc, name, best), _tags(mlc, name, good)
    # Each version carries its own decision: its own metric, compared with what was champion when it ran.
    assert mine[registry.TAG_DECISION] == "promoted" and "0.9 >= champion" in mine[registry.TAG_REASON]
    assert mine[registry.TAG_COMPARED_TO] in (v1, good)
    if other[registry.TAG_COMPARED_TO] == v1:  # the 0.7 went first, then lost the title to the 0.9
        assert other[registry.TAG_DECISION] == "promoted" and mine[registry.TAG_COMPARED_TO] == good
    else:
        assert other[registry.TAG_COMPARED_TO] == best and other[registry.TAG_DECISION] == "rejected"
        assert "0.7 < champion" in other[registry.TAG_REASON]
    assert _tags(mlc, name, v1)[registry.TAG_COMPARED_TO] == "none"  # the old champion's record is untouched
    assert _lock_released(mlc, name)


@pytest.mark.parametrize("trial", range(2))
def test_a_concurrent_failure_is_recorded_on_its_own_version_only(mlc, mlflow_server, model_dir, trial):
    name, v1 = _model_with_champion(mlc, model_dir)
    failing, good = _register(mlc, name, model_dir, 0.9), _register(mlc, name, model_dir, 0.7)
    broken = _AliasFails(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    slow = _Slow(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    jobs = [(broken, name, failing), (slow, name, good)]
    results = _race(jobs if trial % 2 else jobs[::-1])
    outcome = dict(zip([job[2] for job in (jobs if trial % 2 else jobs[::-1])], results, strict=True))
    assert isinstance(outcome[failing], RuntimeError) and outcome[good].promoted

    assert mlc.get_model_version_by_alias(name, "champion").version == good
    assert _tags(mlc, name, failing)[registry.TAG_DECISION] == "failed"
    assert "registry unavailable" in _tags(mlc, name, failing)[registry.TAG_REASON]
    assert _tags(mlc, name, good)[registry.TAG_DECISION] == "promoted"
    assert _tags(mlc, name, v1)[registry.TAG_DECISION] == "promoted"
    assert _lock_released(mlc, name)


def test_a_held_lock_makes_a_waiter_give_up_with_a_clear_error(mlc, model_dir):
    name, _ = _model_with_champion(mlc, model_dir)
    v2 = _register(mlc, name, model_dir, 0.9)
    lock = name + registry.LOCK_SUFFIX
    mlc.create_registered_model(lock, tags={"holder": "another pipeline", "token": "t"})
    try:
        start = time.monotonic()
        with pytest.raises(registry.RegistryError, match="another promotion holds .*another pipeline"):
            registry.promote(mlc, name, v2, GATE, BUDGET, lock_wait_s=1)
        assert time.monotonic() - start < 5
        assert registry.TAG_DECISION not in _tags(mlc, name, v2)  # nothing decided, nothing written
        assert mlc.get_registered_model(lock).tags["token"] == "t"  # not ours to release
    finally:
        mlc.delete_registered_model(lock)


def test_a_stale_lock_is_broken_with_a_warning(mlc, model_dir, caplog):
    name, _ = _model_with_champion(mlc, model_dir)
    v2 = _register(mlc, name, model_dir, 0.9)
    mlc.create_registered_model(name + registry.LOCK_SUFFIX, tags={"holder": "a crashed pod", "token": "t"})
    time.sleep(1.5)
    decision = registry.promote(mlc, name, v2, GATE, BUDGET, lock_wait_s=10, lock_stale_s=1)
    assert decision.promoted
    assert "breaking stale promotion lock" in caplog.text and "a crashed pod" in caplog.text
    assert _lock_released(mlc, name)
