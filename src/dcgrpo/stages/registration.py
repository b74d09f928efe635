"""The register, select and promote stages: the run config unpacked once, then one call into ``dcgrpo.registry``.

The pipeline's steps (``stages.publish``) and the ``dcgrpo`` CLI (``register``, ``promote``, ``promote
--rollback-to``) come here: ``best_method_index`` (which method's model to register), ``register_and_gate``,
``promote_version`` and ``rollback_version``. The registry takes plain values and knows nothing of serving;
serve-on-promote is this layer passing ``dcgrpo.serving.server`` as the registry's ``serve`` hook, which
applies the InferenceService before the alias moves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dcgrpo import registry, serving
from dcgrpo.config import RunConfig
from dcgrpo.registry import Decision, Registered


def best_method_index(cfg: RunConfig, gate_values: Sequence[float], discrepancies: Sequence[float]) -> int:
    """``registry.rank_methods`` within the run's promotion discrepancy limit (a model the gate would refuse is
    not worth registering)."""
    return registry.rank_methods(gate_values, discrepancies, cfg.promotion_discrepancy_limit())


def register_and_gate(
    mlflow_client,
    cfg: RunConfig,
    model_name: str,
    run_id: str,
    model_dir: str,
    *,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    quantization: str = "fp8",
    bf16_twin: str | None = None,
    by_reference: bool = False,
    rollout_engine: str | None = None,
    eval_engine: str | None = None,
    force: bool = False,
) -> Registered:
    """Register ``model_dir`` (alias ``registry.challenger_alias``) and gate it against its model's champion.

    The pipeline's ``register_model`` step and ``dcgrpo register`` both come here. ``quantization`` "bf16"
    registers under ``model_name + registry.bf16_suffix``; ``bf16_twin``: the unquantised checkpoint of an FP8
    export, registered there first. The tags (metrics, lambda, discrepancy, config hash, engines) are the same
    for both versions. ``by_reference``: the directories are object-store URIs registered as they are
    (``registry.register_model``). A refused gate is recorded on the version unless ``force``
    (``registry.register_candidate``).
    """
    reg = cfg.registry
    return registry.register_candidate(
        mlflow_client, model_name, run_id, model_dir,
        gate_metric=cfg.eval.gate_metric, max_discrepancy=cfg.promotion_discrepancy_limit(),
        quantization=quantization, bf16_twin=bf16_twin, bf16_suffix=reg.bf16_suffix,
        champion_alias=reg.champion_alias, force=force,
        metrics=metrics, final_lambda=final_lambda, discrepancy=discrepancy, config_hash=cfg.config_hash(),
        alias=reg.challenger_alias, endpoint_url=cfg.storage.s3_endpoint_url, by_reference=by_reference,
        engines=registry.engine_tags(rollout_engine, eval_engine, reg.vllm_image),
    )  # fmt: skip


def _promotion_settings(cfg: RunConfig, model_name: str, serve: bool) -> dict[str, Any]:
    """The lock settings and, with ``serve``, the hook that applies the version's InferenceService
    (``serving.server``: Kubernetes credentials are loaded here, before the registry is touched)."""
    reg = cfg.registry
    return dict(lock_wait_s=reg.promotion_lock_wait_s, lock_stale_s=reg.promotion_lock_stale_s,
                serve=serving.server(reg, model_name) if serve else None)  # fmt: skip


def promote_version(
    mlflow_client, cfg: RunConfig, model_name: str, version: str | int, *, force: bool = False, serve: bool = False
) -> Decision:
    """``registry.promote`` with the run config's gate metric, discrepancy limit, champion alias and lock settings.

    ``serve`` (``registry.serve_on_promote``, ``dcgrpo promote --serve``): the version's InferenceService is
    applied before the alias moves (the registry's ``serve`` hook). The pipeline's ``promote`` step and
    ``dcgrpo promote`` both come here.
    """
    return registry.promote(mlflow_client, model_name, version, cfg.eval.gate_metric,
                            cfg.promotion_discrepancy_limit(), force, cfg.registry.champion_alias,
                            **_promotion_settings(cfg, model_name, serve))  # fmt: skip


def rollback_version(
    mlflow_client, cfg: RunConfig, model_name: str, version: str | int, *, serve: bool = False
) -> Decision:
    """``registry.rollback`` with the run config's champion alias and lock settings (``serve`` as in
    ``promote_version``)."""
    return registry.rollback(mlflow_client, model_name, version, cfg.registry.champion_alias,
                             **_promotion_settings(cfg, model_name, serve))  # fmt: skip
