"""The publish stages: select the best method, register it, promote it through the gate; the exit handler.

These run on the light image and move references (URIs and metadata), never weights.
"""

from __future__ import annotations

import json
import logging
from typing import Any, NamedTuple

from dcgrpo.model_refs import is_remote, latest_model_dir, weights_uri
from dcgrpo.stages.registration import best_method_index, promote_version, register_and_gate
from dcgrpo.stages.run import mlflow_client, step_config
from dcgrpo.tracking import EVAL_ENGINE_TAG, EVAL_METRICS_TAG, KFP_RUN_TAG, LAMBDA_KEY

log = logging.getLogger(__name__)


class Best(NamedTuple):
    method: str
    gate_value: float
    reference: dict


def select_best_step(
    preset: str, overrides: list[str], methods: list[str], gate_values: list[float], references: list[dict]
) -> Best:
    """The best method (``registration.best_method_index``: within the promotion discrepancy limit) and its
    ``model_refs.model_reference`` (nothing is copied: the weights stay where evaluate read them)."""

    if not methods or len(methods) != len(gate_values) or len(references) != len(methods):
        raise ValueError(f"{len(methods)} methods, {len(gate_values)} gate values, {len(references)} models")
    cfg = step_config(preset, overrides)
    budget = cfg.promotion_discrepancy_limit()
    d = [float(r["metadata"].get("discrepancy", float("inf"))) for r in references]  # none recorded: never within
    i = best_method_index(cfg, [float(g) for g in gate_values], d)
    log.info("best method: %s (gate %s; discrepancy %s; budget %.3g)", methods[i],
             dict(zip(methods, gate_values, strict=True)), dict(zip(methods, d, strict=True)), budget)  # fmt: skip
    return Best(methods[i], float(gate_values[i]), references[i])


def run_summary(client, run_id: str, meta: dict[str, Any]) -> tuple[dict[str, float], float, str | None]:
    """(eval metrics, final lambda, evaluation engine): from the model reference's metadata when evaluate and the
    training handed them on (the pipeline), else from the method's MLflow run (a reference from elsewhere)."""
    if meta.get("eval_metrics") and meta.get("lambda") is not None:
        return dict(meta["eval_metrics"]), float(meta["lambda"]), meta.get("eval_engine")
    run = client.get_run(run_id)
    metrics = json.loads(run.data.tags.get(EVAL_METRICS_TAG, "{}"))
    if not metrics:
        raise RuntimeError(f"MLflow run {run_id} has no evaluation results ({EVAL_METRICS_TAG}); evaluate first")
    last = run.data.metrics  # lambda after the last step (dc/lambda is the one the last step used)
    return metrics, last.get(LAMBDA_KEY, last.get("dc/lambda", float("nan"))), run.data.tags.get(EVAL_ENGINE_TAG)


def register_step(
    preset: str, overrides: list[str], mlflow_uri: str, model_name: str, model_meta: dict, model_dir: str,
    fp8_dir: str, force: bool = False,
):  # fmt: skip
    """Register the FP8 export (and the bf16 checkpoint) and evaluate the promotion gate; returns
    ``registry.Registered`` (``registration.register_and_gate``, as ``dcgrpo register``).

    ``model_dir``/``fp8_dir`` are local paths (kfp.local, tests: uploaded as MLflow run artifacts, served through
    MLflow's artifact proxy) or artifact URIs (a cluster: registered by reference, nothing downloaded or uploaded).
    ``passes_gate`` decides whether the pipeline's promote task runs at all, so ``force`` (the run's
    ``force_promotion``) lets it run on a failed gate too; promote then records the decision as forced.
    """

    cfg = step_config(preset, overrides, mlflow_uri)
    mlc = mlflow_client(cfg)
    run_id = model_meta["mlflow_run_id"]
    metrics, lam, eval_engine = run_summary(mlc, run_id, model_meta)
    by_ref = is_remote(model_dir)  # a cluster's artifact store: register where it is; a local path: upload
    bf16 = weights_uri(model_dir) if by_ref else latest_model_dir(model_dir)
    fp8 = weights_uri(fp8_dir) if by_ref else fp8_dir
    return register_and_gate(
        mlc, cfg, model_name, run_id, fp8, metrics=metrics, final_lambda=lam,
        discrepancy=float(model_meta["discrepancy"]), bf16_twin=bf16, by_reference=by_ref,
        rollout_engine=model_meta.get("rollout_engine"), eval_engine=eval_engine, force=force,
    )  # fmt: skip


def promote_step(preset: str, overrides: list[str], mlflow_uri: str, model_name: str, version: str, force: bool) -> str:
    """Promote ``version`` (the one register_step returned) through the registry's gate.

    Bound to that version even if another run has registered a newer challenger meanwhile; the registry's
    promotion lock orders concurrent runs (as ``dcgrpo promote``).
    """

    cfg = step_config(preset, overrides, mlflow_uri)
    # registry.serve_on_promote: the InferenceService is applied before the alias moves.
    decision = promote_version(mlflow_client(cfg), cfg, model_name, version, force=force,
                               serve=cfg.registry.serve_on_promote)  # fmt: skip
    return f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"


def mark_failed_step(mlflow_uri: str, kfp_run_id: str, state: str, error: str = "") -> int:
    """Exit handler: when the pipeline did not succeed, mark its unfinished MLflow runs FAILED.

    Returns the number of runs marked. A succeeded pipeline changes nothing.
    """
    if state.upper() in ("SUCCEEDED", "SKIPPED"):
        return 0
    mlc = mlflow_client(step_config("", [], mlflow_uri))
    experiments = [e.experiment_id for e in mlc.search_experiments()]
    runs = mlc.search_runs(experiments, filter_string=f"tags.{KFP_RUN_TAG} = '{kfp_run_id}'") if experiments else []
    for run in runs:
        # KFP says only which group failed ("Task exit-handler-1 failed."); the failing step's own exception is
        # the tag dcgrpo.error of the run it was writing to, when it was writing to one.
        own = run.data.tags.get("dcgrpo.error")
        note = f"; this run's own error: {own}" if own else "; the failed step's log in KFP says why"
        mlc.set_tag(run.info.run_id, "dcgrpo.pipeline_error",
                    f"pipeline run {kfp_run_id} ended {state}: {error or state}{note}"[:5000])  # fmt: skip
        mlc.set_terminated(run.info.run_id, "FAILED")
    log.warning("pipeline %s ended %s: marked %d MLflow run(s) FAILED", kfp_run_id, state, len(runs))
    return len(runs)
