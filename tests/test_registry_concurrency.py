"""Concurrent promotions of one model against a real MLflow server: each run gates its own version,
one at a time (the registry's promotion lock), so the better model ends as champion.

The tests marked slow load every core with busy loops and race many promoters (threads, each with its own
client) through the lock, with stale-lock breaking racing releases: issue 22 saw the lock's create, read and
delete race only on a loaded machine."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from dcgrpo import registry
from dcgrpo.registry import promotion

GATE = "eval/synthetic/avg_1"
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
    """Neither the lock nor its guard is left behind."""
    lock = name + registry.LOCK_SUFFIX
    return not any(mlc.search_registered_models(f"name='{m}'") for m in (lock, lock + registry.GUARD_SUFFIX))


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


class _VanishingLock(MlflowClient):
    """What the server answers when the lock is released while it refuses our create: its SQL store re-reads
    the existing model to word "already exists", finds nothing and says RESOURCE_DOES_NOT_EXIST (issue 22)."""

    def __init__(self, *args, vanish: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.vanish = vanish

    def create_registered_model(self, name, *args, **kwargs):
        if name.endswith(registry.LOCK_SUFFIX) and self.vanish > 0:
            self.vanish -= 1
            raise RestException(
                {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"Registered Model with name={name} not found"}
            )
        return super().create_registered_model(name, *args, **kwargs)


class _CreateFails(MlflowClient):
    def create_registered_model(self, name, *args, **kwargs):
        raise RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "database is locked"})


def test_a_lock_that_vanishes_while_we_ask_for_it_counts_as_free(mlc, mlflow_server, model_dir):
    name, _ = _model_with_champion(mlc, model_dir)
    v2 = _register(mlc, name, model_dir, 0.9)
    client = _VanishingLock(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    assert registry.promote(client, name, v2, GATE, BUDGET, lock_wait_s=5).promoted
    assert client.vanish == 0 and _lock_released(mlc, name)


def test_other_lock_errors_surface_and_decide_nothing(mlc, mlflow_server, model_dir):
    name, v1 = _model_with_champion(mlc, model_dir)
    v2 = _register(mlc, name, model_dir, 0.9)
    client = _CreateFails(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    with pytest.raises(MlflowException, match="database is locked"):
        registry.promote(client, name, v2, GATE, BUDGET, lock_wait_s=5)
    assert registry.TAG_DECISION not in _tags(mlc, name, v2)
    assert mlc.get_model_version_by_alias(name, "champion").version == v1


# --- under load: many promoters, stale locks broken while their holders release them -------------------------------


@pytest.fixture
def cpu_load():
    """Busy loops on every core (at most 8) for the test: the server and the promoters fight for CPU.

    Each loop ends itself after 120 s should this process die before killing it."""
    burn = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(min(os.cpu_count() or 2, 8))]
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@dataclass
class _Section:
    """One stay inside the lock, as seen from inside: monotonic times, the lock model's (holder, created) at entry
    and at exit, and the age of the lock entered with when leaving."""

    purpose: str
    enter: float
    exit: float
    at_enter: tuple | None
    at_exit: tuple | None
    age_at_exit: float

    def mine(self, seen: tuple | None) -> bool:
        return seen is not None and seen[0].endswith(": " + self.purpose)


def _lock_model(mlc, name) -> tuple | None:
    try:
        rm = mlc.get_registered_model(name + registry.LOCK_SUFFIX)
    except MlflowException:
        return None
    return rm.tags.get("holder", ""), rm.creation_timestamp


@contextmanager
def _recorded(sections: list, mlc, name: str, purpose: str, hold_s: float = 0.0):
    """Inside the lock already: note the lock at entry and at exit, around the caller's block (and ``hold_s``)."""
    enter, at_enter = time.monotonic(), _lock_model(mlc, name)
    try:
        yield
        time.sleep(hold_s)
    finally:
        at_exit = _lock_model(mlc, name)
        age = time.time() - at_enter[1] / 1000 if at_enter else float("inf")  # of the lock we entered with
        sections.append(_Section(purpose, enter, time.monotonic(), at_enter, at_exit, age))


def _check_exclusive(sections: list[_Section], stale_s: float) -> int:
    """Holders whose lock was never broken never overlap, and such a lock is still theirs when they leave.

    A lock still younger than ``stale_s`` when its holder leaves cannot have been broken: finding another
    holder's lock (or none) then means someone deleted a lock they did not hold. Returns how many did not find
    their own lock when leaving (broken, or about to be: a break may land after that last look)."""
    for s in sections:
        assert s.mine(s.at_enter), f"{s.purpose}: entered, but the lock is {s.at_enter}"
        if s.age_at_exit < stale_s:
            assert s.mine(s.at_exit) and s.at_exit[1] == s.at_enter[1], f"{s.purpose}: lost a fresh lock: {s}"
    whole = sorted((s for s in sections if s.mine(s.at_exit) and s.at_exit[1] == s.at_enter[1]),
                   key=lambda s: s.enter)  # fmt: skip
    for before, after in zip(whole, whole[1:], strict=False):
        assert after.enter >= before.exit, f"two holders at once: {before} and {after}"
    return len(sections) - len(whole)


def _threads(jobs: list, timeout: float = 90) -> list:
    """Run each job (a callable) in its own thread, all released at once; exceptions are returned."""
    barrier, results = threading.Barrier(len(jobs)), [None] * len(jobs)

    def run(i, job):
        barrier.wait()
        try:
            results[i] = job()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, job), daemon=True) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a promoter hung"
    return results


@pytest.mark.slow
def test_many_concurrent_promotions_under_load_gate_one_at_a_time(mlc, mlflow_server, model_dir, monkeypatch, cpu_load):
    name, v1 = _model_with_champion(mlc, model_dir)
    scores = [round(0.3 + 0.05 * i, 2) for i in range(12)]  # 0.3 .. 0.85 around the champion's 0.5
    random.shuffle(scores)
    score_of = {v1: 0.5} | {_register(mlc, name, model_dir, s): s for s in scores}
    sections: list[_Section] = []
    real = promotion.promotion_lock

    @contextmanager
    def recording_lock(client, model, purpose="promotion", *args, **kwargs):
        with real(client, model, purpose, *args, **kwargs), _recorded(sections, mlc, model, purpose):
            yield

    monkeypatch.setattr(promotion, "promotion_lock", recording_lock)  # where promote() looks it up

    def job(version):
        cls = _Slow if int(version) % 3 == 0 else MlflowClient  # some dawdle inside the lock
        client = cls(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        return version, registry.promote(client, name, version, GATE, BUDGET, lock_wait_s=60)

    results = _threads([lambda v=v: job(v) for v in score_of if v != v1])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert _check_exclusive(sections, stale_s=600) == 0 and len(sections) == len(scores)

    # Replayed in the order they held the lock, each decision is the gate's against the champion of that moment.
    champion = v1
    for s in sorted(sections, key=lambda s: s.enter):
        version = s.purpose.removeprefix("promoting v")
        tags = _tags(mlc, name, version)
        assert tags[registry.TAG_COMPARED_TO] == champion, (version, tags)
        promoted = score_of[version] >= score_of[champion]
        assert tags[registry.TAG_DECISION] == ("promoted" if promoted else "rejected"), (version, tags)
        champion = version if promoted else champion
    best = max(score_of, key=score_of.get)
    assert champion == best and mlc.get_model_version_by_alias(name, "champion").version == best
    assert dict(results)[best].promoted
    assert _lock_released(mlc, name)


@pytest.mark.slow
def test_lock_churn_under_load_never_has_two_holders(mlc, mlflow_server, cpu_load):
    name, sections = f"dcgrpo-churn-{uuid.uuid4().hex[:8]}", []

    def job(i):
        client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        for k in range(2):
            purpose = f"churn {i}.{k}"
            with registry.promotion_lock(client, name, purpose, wait_s=60):
                with _recorded(sections, client, name, purpose, hold_s=random.uniform(0, 0.02)):
                    pass

    results = _threads([lambda i=i: job(i) for i in range(16)])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(sections) == 32 and _check_exclusive(sections, stale_s=600) == 0
    assert _lock_released(mlc, name)


class _SlowDelete(MlflowClient):
    """Its deletes land late (a slow network): a release that reads "mine", then deletes, is overtaken by a
    breaker deleting the same lock and a waiter taking it again, unless the release holds off the breakers."""

    def delete_registered_model(self, name):
        if name.endswith(registry.LOCK_SUFFIX):
            time.sleep(1.0)
        return super().delete_registered_model(name)


@pytest.mark.slow
def test_stale_breaking_racing_releases_under_load_never_deletes_a_fresh_lock(mlc, mlflow_server, cpu_load, caplog):
    name, sections, stale_s = f"dcgrpo-stale-{uuid.uuid4().hex[:8]}", [], 2.0
    holds = {f"overstays {i}": stale_s + 0.8 for i in range(2)}  # broken while they hold it
    holds |= {f"releases late {i}": stale_s - 0.5 for i in range(3)}  # their release meets the breakers
    holds |= {f"quick {i}": 0.0 for i in range(9)}

    def job(purpose):
        cls = _SlowDelete if purpose.startswith("releases late") else MlflowClient
        client = cls(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        time.sleep(0 if purpose.startswith("overstays") else random.uniform(0.2, 1.0))  # one overstays first
        with registry.promotion_lock(client, name, purpose, wait_s=60, stale_s=stale_s):
            with _recorded(sections, mlc, name, purpose, hold_s=holds[purpose]):
                pass

    results = _threads([lambda p=p: job(p) for p in holds])
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len(sections) == len(holds)
    _check_exclusive(sections, stale_s)
    # The race was run, not skipped: an overstayer's lock was broken and its release found a successor's (or none).
    # (Counted from the log: a break can land after the overstayer's last look, which then still shows its lock.)
    assert "breaking stale promotion lock" in caplog.text and "was broken while" in caplog.text, sections
    assert _lock_released(mlc, name)
