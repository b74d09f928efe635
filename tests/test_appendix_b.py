"""benchmarks/appendix_b.py: the closed-form optima of the Appendix B toy against a numerical solver.

The discrepancy used to check the script is re-implemented here (Eq. 5-7, squared, expectation
under q; one-sided = only pi above q counts), so a wrong closed form, a wrong lambda or a wrong
discrepancy in the script all show up as a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "appendix_b.py"
KINDS = ("prob_diff", "ratio", "log_ratio")


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))  # its harness import, as when run as a script
    spec = importlib.util.spec_from_file_location("appendix_b", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ab = load_script()

# The script's toy, plus an unrelated random instance (distinct advantages, delta < min q).
_rng = np.random.default_rng(7)
_q_rand = _rng.dirichlet(np.full(6, 3.0))
INSTANCES = {
    "paper_toy": (ab.Q, ab.ADVANTAGE, ab.BUDGET),
    "random": (_q_rand, _rng.normal(size=6), 0.3 * float(_q_rand.min())),
}


def sq_discrepancy(kind, pi, q, one_sided):
    """E_q[d^2] and its gradient in pi, written independently of the script."""
    pi_safe = np.maximum(pi, 1e-300)
    x, dx = {
        "prob_diff": (pi - q, np.ones_like(pi)),
        "ratio": (pi / q - 1.0, 1.0 / q),
        "log_ratio": (np.log(pi_safe / q), 1.0 / pi_safe),
    }[kind]
    if one_sided:
        x = np.maximum(x, 0.0)
    return float(np.sum(q * x**2)), 2.0 * q * x * dx


def slsqp(fun, jac, q, kind, constraints):
    """Minimise fun over the simplex, starting from q.

    ftol sits at float precision, so SLSQP may end with "Positive directional derivative for
    linesearch" (status 8: no further decrease representable); that is accepted once the point
    is feasible, since the caller compares it with the closed form anyway.
    """
    low = 1e-10 if kind == "log_ratio" else 0.0  # two-sided log_ratio is infinite at pi = 0
    res = minimize(
        fun,
        q.copy(),
        jac=jac,
        method="SLSQP",
        bounds=[(low, 1.0)] * len(q),
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0, "jac": lambda p: np.ones_like(p)}, *constraints],
        options={"ftol": 1e-16, "maxiter": 1000},
    )
    assert res.success or res.status == 8, res.message
    assert abs(res.x.sum() - 1.0) < 1e-9 and all(c["fun"](res.x) > -1e-9 for c in constraints)
    return res.x


def numeric_penalized(kind, q, adv, lam, one_sided):
    """argmax_pi E_pi[A] - lam E_q[d^2] on the simplex, by SLSQP."""

    def fun(p):
        return -adv @ p + lam * sq_discrepancy(kind, p, q, one_sided)[0]

    def jac(p):
        return -adv + lam * sq_discrepancy(kind, p, q, one_sided)[1]

    return slsqp(fun, jac, q, kind, [])


def numeric_constrained(kind, q, adv, budget, one_sided):
    """argmax_pi E_pi[A] s.t. E_q[d^2] <= budget on the simplex, by SLSQP."""
    con = {
        "type": "ineq",
        "fun": lambda p: budget - sq_discrepancy(kind, p, q, one_sided)[0],
        "jac": lambda p: -sq_discrepancy(kind, p, q, one_sided)[1],
    }
    return slsqp(lambda p: -adv @ p, lambda p: -adv, q, kind, [con])


CASES = [(inst, kind, one) for inst in INSTANCES for kind in KINDS for one in (False, True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'one' if c[2] else 'two'}_sided")
def solved(request):
    inst, kind, one_sided = request.param
    q, adv, budget = INSTANCES[inst]
    lam, pi = ab.solve_budget(kind, q, adv, budget, one_sided)
    return kind, one_sided, q, adv, budget, lam, pi


def test_policy_is_a_distribution(solved):
    *_, pi = solved
    assert pi.shape == (6,)
    assert np.all(pi >= 0.0)
    assert pi.sum() == pytest.approx(1.0, abs=1e-12)


def test_budget_is_active(solved):
    kind, one_sided, q, adv, budget, lam, pi = solved
    assert lam > 0.0
    assert sq_discrepancy(kind, pi, q, one_sided)[0] == pytest.approx(budget, rel=1e-9)
    # The constraint binds: a larger budget buys strictly more expected advantage.
    _, pi_more = ab.solve_budget(kind, q, adv, 1.2 * budget, one_sided)
    assert adv @ pi_more > adv @ pi + 1e-6
    assert adv @ pi > adv @ q  # and the budget is used to improve on q


def test_closed_form_matches_penalized_solver(solved):
    kind, one_sided, q, adv, _, lam, pi = solved
    np.testing.assert_allclose(pi, numeric_penalized(kind, q, adv, lam, one_sided), atol=1e-6)


def test_closed_form_matches_constrained_solver(solved):
    kind, one_sided, q, adv, budget, _, pi = solved
    np.testing.assert_allclose(pi, numeric_constrained(kind, q, adv, budget, one_sided), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_form_at_other_lambdas(kind):
    q, adv, _ = INSTANCES["paper_toy"]
    for lam in (2.0, 8.0, 40.0):
        for one_sided in (False, True):
            pi = ab.solve_policy(kind, q, adv, lam, one_sided)
            np.testing.assert_allclose(pi, numeric_penalized(kind, q, adv, lam, one_sided), atol=1e-6)


def test_one_sided_penalises_only_upward_moves():
    q, adv, budget = INSTANCES["paper_toy"]
    for kind in KINDS:
        _, pi = ab.solve_budget(kind, q, adv, budget, one_sided=True)
        assert pi[np.argmin(adv)] < q[np.argmin(adv)]  # the worst action is cut below q at no cost
        assert sq_discrepancy(kind, pi, q, one_sided=False)[0] > budget  # two-sided would count the cut


def test_inactive_budget_is_an_error():
    q, adv, _ = INSTANCES["paper_toy"]
    with pytest.raises(ValueError, match="not active"):
        ab.solve_budget("prob_diff", q, adv, 10.0)


def test_json_output():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    res = json.loads(out.stdout)  # exactly one JSON object on stdout
    assert set(res) == {"actions", "q", "advantage", "budget", "two_sided", "one_sided"}
    assert res["actions"] == ["high_neg", "high_pos", "mid_neg", "mid_pos", "low_neg", "low_pos"]
    q, adv = np.array(res["q"]), np.array(res["advantage"])
    assert q.shape == adv.shape == (6,) and q.sum() == pytest.approx(1.0)
    for variant, one_sided in (("two_sided", False), ("one_sided", True)):
        assert set(res[variant]) == set(KINDS)
        for kind in KINDS:
            sol = res[variant][kind]
            assert set(sol) == {"lambda", "policy"} and sol["lambda"] > 0
            pi = np.array(sol["policy"])
            assert pi.shape == (6,) and pi.sum() == pytest.approx(1.0, abs=1e-9)
            assert sq_discrepancy(kind, pi, q, one_sided)[0] == pytest.approx(res["budget"], rel=1e-8)


def test_table_and_plot(tmp_path, capsys):
    png = tmp_path / "fig.png"
    ab.main(["--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "two-sided" in out and "one-sided" in out and "log_ratio" in out
