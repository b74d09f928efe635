"""Models by reference between the GPU steps (issue 12, point 8): on a cluster the warm start and every round leave
their weights on a shared volume (the model cache, the checkpoint volume) and their KFP Model artifact holds only
``model_ref.json``; export, evaluation and registration read through it. Without the volume (kfp.local, a cluster
without it) the weights go into the artifact, as before. Real tiny model, real FP8 export, real MLflow server;
the volumes are temp directories standing in for the mounted PVCs."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from dcgrpo import model_refs, tracking
from dcgrpo.config import load_config
from dcgrpo.deploy import DeploymentContract
from dcgrpo.models import ModelNotFoundError
from dcgrpo.stages import evaluate as evaluate_stage
from dcgrpo.stages import model as model_stage
from dcgrpo.stages import publish

C = DeploymentContract()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from dcgrpo.models import build_tiny_model

    return build_tiny_model(load_config(preset="tiny-cpu").model, tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def volumes(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(model cache mount, checkpoint mount) as the pipeline sets them on a GPU task."""
    cache, store = tmp_path / "cache", tmp_path / "checkpoints"
    cache.mkdir()
    store.mkdir()
    monkeypatch.setenv("DCGRPO_MODEL_CACHE", str(cache))
    monkeypatch.setenv(model_refs.MODEL_STORE_ENV, str(store))
    return cache, store


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_a_base_model_in_the_model_cache_is_referenced_where_it_is(tiny_model, volumes, tmp_path):
    cache, _ = volumes
    base = cache / "org--base"
    shutil.copytree(tiny_model, base)
    artifact = tmp_path / "artifact"
    model_stage.warm_start_step("tiny-cpu", [], str(base), "", str(artifact), kfp_run_id="run-1")
    assert _files(artifact) == {model_refs.MODEL_REF_FILE}  # no weights through the artifact store
    assert model_refs.resolve_model(str(artifact)) == str(base)
    assert model_refs.latest_model_dir(str(artifact)) == str(base)


def test_a_base_model_elsewhere_is_copied_once_to_the_checkpoint_volume(tiny_model, volumes, tmp_path):
    _, store = volumes
    artifact = tmp_path / "artifact"
    model_stage.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(artifact), kfp_run_id="run-2")
    assert _files(artifact) == {model_refs.MODEL_REF_FILE}
    on_volume = store / "models" / "run-2" / "base"
    assert model_refs.resolve_model(str(artifact)) == str(on_volume)
    assert (on_volume / "config.json").is_file() and (on_volume / "model.safetensors").is_file()


def test_without_the_volume_the_weights_go_into_the_artifact(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("DCGRPO_MODEL_CACHE", raising=False)
    monkeypatch.setenv(model_refs.MODEL_STORE_ENV, str(tmp_path / "not-mounted"))  # set by the pipeline, no PVC here
    artifact = tmp_path / "artifact"
    model_stage.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(artifact), kfp_run_id="run-3")
    assert model_refs.MODEL_REF_FILE not in _files(artifact) and (artifact / "model.safetensors").is_file()
    assert model_refs.resolve_model(str(artifact)) == str(artifact)


def test_export_reads_through_the_reference_and_registration_names_the_volume(tiny_model, volumes, tmp_path, mlc):
    """The FP8 export reads the referenced weights; the bf16 version is registered as ``pvc://<claim>/<path>``
    (KServe's scheme for a PVC) with nothing uploaded, and MLflow's server accepts that source."""
    _, store = volumes
    model = tmp_path / "model"
    model_stage.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(model), kfp_run_id="run-4")
    fp8 = tmp_path / "fp8"
    meta = evaluate_stage.export_fp8_step("tiny-cpu", [], str(model), {"method": "grpo"}, str(fp8))
    assert meta["quantized_weights"] > 0 and (fp8 / "config.json").is_file()
    ref = model_refs.model_reference("minio://mlpipeline/v2/artifacts/r/model", str(model), {"method": "grpo"},
                                "minio://mlpipeline/v2/artifacts/r/fp8")  # fmt: skip
    assert ref["model_uri"] == f"pvc://{C.checkpoint_pvc}/models/run-4/base"

    exp = mlc.create_experiment(f"store-{uuid.uuid4().hex[:6]}")
    run = mlc.create_run(exp, tags={tracking.EVAL_METRICS_TAG: json.dumps({"eval/synthetic/avg_1": 0.5})}).info
    mlc.log_metric(run.run_id, "dc/lambda", 0.0)
    name = f"store-{uuid.uuid4().hex[:6]}"
    uri = mlc.tracking_uri
    mlc.set_tag(run.run_id, tracking.EVAL_ENGINE_TAG, "vllm 0.33.0")
    meta = {"mlflow_run_id": run.run_id, "discrepancy": 1e-4, "rollout_engine": "vllm 0.24.0 (verl 0.9.1)"}
    version = publish.register_step("", [], uri, name, meta, ref["model_uri"], ref["fp8_uri"]).version
    bf16 = mlc.search_model_versions(f"name='{name}-bf16'")[0]
    assert bf16.source == ref["model_uri"]
    assert mlc.list_artifacts(run.run_id) == []
    # both vLLM versions on the registered model: verl's rollouts (0.24.0) are not the served engine (0.33.0)
    tags = mlc.get_model_version(name, version).tags
    assert {k: v for k, v in tags.items() if k.startswith("dcgrpo.engine.")} == {
        "dcgrpo.engine.rollout": "vllm 0.24.0 (verl 0.9.1)", "dcgrpo.engine.eval": "vllm 0.33.0",
        "dcgrpo.engine.serving": "vllm 0.33.0", "dcgrpo.engine.rollout_matches_serving": "false",
    }  # fmt: skip


def test_a_reference_whose_volume_is_missing_names_the_path_and_the_fix(tmp_path):
    artifact = tmp_path / "artifact"
    model_refs.write_model_ref(str(artifact), tmp_path / "checkpoints" / "models" / "r" / "grpo" / "round-1")
    with pytest.raises(ModelNotFoundError, match=r"round-1, which is not there: mount the checkpoint volume"):
        model_refs.latest_model_dir(str(artifact))
    with pytest.raises(ValueError, match="on no pipeline volume"):
        model_refs.volume_uri(str(tmp_path / "elsewhere"))


def test_the_train_task_keeps_its_checkpoints_on_the_volume_and_a_retry_resumes_bit_identically(
    tiny_model, volumes, tmp_path, mlflow_server
):
    """One train task per method (real vLLM CPU rollouts): its artifact is a reference to its folder on the volume.
    A task stopped after round 1 and retried (KFP's retry after an eviction) resumes that round's checkpoint in the
    same MLflow run, logs no step twice, and ends with weights bit-identical to a task never stopped; a retry after
    the last round trains nothing. Export reads the latest checkpoint."""
    from mlflow.tracking import MlflowClient

    from dcgrpo.data.synthetic import write_synthetic_splits
    from dcgrpo.stages.train import train_step

    _, store = volumes
    tiny = ["train.steps_per_round=1", "train.prompts_per_batch=4", "train.ppo_mini_batch=2",
            "data.synthetic_train_size=32", "data.synthetic_val_size=8", f"storage.root={tmp_path / 'root'}"]  # fmt: skip
    data = tmp_path / "data"
    write_synthetic_splits(load_config(preset="tiny-cpu", overrides=tiny).data, data)
    base = tmp_path / "base"
    model_stage.warm_start_step("tiny-cpu", tiny, str(tiny_model), str(data), str(base), kfp_run_id="run-5")

    def task(run_id: str, rounds: int, out: str):
        return train_step("tiny-cpu", tiny, "grpo", rounds, mlflow_server, run_id, str(data), str(base),
                          str(tmp_path / out))  # fmt: skip

    stopped, _ = task("run-5", 1, "try-1")  # the task's first try ends after round 1 (as if evicted there)
    meta, scalars = task("run-5", 2, "try-2")  # the retry: the same folder on the volume, the same MLflow run
    model_in = tmp_path / "try-2"
    assert _files(model_in) == {model_refs.MODEL_REF_FILE}
    assert model_refs.resolve_model(str(model_in)) == str(store / "models" / "run-5" / "grpo")
    assert meta["step"] == 2 and meta["round"] == 2 and meta["mlflow_run_id"] == stopped["mlflow_run_id"]
    assert meta["rollout_engine"].startswith("vllm 0.")  # the engine the discrepancy was measured on
    assert scalars[tracking.ROUND_DISCREPANCY] == meta["discrepancy"] > 0
    history = MlflowClient(mlflow_server).get_metric_history(meta["mlflow_run_id"], "dc/lambda")
    assert sorted(m.step for m in history) == [1, 2]
    rounds = MlflowClient(mlflow_server).get_metric_history(meta["mlflow_run_id"], tracking.ROUND_DISCREPANCY)
    assert sorted(m.step for m in rounds) == [1, 2]  # one point per round

    straight, _ = task("run-6", 2, "never-stopped")
    resumed = Path(model_refs.latest_model_dir(str(model_in)))
    whole = Path(model_refs.latest_model_dir(str(tmp_path / "never-stopped")))
    assert resumed.is_relative_to(store / "models" / "run-5" / "grpo" / "checkpoints")
    assert {p.name: p.read_bytes() for p in resumed.glob("*.safetensors")} == {
        p.name: p.read_bytes() for p in whole.glob("*.safetensors")
    }, "resuming round 1's checkpoint must give the weights of a task never stopped"
    again, _ = task("run-5", 2, "try-3")  # a retry after the last round: nothing trained, the same result
    assert (again["step"], again["mlflow_run_id"], again["discrepancy"]) == (
        2,
        meta["mlflow_run_id"],
        meta["discrepancy"],
    )
    fp8 = tmp_path / "fp8"
    assert evaluate_stage.export_fp8_step("tiny-cpu", tiny, str(model_in), meta, str(fp8))["method"] == "grpo"
