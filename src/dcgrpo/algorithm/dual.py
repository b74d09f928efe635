"""The Lagrange multiplier of the discrepancy constraint (DC-GRPO, Eq. 11).

The constrained problem max_theta J(theta) s.t. E[d] <= eps is solved by
alternating a policy step on the penalised advantage (Eq. 8-10) with one
projected dual-ascent step on lambda per training step:

    lambda_{k+1} = clip(lambda_k + eta * (mean_batch(d) - eps), 0, lambda_max)

Inside the budget (mean d < eps) lambda decays to 0 and the method is GRPO.

``budget="auto"`` (ours, not the paper's): eps is not swept but measured. The
first ``calibration_steps`` batch means of d (the warm start's discrepancy
floor, before RL has moved the policy far) set eps = scale * their mean
(``auto_budget``); lambda stays at lambda_0 while they are gathered. The
constraint then says "do not let the mismatch grow past where it started".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


def auto_budget(discrepancy_means: Sequence[float], scale: float) -> float:
    """The automatic budget (ours): eps = scale * mean of the calibration steps' batch-mean discrepancies."""
    if not discrepancy_means:
        raise ValueError("auto_budget needs at least one batch-mean discrepancy")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return float(scale) * math.fsum(discrepancy_means) / len(discrepancy_means)


class LagrangeMultiplier:
    """Projected dual ascent on lambda (Eq. 11).

    Args:
        init: lambda_0 (>= 0).
        lr: dual step size eta (>= 0; 0 keeps lambda fixed, i.e. Dual-GRPO).
        budget: tolerance eps on the batch-mean discrepancy (>= 0), or None to measure it (``auto_budget``).
        max_value: projection upper bound lambda_max (>= init).
        calibration_steps: with ``budget=None``, how many batch means set eps (>= 1).
        budget_scale: with ``budget=None``, eps = budget_scale * their mean.
    """

    def __init__(
        self,
        init: float,
        lr: float,
        budget: float | None,
        max_value: float,
        *,
        calibration_steps: int = 0,
        budget_scale: float = 1.0,
    ) -> None:
        if init < 0 or lr < 0 or (budget is not None and budget < 0):
            raise ValueError(f"init, lr and budget must be >= 0 (got {init}, {lr}, {budget})")
        if max_value < init:
            raise ValueError(f"max_value ({max_value}) must be >= init ({init})")
        if budget is None and (calibration_steps < 1 or budget_scale <= 0):
            raise ValueError(
                f"an automatic budget needs calibration_steps >= 1 and budget_scale > 0 "
                f"(got {calibration_steps}, {budget_scale})"
            )
        self.value = float(init)
        self.lr = float(lr)
        self.budget = None if budget is None else float(budget)
        self.max_value = float(max_value)
        self.calibration_steps = int(calibration_steps)
        self.budget_scale = float(budget_scale)
        self.calibration: list[float] = []
        self.num_updates = 0
        self.num_skipped = 0

    @property
    def calibrating(self) -> bool:
        """True while an automatic budget is still being measured (lambda is held at lambda_0)."""
        return self.budget is None

    def violation(self, mean_discrepancy: float) -> float:
        """Constraint violation mean(d) - eps (positive = over budget); 0 while the budget is being measured."""
        return 0.0 if self.budget is None else float(mean_discrepancy) - self.budget

    def update(self, mean_discrepancy: float | torch.Tensor) -> float:
        """One projected dual-ascent step (Eq. 11); returns the new lambda.

        A non-finite batch mean (which ``token_discrepancy`` never produces, so
        it means a broken batch) leaves lambda unchanged and is counted in
        ``num_skipped`` rather than poisoning every later step.
        """
        d = float(mean_discrepancy)  # host sync when given a tensor
        if not math.isfinite(d):
            self.num_skipped += 1
            return self.value
        if self.budget is None:  # calibrating: this batch measures the floor, lambda does not move
            self.calibration.append(d)
            if len(self.calibration) >= self.calibration_steps:
                self.budget = auto_budget(self.calibration, self.budget_scale)
            return self.value
        self.value = min(max(self.value + self.lr * self.violation(d), 0.0), self.max_value)
        self.num_updates += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "lr": self.lr,
            "budget": self.budget,
            "max_value": self.max_value,
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "calibration_steps": self.calibration_steps,
            "budget_scale": self.budget_scale,
            "calibration": list(self.calibration),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda and its counters. Hyperparameters come from the state too,
        so a resumed run continues exactly where it stopped."""
        missing = {"value", "lr", "budget", "max_value"} - set(state)
        if missing:
            raise KeyError(f"LagrangeMultiplier state is missing {sorted(missing)}")
        self.value = float(state["value"])
        self.lr = float(state["lr"])
        self.budget = None if state["budget"] is None else float(state["budget"])
        self.max_value = float(state["max_value"])
        self.calibration_steps = int(state.get("calibration_steps", 0))
        self.budget_scale = float(state.get("budget_scale", 1.0))
        self.calibration = [float(d) for d in state.get("calibration", [])]
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={self.value:.6g}, lr={self.lr}, "
            f"budget={self.budget}, max_value={self.max_value})"
        )
