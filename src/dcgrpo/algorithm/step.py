"""One step's DC-GRPO arithmetic, shared by both backends: the built-in loop (``train/rl.py``) and the verl trainer
(``verl_plugin/trainer.py``) call these and nothing else between their log-prob recompute and their PPO update.

    valid tokens -> d_t (Eq. 5-7) -> GRPO advantage (Eq. 3) -> the method's shaping (Eq. 8-10, or a baseline's
    IS weights / mask) -> the ``dc/*`` metrics; after the update, one dual step on lambda (Eq. 11).

Pure torch, no engine, no verl: ``tests/test_step_kernel.py`` runs it on plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dcgrpo.algorithm.advantage import grpo_advantage
from dcgrpo.algorithm.discrepancy import masked_mean, masked_stats, token_discrepancy, valid_token_mask
from dcgrpo.algorithm.dual import LagrangeMultiplier
from dcgrpo.algorithm.methods import MethodHParams, ShapedBatch, get_method, shape_advantages

Tensor = torch.Tensor

SHAPING_KEYS = ("dc/discrepancy_mean", "dc/discrepancy_max", "dc/discrepancy_p99", "dc/discrepancy_std",
                "dc/penalty_mean", "dc/lambda")  # fmt: skip
DUAL_KEYS = ("dc/violation", "dc/lambda_next")
DC_METRIC_KEYS = SHAPING_KEYS + DUAL_KEYS
"""Every ``dc/*`` key a training step logs, on either backend."""


def method_hparams(method_cfg: Any, lam: float) -> MethodHParams:
    """The scalars the method registry reads, from the run config's ``method`` section (its defaults are the
    only ones: ``MethodHParams`` has none)."""
    return MethodHParams(
        lam=lam, margin=method_cfg.margin, tis_threshold=method_cfg.tis_threshold,
        mis_threshold=method_cfg.mis_threshold, mis_low=method_cfg.mis_low, mis_high=method_cfg.mis_high,
        icepop_low=method_cfg.icepop_low, icepop_high=method_cfg.icepop_high,
    )  # fmt: skip


@dataclass(frozen=True)
class StepShaping:
    shaped: ShapedBatch
    """Token advantages, loss mask and optional IS weights for the PPO-clip loss."""
    discrepancy_mean: Tensor
    """0-d: the batch-mean d over valid tokens, what the dual step and the gate read."""
    metrics: dict[str, Tensor | float]
    """``SHAPING_KEYS``: 0-d tensors (turned into floats once per step, by the caller) and lambda."""


def shape_step(
    rewards: Tensor,
    group_ids: Tensor | list,
    logp_train: Tensor,
    logp_infer: Tensor,
    response_mask: Tensor,
    method_cfg: Any,
    lam: float,
    norm_by_std: bool = True,
) -> StepShaping:
    """The advantage phase of one step.

    Args:
        rewards: (B,) outcome rewards. group_ids: (B,) prompt group of each response (GRPO groups).
        logp_train: (B, T) log-probs recomputed by the training engine; logp_infer: (B, T) the rollout engine's.
        response_mask: (B, T) response tokens; tokens whose log-probs are NaN/inf leave the mask.
        method_cfg: the config's ``method`` section (name, discrepancy, thresholds); lam: this step's lambda.
        norm_by_std: GRPO's std normalisation.
    """
    mask = valid_token_mask(logp_train, logp_infer, response_mask.to(logp_train.dtype))  # (B, T)
    d = token_discrepancy(logp_train, logp_infer, mask, method_cfg.discrepancy)  # (B, T), Eq. 5-7
    stats = masked_stats(d, mask)
    seq_adv = grpo_advantage(rewards.to(logp_train.device), group_ids, norm_by_std)  # (B,), Eq. 3
    method = get_method(method_cfg.name)
    shaped = shape_advantages(
        method_cfg.name, seq_adv, d, logp_train, logp_infer, mask, method_hparams(method_cfg, lam)
    )
    penalty = masked_mean(lam * d, mask) if method.penalised else d.new_zeros(())
    metrics = {f"dc/discrepancy_{k}": stats[k] for k in ("mean", "max", "p99", "std")}
    metrics |= {"dc/penalty_mean": penalty, "dc/lambda": float(lam)}  # a float: lambda is exact, not float32
    return StepShaping(shaped, stats["mean"], metrics)


def make_multiplier(method_cfg, dual_ascent: bool) -> LagrangeMultiplier:
    """lambda for a run's ``method`` section: eta only for methods with dual ascent (others keep lambda_0), and
    ``budget: auto`` measured over the first ``budget_auto_steps`` steps (see ``dual.auto_budget``)."""
    mc = method_cfg
    auto = mc.budget == "auto"
    return LagrangeMultiplier(
        mc.lambda_init, mc.dual_lr if dual_ascent else 0.0, None if auto else mc.budget, mc.lambda_max,
        calibration_steps=mc.budget_auto_steps if auto else 0, budget_scale=mc.budget_auto_scale,
    )  # fmt: skip


def dual_step(multiplier: LagrangeMultiplier, method_name: str, discrepancy_mean: float) -> dict[str, float]:
    """Eq. 11 after the update, for methods with dual ascent: ``dc/violation`` (of this step's d, against the
    budget) and ``dc/lambda_next`` (lambda for the next step; unchanged for the other methods); with
    ``budget: auto``, ``dc/budget`` (the measured eps) once it is known."""
    violation = multiplier.violation(discrepancy_mean)
    if get_method(method_name).dual_ascent:
        multiplier.update(discrepancy_mean)
    out = {"dc/violation": violation, "dc/lambda_next": multiplier.value}
    if multiplier.calibration_steps and not multiplier.calibrating:  # budget: auto, once measured
        out["dc/budget"] = multiplier.budget
    return out
