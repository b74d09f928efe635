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

from dcgrpo import steps
from dcgrpo.config import load_config
from dcgrpo.deploy import DeploymentContract
from dcgrpo.models import ModelNotFoundError

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
    monkeypatch.setenv(steps.MODEL_STORE_ENV, str(store))
    return cache, store


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_a_base_model_in_the_model_cache_is_referenced_where_it_is(tiny_model, volumes, tmp_path):
    cache, _ = volumes
    base = cache / "org--base"
    shutil.copytree(tiny_model, base)
    artifact = tmp_path / "artifact"
    steps.warm_start_step("tiny-cpu", [], str(base), "", str(artifact), kfp_run_id="run-1")
    assert _files(artifact) == {steps.MODEL_REF_FILE}  # no weights through the artifact store
    assert steps.resolve_model(str(artifact)) == str(base)
    assert steps.latest_model_dir(str(artifact)) == str(base)


def test_a_base_model_elsewhere_is_copied_once_to_the_checkpoint_volume(tiny_model, volumes, tmp_path):
    _, store = volumes
    artifact = tmp_path / "artifact"
    steps.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(artifact), kfp_run_id="run-2")
    assert _files(artifact) == {steps.MODEL_REF_FILE}
    on_volume = store / "models" / "run-2" / "base"
    assert steps.resolve_model(str(artifact)) == str(on_volume)
    assert (on_volume / "config.json").is_file() and (on_volume / "model.safetensors").is_file()


def test_without_the_volume_the_weights_go_into_the_artifact(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("DCGRPO_MODEL_CACHE", raising=False)
    monkeypatch.setenv(steps.MODEL_STORE_ENV, str(tmp_path / "not-mounted"))  # set by the pipeline, no PVC here
    artifact = tmp_path / "artifact"
    steps.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(artifact), kfp_run_id="run-3")
    assert steps.MODEL_REF_FILE not in _files(artifact) and (artifact / "model.safetensors").is_file()
    assert steps.resolve_model(str(artifact)) == str(artifact)


def test_export_reads_through_the_reference_and_registration_names_the_volume(tiny_model, volumes, tmp_path, mlc):
    """The FP8 export reads the referenced weights; the bf16 version is registered as ``pvc://<claim>/<path>``
    (KServe's scheme for a PVC) with nothing uploaded, and MLflow's server accepts that source."""
    _, store = volumes
    model = tmp_path / "model"
    steps.warm_start_step("tiny-cpu", [], str(tiny_model), "", str(model), kfp_run_id="run-4")
    fp8 = tmp_path / "fp8"
    meta = steps.export_fp8_step("tiny-cpu", [], str(model), {"method": "grpo"}, str(fp8))
    assert meta["quantized_weights"] > 0 and (fp8 / "config.json").is_file()
    ref = steps.model_reference("minio://mlpipeline/v2/artifacts/r/model", str(model), {"method": "grpo"},
                                "minio://mlpipeline/v2/artifacts/r/fp8")  # fmt: skip
    assert ref["model_uri"] == f"pvc://{C.checkpoint_pvc}/models/run-4/base"

    exp = mlc.create_experiment(f"store-{uuid.uuid4().hex[:6]}")
    run = mlc.create_run(exp, tags={steps.EVAL_METRICS_TAG: json.dumps({"eval/synthetic/avg_1": 0.5})}).info
    mlc.log_metric(run.run_id, "dc/lambda", 0.0)
    name = f"store-{uuid.uuid4().hex[:6]}"
    uri = mlc.tracking_uri
    mlc.set_tag(run.run_id, steps.EVAL_ENGINE_TAG, "vllm 0.33.0")
    meta = {"mlflow_run_id": run.run_id, "discrepancy": 1e-4, "rollout_engine": "vllm 0.24.0 (verl 0.9.1)"}
    version = steps.register_step("", [], uri, name, meta, ref["model_uri"], ref["fp8_uri"]).version
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
    steps.write_model_ref(str(artifact), tmp_path / "checkpoints" / "models" / "r" / "grpo" / "round-1")
    with pytest.raises(ModelNotFoundError, match=r"round-1, which is not there: mount the checkpoint volume"):
        steps.latest_model_dir(str(artifact))
    with pytest.raises(ValueError, match="on no pipeline volume"):
        steps.volume_uri(str(tmp_path / "elsewhere"))


def test_built_in_rounds_leave_their_checkpoints_on_the_volume_and_resume_through_the_reference(
    tiny_model, volumes, tmp_path, mlflow_server
):
    """Two real rounds (vLLM CPU rollouts): each round's artifact is a reference; round 2 resumes round 1's
    checkpoint on the volume (one MLflow run, steps continue); export reads round 2's latest checkpoint."""
    from dcgrpo.data.synthetic import write_synthetic_splits

    _, store = volumes
    tiny = ["train.steps_per_round=1", "train.prompts_per_batch=4", "train.ppo_mini_batch=2",
            "data.synthetic_train_size=32", "data.synthetic_val_size=8", f"storage.root={tmp_path / 'root'}"]  # fmt: skip
    data = tmp_path / "data"
    write_synthetic_splits(load_config(preset="tiny-cpu", overrides=tiny).data, data)
    base = tmp_path / "base"
    steps.warm_start_step("tiny-cpu", tiny, str(tiny_model), str(data), str(base), kfp_run_id="run-5")
    meta, model_in = {}, base
    for k in range(2):
        out = tmp_path / f"round-{k + 1}"
        meta, _ = steps.train_round_step("tiny-cpu", tiny, "grpo", k, 2, mlflow_server, "run-5", str(data),
                                         str(model_in), meta, str(out))  # fmt: skip
        assert _files(out) == {steps.MODEL_REF_FILE}, k
        assert steps.resolve_model(str(out)) == str(store / "models" / "run-5" / "grpo" / f"round-{k + 1}")
        model_in = out
    assert meta["step"] == 2 and meta["round"] == 2
    assert meta["rollout_engine"].startswith("vllm 0.")  # the engine the round's discrepancy was measured on
    latest = Path(steps.latest_model_dir(str(model_in)))
    assert latest.is_relative_to(store / "models" / "run-5" / "grpo" / "round-2" / "checkpoints")
    fp8 = tmp_path / "fp8"
    assert steps.export_fp8_step("tiny-cpu", tiny, str(model_in), meta, str(fp8))["method"] == "grpo"
