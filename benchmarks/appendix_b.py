"""Appendix B toy: the optimal policy under a quadratic train-inference discrepancy budget.

One state, six actions (high / mid / low inference probability x negative / positive
advantage). The inference policy ``q`` is fixed; the training policy ``pi`` maximises the
expected advantage under a budget ``delta`` on the expected squared discrepancy:

    max_pi  E_{a~pi}[A(a)]   s.t.   E_{a~q}[d(a)^2] <= delta,   sum_a pi(a) = 1,  pi >= 0

with the per-token discrepancies of Eq. 5-7 (names as in ``dcgrpo.algorithm.discrepancy``),
written through a signed x(a) with d = |x|:

    prob_diff  x = pi - q             ratio  x = pi/q - 1             log_ratio  x = log(pi/q)

Lagrangian relaxation (as Eq. 8-11 do for the real problem): for a multiplier lambda > 0,
pi_lambda = argmax E_pi[A] - lambda * E_q[d^2]. With c(a) = (A(a) - mu) / (2 lambda), mu the
multiplier of sum pi = 1, the KKT stationary point is (closed forms, cf. Theorem B.1):

    prob_diff  pi = max(0, q + c/q)
    ratio      pi = max(0, q (1 + c))
    log_ratio  pi = q exp(-W_0(-c))        (Lambert W, principal branch; needs c <= 1/e)

mu is the one scalar root of sum pi = 1, and lambda is the root of E_q[d^2](pi_lambda) = delta,
so the budget is active for every model. The one-sided variant (Figure 7) penalises only the
upward discrepancy d = max(x, 0), i.e. pi > q: an action with A < mu then drops to 0 for free,
an action with A > mu takes the same closed form as above, and an action with A = mu takes
whatever mass is left (in [0, q]).

Choices where the paper's text leaves details open (the searchable copy of the paper gave
only its opening section, not Appendix B, so these follow the derivation above):

- q = (0.35, 0.35, 0.10, 0.10, 0.05, 0.05) and A = (-1, 1, -0.75, 0.75, -0.5, 0.5): E_q[A] = 0
  as for GRPO advantages; the magnitudes differ per probability level so that every optimum,
  the one-sided ones included, is unique (tied advantages make the one-sided optimum a face).
- The expectation of d^2 is under q, the policy that samples the tokens (the batch mean of
  d_t in training is over rollout tokens). One budget delta = 0.02 for all three models.
- delta < min q keeps every feasible pi inside pi <= e q, where q (log pi/q)^2 is convex, so
  the W_0 stationary point is the global optimum for log_ratio too.
- One-sided = upward only (pi above q is penalised, pi below q is free).

    .venv/bin/python benchmarks/appendix_b.py [--json] [--plot PATH] [--budget DELTA]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from harness import figure
from scipy.optimize import brentq
from scipy.special import lambertw

ACTIONS = ("high_neg", "high_pos", "mid_neg", "mid_pos", "low_neg", "low_pos")
Q = np.array([0.35, 0.35, 0.10, 0.10, 0.05, 0.05])
ADVANTAGE = np.array([-1.0, 1.0, -0.75, 0.75, -0.5, 0.5])
BUDGET = 0.02
KINDS = ("prob_diff", "ratio", "log_ratio")
VARIANTS = {"two_sided": False, "one_sided": True}
DEFAULT_PLOT = Path(__file__).resolve().parent / "results" / "appendix_b.png"
# lambertw is defined for z >= -1/e; the float nearest -1/e lies just below it.
_W_MIN = np.nextafter(-1.0 / np.e, 0.0)


def signed_discrepancy(kind: str, pi: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x(a) with d(a) = |x(a)|: Eq. 5 (prob_diff), Eq. 6 (ratio), Eq. 7 (log_ratio)."""
    if kind == "prob_diff":
        return pi - q
    if kind == "ratio":
        return pi / q - 1.0
    if kind == "log_ratio":
        return np.log(np.maximum(pi, 1e-300) / q)
    raise ValueError(f"unknown discrepancy kind {kind!r}; choose from {KINDS}")


def expected_sq_discrepancy(kind: str, pi: np.ndarray, q: np.ndarray, one_sided: bool = False) -> float:
    """The constraint E_{a~q}[d(a)^2]; one-sided (Figure 7) counts only x > 0 (pi above q)."""
    x = signed_discrepancy(kind, pi, q)
    if one_sided:
        x = np.maximum(x, 0.0)
    return float(np.sum(q * x * x))


def stationary_policy(kind: str, c: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Unclipped KKT stationary point (Theorem B.1 form) for c = (A - mu) / (2 lambda).

    prob_diff: q + c/q; ratio: q (1 + c); log_ratio: q exp(-W_0(-c)), the solution of
    log(r)/r = c on r <= e (c is clipped to the branch point 1/e).
    """
    if kind == "prob_diff":
        return q + c / q
    if kind == "ratio":
        return q * (1.0 + c)
    if kind == "log_ratio":
        return q * np.exp(-lambertw(np.maximum(-c, _W_MIN), 0).real)
    raise ValueError(f"unknown discrepancy kind {kind!r}; choose from {KINDS}")


def _policy_at(kind, q, adv, lam, mu, one_sided):
    pi = stationary_policy(kind, (adv - mu) / (2.0 * lam), q)
    if one_sided:
        pi = np.where(adv > mu, pi, 0.0)  # below q is free: A < mu drops to 0
    return np.maximum(pi, 0.0)


def solve_policy(kind: str, q: np.ndarray, adv: np.ndarray, lam: float, one_sided: bool = False) -> np.ndarray:
    """pi_lambda = argmax_pi E_pi[A] - lam E_q[d^2] on the simplex (closed form + root for mu).

    Raises ValueError for log_ratio when lam is too small for the W_0 branch (c <= 1/e).
    """
    lo = adv.min() - 1.0  # every c > 0: each action at or above q, total >= 1
    if kind == "log_ratio":
        lo = max(lo, adv.max() - 2.0 * lam / np.e)
    hi = adv.max()  # every c <= 0: total <= 1

    def excess(mu):
        return _policy_at(kind, q, adv, lam, mu, one_sided).sum() - 1.0

    if excess(lo) < 0:
        raise ValueError(f"lambda={lam:g} is below the W_0 branch of the {kind} closed form")
    mu = brentq(excess, lo, hi, xtol=1e-15)
    pi = _policy_at(kind, q, adv, lam, mu, one_sided)
    if one_sided:  # mu may sit on an advantage (a jump of sum pi): that action takes the rest
        k = int(np.argmin(np.abs(adv - mu)))
        if abs(adv[k] - mu) < 1e-9:
            pi[k] = 0.0
            pi[k] = 1.0 - pi.sum()
    return pi


def solve_budget(kind: str, q: np.ndarray, adv: np.ndarray, budget: float, one_sided: bool = False):
    """(lambda*, pi*) with E_q[d^2](pi_lambda*) = budget: the active constraint (root on log lambda)."""

    def over(log_lam):
        try:
            pi = solve_policy(kind, q, adv, float(np.exp(log_lam)), one_sided)
        except ValueError:
            return 1.0  # outside the W_0 branch: far over any budget below min q
        return expected_sq_discrepancy(kind, pi, q, one_sided) - budget

    lo, hi = np.log(1e-4), np.log(1e6)
    if over(hi) > 0 or over(lo) < 0:
        raise ValueError(f"budget {budget:g} is not active for {kind} (one_sided={one_sided})")
    lam = float(np.exp(brentq(over, lo, hi, xtol=1e-14)))
    return lam, solve_policy(kind, q, adv, lam, one_sided)


def solve_all(q: np.ndarray = Q, adv: np.ndarray = ADVANTAGE, budget: float = BUDGET) -> dict:
    """The JSON object: inputs, then lambda* and pi* per variant and discrepancy model."""
    out = {"actions": list(ACTIONS), "q": q.tolist(), "advantage": adv.tolist(), "budget": budget}
    for variant, one_sided in VARIANTS.items():
        out[variant] = {}
        for kind in KINDS:
            lam, pi = solve_budget(kind, q, adv, budget, one_sided)
            out[variant][kind] = {"lambda": lam, "policy": pi.tolist()}
    return out


def plot(res: dict, path: Path) -> None:
    """Grouped bars of q and each model's pi* per action, one panel per variant (Figures 6-7)."""
    with figure(path, 1, 2, (13, 4.2), dpi=120, sharey=True) as (_, axes):
        x, width = np.arange(len(res["actions"])), 0.2
        for ax, variant in zip(axes, VARIANTS, strict=True):
            ax.bar(x - 1.5 * width, res["q"], width, label="q (inference)", color="0.6")
            for i, kind in enumerate(KINDS):
                sol = res[variant][kind]
                ax.bar(x + (i - 0.5) * width, sol["policy"], width, label=rf"{kind} ($\lambda$={sol['lambda']:.3g})")
            ax.set_xticks(x, res["actions"])
            ax.set_title(rf"{variant.replace('_', '-')}: $E_{{a\sim q}}[d(a)^2] = {res['budget']:g}$")
            ax.legend(fontsize=8)
        axes[0].set_ylabel(r"$\pi^*(a)$")


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for variant in VARIANTS:
        title = f"Appendix B toy, {variant.replace('_', '-')}, budget E_q[d^2] = {res['budget']:g}"
        table = Table(title=escape(title))
        for col in ("action", "q", "A", *KINDS):
            table.add_column(col, justify="left" if col == "action" else "right")
        for i, name in enumerate(res["actions"]):
            pis = [f"{res[variant][k]['policy'][i]:.4f}" for k in KINDS]
            table.add_row(name, f"{res['q'][i]:.3f}", f"{res['advantage'][i]:+.2f}", *pis)
        table.add_row("lambda", "", "", *[f"{res[variant][k]['lambda']:.4g}" for k in KINDS], end_section=True)
        console.print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the solution as one JSON object (no plot)")
    ap.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG path (default {DEFAULT_PLOT})")
    ap.add_argument("--budget", type=float, default=BUDGET, help="delta, the bound on E_q[d^2]")
    args = ap.parse_args(argv)
    res = solve_all(budget=args.budget)
    if args.json:
        print(json.dumps(res))
        return
    print_table(res)
    plot(res, args.plot)
    print(f"figure: {args.plot}")


if __name__ == "__main__":
    main()
