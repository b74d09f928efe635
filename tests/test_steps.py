"""Pipeline steps as library functions, on real temp files and a real MLflow server."""

import json
import re
from types import SimpleNamespace

import pytest
from dcgrpo.components import build_components
from mlflow.tracking import MlflowClient

from dcgrpo import model_refs, tracking
from dcgrpo.config import ConfigError
from dcgrpo.stages import evaluate as evaluate_stage
from dcgrpo.stages import publish
from dcgrpo.stages import run as run_stage


def _artifact(tmp_path, name, **metadata):
    path = tmp_path / name
    path.mkdir()
    (path / "weights.txt").write_text(name)
    return SimpleNamespace(path=str(path), metadata=dict(metadata))


def test_step_config_layers_pipeline_fields_over_user_overrides():
    cfg = run_stage.step_config(
        "tiny-cpu", ["train.lr=3e-4"], "http://mlflow:5000", method__name="grpo", train__rounds=3
    )
    assert (cfg.train.lr, cfg.method.name, cfg.train.rounds) == (3e-4, "grpo", 3)
    assert cfg.tracking.mlflow_uri == "http://mlflow:5000"
    with pytest.raises(ConfigError, match="method.name"):
        run_stage.step_config("tiny-cpu", [], method__name="ppo")


def _reference(method: str, discrepancy: float) -> dict:
    return {"model_uri": f"s3://b/{method}", "fp8_uri": f"s3://b/{method}-fp8",
            "metadata": {"method": method, "discrepancy": discrepancy}}  # fmt: skip


def test_select_best_prefers_methods_within_the_discrepancy_budget():
    refs = [_reference("grpo", 5e-3), _reference("dc-grpo", 1e-4), _reference("tis", 1e-4)]
    # grpo scores highest but is over budget; dc-grpo and tis tie: the earlier one wins
    best = publish.select_best_step("tiny-cpu", ["registry.max_discrepancy=1e-3"], ["grpo", "dc-grpo", "tis"],
                                  [0.9, 0.5, 0.5], refs)  # fmt: skip
    assert best == ("dc-grpo", 0.5, refs[1])  # the reference itself: nothing copied
    # nobody within budget: the best gate metric overall
    best = publish.select_best_step("tiny-cpu", ["registry.max_discrepancy=null", "method.budget=1e-6"],
                                  ["grpo", "dc-grpo", "tis"], [0.9, 0.5, 0.5], refs)  # fmt: skip
    assert best.method == "grpo"
    with pytest.raises(ValueError, match="2 methods, 1 gate values"):
        publish.select_best_step("tiny-cpu", [], ["a", "b"], [0.1], refs[:2])


def test_evaluate_report_page_embeds_the_curves_and_escapes_the_text(tmp_path):
    import base64

    from dcgrpo.plots import write_report

    plot = tmp_path / "dc_curves.png"
    plot.write_bytes(b"PNG?")
    out = tmp_path / "report" / "index.html"
    write_report(str(out), "dcgrpo: dc-grpo", {"method": "dc-grpo", "note": "<b>x</b>"}, (["eval"], [["a<b"]]), plot)
    page = out.read_text()
    assert "<h1>dcgrpo: dc-grpo</h1>" in page and f"data:image/png;base64,{base64.b64encode(b'PNG?').decode()}" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a&lt;b" in page and "<b>x</b>" not in page
    write_report(str(out), "t", {}, ([], []), tmp_path / "missing.png")  # a run without curves: no image
    assert "<img" not in out.read_text()


def test_evaluate_report_renders_an_html_table_with_rounded_numbers(tmp_path):
    """The page the evaluate step writes (issue 27): a styled page, the evaluation as an HTML table (not Markdown in
    <pre>), numbers rounded, KFP's float-typed integers shown as integers, the quantities under their MLflow names."""
    from html.parser import HTMLParser

    from dcgrpo.evaluate import BenchResult, EvalReport
    from dcgrpo.plots import plot_curves, write_report

    report = EvalReport("model", "fp8", [BenchResult("synthetic", 16, 1, 0.8125, (0.5699, 0.9340), 0.75, (0.5, 0.9))],
                        wall_s=3.21, generate_s=1.5, generated_tokens=1234, settings={"temperature": 0.7})  # fmt: skip
    meta = {"method": "dc-grpo", "round": 2.0, "step": 16.0, "lambda": 7.230684229172768,
            "discrepancy": 0.00032612345678, "mlflow_run_id": "abc", "rollout_engine": "vllm 0.x"}  # fmt: skip
    cfg = run_stage.step_config("tiny-cpu", [])
    summary = evaluate_stage.report_summary(cfg, meta, "eval/synthetic/avg_1", 0.8125, "vllm 0.x")
    history = [{"step": 0, "val/accuracy": 0.75}] + [
        {"step": s, "dc/lambda": 0.5 * s, "dc/discrepancy_mean": 3e-4, "dc/discrepancy_p99": 1e-3, "reward/mean": 0.6}
        for s in (1, 2)
    ]
    plot = plot_curves(history, tmp_path / "dc_curves.png", 3e-4, "dc-grpo")
    out = tmp_path / "report.html"
    write_report(out, "dcgrpo evaluation: dc-grpo", summary, report.table(), plot, note=report.throughput_line())
    page = out.read_text()

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cells, self.tags, self._in = 0, [], set(), False

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.tables += tag == "table"
            self._in = tag in ("td", "th")

        def handle_endtag(self, tag):
            self._in = False

        def handle_data(self, data):
            if self._in:
                self.cells.append(data)

    parsed = Cells()
    parsed.feed(page)
    assert parsed.tables == 2 and "pre" not in parsed.tags and "style" in parsed.tags and "img" in parsed.tags
    assert ["benchmark", "problems", "k", "avg@k (%)"] == parsed.cells[parsed.cells.index("benchmark") :][:4]
    assert {"81.2", "[57.0, 93.4]", "75", "16"} <= set(parsed.cells)  # percent, one decimal
    assert {"7.231", "3.26e-04", "2"} <= set(parsed.cells)  # lambda, mean d, rounds trained
    assert "lambda after the last step (dc/lambda_next)" in parsed.cells
    assert "mean d, last round (dc/discrepancy_round_mean)" in parsed.cells
    assert "7.230684" not in page and "2.0<" not in page and "16.0<" not in page
    for number in re.findall(r"\d+\.\d+", " ".join(parsed.cells)):  # no unrounded float anywhere
        assert len(number.replace(".", "").lstrip("0")) <= 4, number


def test_model_reference_points_at_the_latest_checkpoint_inside_the_artifact(tmp_path, monkeypatch):
    hf = _artifact(tmp_path, "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")
    ref = model_refs.model_reference(
        "minio://mlpipeline/v2/artifacts/r/hf", hf.path, {"method": "grpo"}, "minio://x/fp8"
    )
    assert ref == {"model_uri": "minio://mlpipeline/v2/artifacts/r/hf", "fp8_uri": "minio://x/fp8",
                   "metadata": {"method": "grpo"}}  # fmt: skip
    monkeypatch.setattr(model_refs, "latest_model_dir", lambda d: f"{d}/checkpoints/step_000004")  # a built-in round's
    ref = model_refs.model_reference("s3://b/round/", hf.path, {}, "s3://b/fp8")
    assert ref["model_uri"] == "s3://b/round/checkpoints/step_000004"


def test_mark_failed_marks_only_this_pipelines_runs(mlflow_server):
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("mark-failed-test")
    mine = client.create_run(exp, tags={tracking.KFP_RUN_TAG: "run-a"}).info.run_id
    other = client.create_run(exp, tags={tracking.KFP_RUN_TAG: "run-b"}).info.run_id
    assert publish.mark_failed_step(mlflow_server, "run-a", "SUCCEEDED") == 0
    assert client.get_run(mine).info.status == "RUNNING"
    assert publish.mark_failed_step(mlflow_server, "run-a", "FAILED", "prepare-data: bad parquet") == 1
    assert client.get_run(mine).info.status == "FAILED"
    note = client.get_run(mine).data.tags["dcgrpo.pipeline_error"]
    assert note.startswith("pipeline run run-a ended FAILED: prepare-data: bad parquet; the failed step's log")
    assert client.get_run(other).info.status == "RUNNING"


def test_a_failed_run_says_why_in_mlflow(mlflow_server, tmp_path):
    """The exception that ended a step's run is its tag dcgrpo.error, and the exit handler's note points at it
    (issue 27: "Task exit-handler-1 failed." alone names neither the task nor the cause)."""
    from dcgrpo.tracking import ERROR_TAG, start_run

    cfg = run_stage.step_config("tiny-cpu", [f"storage.root={tmp_path}"], mlflow_server)
    with (
        pytest.raises(KeyError),
        start_run(cfg.tracking, storage_root=str(tmp_path), tags={"kfp_run_id": "r-x"}) as run,
    ):
        raise KeyError("eval.gate_metric 'eval/x/avg_1' was not measured")
    client = MlflowClient(mlflow_server)
    assert client.get_run(run.run_id).data.tags[ERROR_TAG].startswith("KeyError: ")
    publish.mark_failed_step(mlflow_server, "r-x", "FAILED", "Task exit-handler-1 failed.")
    note = client.get_run(run.run_id).data.tags["dcgrpo.pipeline_error"]
    assert "Task exit-handler-1 failed.; this run's own error: KeyError: " in note and "was not measured" in note


def test_every_component_is_a_thin_shell_over_the_driver_layer():
    import inspect

    comps = build_components("img/cpu:1", "img/gpu:1")
    for name in ("prepare_data", "warm_start", "train", "export_fp8", "evaluate", "select_best",
                 "register_model", "promote", "mark_failed"):  # fmt: skip
        source = inspect.getsource(getattr(comps, name).python_func)
        assert "from dcgrpo.stages." in source, name
        body = [ln for ln in source.split('"""')[-1].splitlines() if ln.strip() and not ln.strip().startswith("#")]
        assert len(body) <= 12, f"{name} component is not thin ({len(body)} lines)"


def test_force_promotion_lets_the_promote_task_run_on_a_failed_gate(mlflow_server, tmp_path):
    """The pipeline runs promote only when register says so: a forced run must get there even if the gate fails."""
    import json
    import uuid

    from dcgrpo.registry import TAG_DECISION

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.create_experiment(f"force-{uuid.uuid4().hex[:6]}")
    name = f"force-test-{uuid.uuid4().hex[:6]}"

    def registered(acc: float, force: bool):
        run = client.create_run(exp, tags={tracking.EVAL_METRICS_TAG: json.dumps({"eval/synthetic/avg_1": acc})})
        client.log_metric(run.info.run_id, "dc/lambda", 0.0)
        model = tmp_path / f"m-{acc}-{force}"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
        meta = {"mlflow_run_id": run.info.run_id, "discrepancy": 1e-4}
        return publish.register_step("", [], mlflow_uri=mlflow_server, model_name=name, model_meta=meta,
                                   model_dir=str(model), fp8_dir=str(model), force=force)  # fmt: skip

    first = registered(0.9, force=False)
    assert first.passes_gate
    publish.promote_step("", [], mlflow_server, name, first.version, force=False)
    worse = registered(0.5, force=False)
    assert not worse.passes_gate
    assert client.get_model_version(name, worse.version).tags[TAG_DECISION] == "rejected"
    forced = registered(0.4, force=True)
    assert forced.passes_gate and forced.reason.startswith("forced (gate said:")
    assert publish.promote_step("", [], mlflow_server, name, forced.version, force=True).startswith("promoted")
    assert client.get_model_version_by_alias(name, "champion").version == forced.version


def test_register_step_by_reference_uploads_nothing(mlflow_server):
    """On a cluster register_model gets artifact URIs: the versions point at them (s3:// for KServe), the run
    gains no artifacts, and a retried task reuses the versions (issue 12, point 8)."""
    import json
    import uuid

    from dcgrpo.registry import TAG_STORAGE_URI

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.create_experiment(f"byref-{uuid.uuid4().hex[:6]}")
    run = client.create_run(exp, tags={tracking.EVAL_METRICS_TAG: json.dumps({"eval/synthetic/avg_1": 0.5})}).info
    client.log_metric(run.run_id, "dc/lambda", 0.0)
    name = f"byref-{uuid.uuid4().hex[:6]}"
    meta = {"mlflow_run_id": run.run_id, "discrepancy": 1e-4}
    model, fp8 = "minio://mlpipeline/v2/artifacts/r/model/checkpoints/step_4", "minio://mlpipeline/v2/artifacts/r/fp8"
    first = publish.register_step("", [], mlflow_server, name, meta, model, fp8)
    mv = client.get_model_version(name, first.version)
    assert mv.source == mv.tags[TAG_STORAGE_URI] == "s3://mlpipeline/v2/artifacts/r/fp8"
    bf16 = client.search_model_versions(f"name='{name}-bf16'")[0]
    assert bf16.source == "s3://mlpipeline/v2/artifacts/r/model/checkpoints/step_4"
    assert client.list_artifacts(run.run_id) == []
    assert publish.register_step("", [], mlflow_server, name, meta, model, fp8).version == first.version


def test_register_step_takes_the_eval_results_evaluate_handed_on(mlflow_server):
    """In the pipeline the model reference carries evaluate's metrics and engine and the last round's lambda
    (issue 14: values pass between steps as KFP outputs): the method's MLflow run need not hold them."""
    import uuid

    from dcgrpo.registry import TAG_LAMBDA, TAG_METRICS

    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    run = client.create_run(client.create_experiment(f"handed-{uuid.uuid4().hex[:6]}")).info  # no eval tag at all
    name = f"handed-{uuid.uuid4().hex[:6]}"
    meta = {"mlflow_run_id": run.run_id, "discrepancy": 1e-4, "lambda": 0.25, "rollout_engine": "vllm 0.33.0",
            "eval_metrics": {"eval/synthetic/avg_1": 0.625}, "eval_engine": "vllm 0.33.0"}  # fmt: skip
    out = publish.register_step("", [], mlflow_server, name, meta, "minio://b/m", "minio://b/f")
    tags = client.get_model_version(name, out.version).tags
    assert json.loads(tags[TAG_METRICS]) == {"eval/synthetic/avg_1": 0.625} and float(tags[TAG_LAMBDA]) == 0.25
    assert tags["dcgrpo.engine.rollout_matches_serving"] == "true" and out.passes_gate  # first version: no champion
    with pytest.raises(RuntimeError, match="has no evaluation results"):  # without them: the run is asked
        publish.register_step("", [], mlflow_server, name + "-x", {"mlflow_run_id": run.run_id, "discrepancy": 1e-4},
                            "minio://b/m", "minio://b/f")  # fmt: skip
