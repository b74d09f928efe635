"""A flaky MLflow (a proxy answering 503, or losing a response after the server acted) costs nothing.

Real MLflow server on sqlite behind ``tests/flaky_proxy.py``; the project's own calls (``tracking.start_run``,
``stages.registration.register_and_gate``, ``registry.promote``) retry through MLflow's HTTP layer (``tracking.mlflow_client``)
and every create stays idempotent.
"""

from __future__ import annotations

import hashlib
import uuid

import pytest

from dcgrpo import registry
from dcgrpo.config import TrackingConfig, load_config
from dcgrpo.registry.registration import _artifact_key
from dcgrpo.stages.registration import promote_version, register_and_gate
from dcgrpo.tracking import CREATE_TOKEN_TAG, start_run
from tests.flaky_proxy import FlakyProxy

pytestmark = pytest.mark.slow
API = r"^/api/2\.0/mlflow/"


@pytest.fixture
def proxy(mlflow_server):
    p = FlakyProxy(mlflow_server)
    yield p
    p.close()


def _runs_named(mlc, experiment: str, name: str) -> list:
    exp = mlc.get_experiment_by_name(experiment)
    return mlc.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")


def test_one_503_on_each_tracking_call_loses_nothing(proxy, mlc, tmp_path):
    exp, name = f"flaky-{uuid.uuid4().hex[:6]}", "train-run"
    for path in ("experiments/create", "runs/create", "runs/log-batch", "runs/update", "runs/search"):
        proxy.fail("POST", API + path)  # the first request of each kind answers 503
    cfg = TrackingConfig(mlflow_uri=proxy.uri, experiment=exp, flush_every=1)
    with start_run(cfg, storage_root=str(tmp_path), run_name=name, params={"train.lr": 1e-5}) as run:
        for step in (1, 2, 3):
            run.log_metrics({"dc/lambda": step / 10}, step=step)
    assert len(proxy.failed()) == 5, proxy.failed()  # every fault happened
    (only,) = _runs_named(mlc, exp, name)  # one run, not a second from a retried create
    assert only.info.run_id == run.run_id and only.info.status == "FINISHED"  # the lost final update was retried
    assert [m.value for m in mlc.get_metric_history(run.run_id, "dc/lambda")] == [0.1, 0.2, 0.3]
    assert only.data.params["train.lr"] == "1e-05"


def test_a_create_whose_answer_is_lost_does_not_create_twice(proxy, mlc, tmp_path, model_dir):
    exp = f"lost-{uuid.uuid4().hex[:6]}"
    proxy.fail("POST", API + "experiments/create", action="lose")  # the server creates, the client sees 503
    proxy.fail("POST", API + "runs/create", action="lose")
    cfg = TrackingConfig(mlflow_uri=proxy.uri, experiment=exp)
    with start_run(cfg, storage_root=str(tmp_path), run_name="once") as run:
        pass
    runs = _runs_named(mlc, exp, "once")
    assert [r.info.run_id for r in runs] == [run.run_id] and len(proxy.failed()) == 2
    assert runs[0].data.tags[CREATE_TOKEN_TAG]

    name = f"lost-model-{uuid.uuid4().hex[:6]}"
    proxy.fail("POST", API + "registered-models/create", action="lose")
    proxy.fail("POST", API + "model-versions/create", action="lose")
    mv = registry.register_model(registry.client(proxy.uri), name, run.run_id, str(model_dir), metrics={"acc": 0.5},
                                 final_lambda=0.0, discrepancy=1e-4, config_hash="h")  # fmt: skip
    versions = mlc.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == [mv.version] == ["1"], "one version for one registration"
    assert mlc.get_model_version_by_alias(name, "challenger").version == "1"


def test_register_gate_and_promote_with_every_second_request_failing(proxy, mlc, tmp_path, model_dir):
    """Every second MLflow request of the registry's (API and artifact uploads) answers 503: the outcome is the
    one of a healthy server, the champion's stored files are byte-identical, the lock is released."""
    cfg = load_config(overrides=["eval.gate_metric=eval/synthetic/avg_1"])
    run_id = mlc.create_run(mlc.create_experiment(f"reg-{uuid.uuid4().hex[:6]}")).info.run_id
    name = f"flaky-model-{uuid.uuid4().hex[:6]}"
    client = registry.client(proxy.uri)
    proxy.fail("*", r"^/api/2\.0/mlflow(-artifacts)?/", every=2)
    registered = register_and_gate(client, cfg, name, run_id, str(model_dir),
                                   metrics={"eval/synthetic/avg_1": 0.5}, final_lambda=0.0, discrepancy=1e-4)  # fmt: skip
    decision = promote_version(client, cfg, name, registered.version)
    assert len(proxy.failed()) >= 8, proxy.failed()
    assert registered.version == "1" and registered.passes_gate and decision.promoted
    assert [v.version for v in mlc.search_model_versions(f"name='{name}'")] == ["1"]
    assert mlc.get_model_version_by_alias(name, "champion").version == "1"
    assert mlc.get_model_version(name, "1").tags[registry.TAG_DECISION] == "promoted"
    assert not mlc.search_registered_models(f"name LIKE '{name}.%'"), "the lock and its guard are released"
    stored = mlc.download_artifacts(run_id, f"model/{_artifact_key(str(model_dir.resolve()), 'fp8')}",
                                    str(tmp_path / "back"))  # fmt: skip
    for f in ("config.json", "model.safetensors"):
        assert hashlib.sha256((model_dir / f).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "back" / stored.rsplit("/", 1)[-1] / f).read_bytes()).digest()  # fmt: skip


def test_a_503_on_the_lock_release_does_not_block_the_next_promotion(proxy, mlc, model_dir):
    run_id = mlc.create_run(mlc.create_experiment(f"rel-{uuid.uuid4().hex[:6]}")).info.run_id
    name = f"release-{uuid.uuid4().hex[:6]}"
    client = registry.client(proxy.uri)
    v1 = registry.register_model(client, name, run_id, str(model_dir), metrics={"eval/synthetic/avg_1": 0.5},
                                 final_lambda=0.0, discrepancy=1e-4, config_hash="h").version  # fmt: skip
    proxy.fail("DELETE", API + "registered-models/delete", times=2)  # the lock's and the guard's deletes
    assert registry.promote(client, name, v1, "eval/synthetic/avg_1", 1e-3).promoted
    assert len(proxy.failed()) == 2
    # Before: the lock stayed and the next promotion waited for it to go stale (10 min). Now it is free at once.
    assert registry.promote(client, name, v1, "eval/synthetic/avg_1", 1e-3, lock_wait_s=1.0).reason == registry.ALREADY
