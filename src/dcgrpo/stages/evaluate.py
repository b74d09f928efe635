"""The export and evaluate stages: the FP8 export, and avg@k per benchmark on the deploy engine."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from dcgrpo.engines import engine_version
from dcgrpo.evaluate import evaluate
from dcgrpo.model_refs import latest_model_dir, resolve_model
from dcgrpo.plots import write_report
from dcgrpo.stages.run import local_root, step_config
from dcgrpo.tracking import EVAL_ENGINE_TAG, EVAL_METRICS_TAG, LAMBDA_KEY, ROUND_DISCREPANCY, start_run


def export_fp8_step(preset: str, overrides: list[str], model_dir: str, model_meta: dict, out_dir: str) -> dict:
    """The FP8 (compressed-tensors) export of the latest checkpoint."""
    from dcgrpo.export import export_fp8  # torch: not on the light image

    cfg = step_config(preset, overrides)
    report = export_fp8(latest_model_dir(model_dir), out_dir, cfg.export)
    return {
        **{k: model_meta[k] for k in ("method", "mlflow_run_id") if k in model_meta},
        "scheme": report.scheme, "source_bytes": report.source_bytes, "export_bytes": report.export_bytes,
        "quantized_weights": report.quantized,
    }  # fmt: skip


def eval_target(cfg, model_dir: str, fp8_dir: str):
    """(what the deploy engine evaluates, the config it runs with).

    On a GPU: the FP8 export itself (vLLM's FP8 kernels). On CPU vLLM has no FP8 kernels, so the latest checkpoint
    is served with ``rollout.precision=fp8``: weights rounded by the same quantiser as the export
    (``engines/fp8.py``), which tests/test_fp8_export.py checks equals the export bit for bit.
    """
    from dcgrpo.engines.vllm_engine import has_cuda  # torch: not on the light image

    if has_cuda():
        return fp8_dir, cfg
    return latest_model_dir(model_dir), cfg.model_copy(
        update={"rollout": cfg.rollout.model_copy(update={"precision": "fp8"})}
    )


def evaluate_tracked(cfg, model: str, out_dir: str, *, run=None, track: bool = True, **kwargs):
    """(``evaluate.evaluate`` of ``model``, the MLflow run id it was logged to): to ``run`` (an open run), else to a
    run of its own (``track``), else to none."""
    if run is not None or not track:
        return evaluate(model, cfg, out_dir, run=run, **kwargs), run.run_id if run is not None else None
    with start_run(cfg.tracking, storage_root=str(local_root(cfg)), run_name="evaluate",
                   params=cfg.to_flat_dict(), tags={"dcgrpo.step": "evaluate"}) as own:  # fmt: skip
        return evaluate(model, cfg, out_dir, run=own, **kwargs), own.run_id


class Evaluated(NamedTuple):
    scalars: dict[str, float]
    gate_value: float
    reference_meta: dict[str, Any]
    """Added to the model reference's metadata: ``eval_metrics`` and ``eval_engine``."""


def evaluate_step(
    preset: str, overrides: list[str], mlflow_uri: str, dataset_dir: str, model_meta: dict[str, Any],
    model_dir: str, fp8_dir: str, report_path: str,
) -> Evaluated:  # fmt: skip
    """avg@k per benchmark on the deployed (FP8) model, logged to the method's MLflow run; the HTML report.

    Returns ``Evaluated``: scalars for the Metrics artifact, the gate metric's value, and the metadata the model
    reference carries on to registration (the metrics and the engine: no MLflow round trip). The ``synthetic``
    benchmark is the held-out split of the synthetic task, drawn as ``prepare_data`` drew it from the same config.
    """

    cfg = step_config(preset, overrides, mlflow_uri)
    target, eval_cfg = eval_target(cfg, model_dir, fp8_dir)
    with start_run(cfg.tracking, storage_root=str(local_root(cfg)), run_id=model_meta["mlflow_run_id"]) as run:
        report, _ = evaluate_tracked(eval_cfg, target, tempfile.mkdtemp(prefix="dcgrpo-eval-"), run=run,
                                     progress=False)  # fmt: skip
        metrics = report.metrics()
        run.set_tags({EVAL_METRICS_TAG: json.dumps(metrics), EVAL_ENGINE_TAG: engine_version()})
    gate = cfg.eval.gate_metric
    if gate not in metrics:
        raise KeyError(f"eval.gate_metric {gate!r} was not measured; measured: {sorted(metrics)}")
    plot = Path(resolve_model(model_dir)) / "plots" / "dc_curves.png"
    write_report(
        report_path, f"dcgrpo evaluation: {model_meta.get('method', '')}",
        report_summary(cfg, model_meta, gate, metrics[gate], engine_version()), report.table(), plot,
        note=f"{report.settings_line()}. {report.throughput_line()} Scores in percent; the gate reads {gate} as a "
        "fraction.",
    )  # fmt: skip
    scalars = {k: float(v) for k, v in metrics.items()}  # MLflow's names, in KFP too
    return Evaluated(scalars, float(metrics[gate]), {"eval_metrics": metrics, "eval_engine": engine_version()})


def report_summary(cfg, meta: dict[str, Any], gate: str, gate_value: float, eval_engine: str) -> dict[str, Any]:
    """The head table of a method's evaluation report: the names and values the demo table, MLflow and the
    registry show for the same quantities (KFP metadata turns integers into floats: they are ints again here)."""

    def num(key: str) -> Any:
        value = meta.get(key)
        return int(value) if isinstance(value, float) and value.is_integer() and key in ("round", "step") else value

    rows = {
        "method": meta.get("method", ""),
        "rounds trained": num("round"),
        "steps": num("step"),
        f"lambda after the last step ({LAMBDA_KEY})": meta.get("lambda"),
        f"mean d, last round ({ROUND_DISCREPANCY})": meta.get("discrepancy"),
        f"{gate} (gate, FP8)": gate_value,
        "promotion limit on mean d": cfg.promotion_discrepancy_limit(),
        "rollouts": f"{cfg.rollout.precision} on {meta.get('rollout_engine', '?')}",
        "evaluation": f"fp8 on {eval_engine}",
        "MLflow run": meta.get("mlflow_run_id", ""),
    }
    return {k: v for k, v in rows.items() if v is not None}
