"""The Lagrange multiplier of the discrepancy constraint (DC-GRPO, Eq. 11).

The constrained problem max_theta J(theta) s.t. E[d] <= eps is solved by
alternating a policy step on the penalised advantage (Eq. 8-10) with one
projected dual-ascent step on lambda per training step:

    lambda_{k+1} = clip(lambda_k + eta * (mean_batch(d) - eps), 0, lambda_max)

Inside the budget (mean d < eps) lambda decays to 0 and the method is GRPO.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class LagrangeMultiplier:
    """Projected dual ascent on lambda (Eq. 11).

    Args:
        init: lambda_0 (>= 0).
        lr: dual step size eta (>= 0; 0 keeps lambda fixed, i.e. Dual-GRPO).
        budget: tolerance eps on the batch-mean discrepancy (>= 0).
        max_value: projection upper bound lambda_max (>= init).
    """

    def __init__(self, init: float, lr: float, budget: float, max_value: float) -> None:
        if init < 0 or lr < 0 or budget < 0:
            raise ValueError(f"init, lr and budget must be >= 0 (got {init}, {lr}, {budget})")
        if max_value < init:
            raise ValueError(f"max_value ({max_value}) must be >= init ({init})")
        self.value = float(init)
        self.lr = float(lr)
        self.budget = float(budget)
        self.max_value = float(max_value)
        self.num_updates = 0
        self.num_skipped = 0

    def violation(self, mean_discrepancy: float) -> float:
        """Constraint violation mean(d) - eps (positive = over budget)."""
        return float(mean_discrepancy) - self.budget

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore lambda and its counters. Hyperparameters come from the state too,
        so a resumed run continues exactly where it stopped."""
        missing = {"value", "lr", "budget", "max_value"} - set(state)
        if missing:
            raise KeyError(f"LagrangeMultiplier state is missing {sorted(missing)}")
        self.value = float(state["value"])
        self.lr = float(state["lr"])
        self.budget = float(state["budget"])
        self.max_value = float(state["max_value"])
        self.num_updates = int(state.get("num_updates", 0))
        self.num_skipped = int(state.get("num_skipped", 0))

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={self.value:.6g}, lr={self.lr}, "
            f"budget={self.budget}, max_value={self.max_value})"
        )
