"""``method.budget: auto`` (ours): eps measured from the first steps' discrepancy, then ordinary dual ascent."""

from __future__ import annotations

import json
import math

import pytest

from dcgrpo.algorithm.dual import LagrangeMultiplier, auto_budget
from dcgrpo.algorithm.step import make_multiplier
from dcgrpo.config import ConfigError, load_config
from dcgrpo.stages.parameters import resolve_run_parameters


def test_auto_budget_is_the_scaled_mean_of_the_calibration_steps():
    assert auto_budget([1e-4, 3e-4], 1.0) == pytest.approx(2e-4, rel=1e-12)
    assert auto_budget([1e-4, 3e-4, 5e-4], 1.5) == pytest.approx(4.5e-4, rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        auto_budget([], 1.0)
    with pytest.raises(ValueError, match="scale"):
        auto_budget([1e-4], 0.0)


def test_lambda_holds_while_the_budget_is_measured_then_ascends_against_it():
    lam = LagrangeMultiplier(2.0, 1e4, None, 100.0, calibration_steps=3, budget_scale=1.0)
    for d in (4e-4, float("nan"), 6e-4, 5e-4):  # a non-finite batch mean is skipped, not measured
        assert lam.calibrating and lam.violation(d if d == d else 0.0) == 0.0
        assert lam.update(d) == 2.0
    assert not lam.calibrating and lam.budget == pytest.approx(5e-4)
    assert lam.num_skipped == 1 and lam.num_updates == 0
    assert lam.update(7e-4) == pytest.approx(2.0 + 1e4 * 2e-4)  # Eq. 11 against the measured eps
    assert lam.update(0.0) == pytest.approx(max(0.0, 4.0 - 1e4 * 5e-4))


def test_a_resumed_multiplier_finishes_the_same_calibration():
    a = LagrangeMultiplier(0.0, 1e4, None, 10.0, calibration_steps=2, budget_scale=2.0)
    a.update(3e-4)
    state = json.loads(json.dumps(a.state_dict()))  # what a checkpoint stores
    b = LagrangeMultiplier(0.0, 1e4, 1.0, 10.0)
    b.load_state_dict(state)
    assert b.calibrating
    for m in (a, b):
        m.update(5e-4)
        m.update(1e-3)
    assert a.budget == b.budget == pytest.approx(2.0 * 4e-4) and a.value == b.value == pytest.approx(2.0)


def test_bad_auto_budget_settings_are_refused():
    with pytest.raises(ValueError, match="calibration_steps >= 1"):
        LagrangeMultiplier(0.0, 1.0, None, 1.0)
    with pytest.raises(ValueError, match="budget must be >= 0|init, lr and budget"):
        LagrangeMultiplier(0.0, 1.0, -1.0, 1.0)


def test_the_config_builds_an_auto_budget_and_keeps_a_fixed_promotion_gate():
    cfg = load_config(overrides=["method.budget=auto", "method.budget_auto_steps=3", "method.budget_auto_scale=1.5"])
    lam = make_multiplier(cfg.method, dual_ascent=True)
    assert lam.calibrating and lam.calibration_steps == 3 and lam.budget_scale == 1.5
    assert math.isfinite(cfg.promotion_discrepancy_limit())
    fixed = make_multiplier(load_config(overrides=["method.budget=2e-4"]).method, dual_ascent=False)
    assert fixed.budget == 2e-4 and fixed.lr == 0.0
    with pytest.raises(ConfigError, match="registry.max_discrepancy"):
        load_config(overrides=["method.budget=auto", "registry.max_discrepancy=null"])
    with pytest.raises(ConfigError, match=r"method.budget: Input should be a number >= 0, or 'auto'"):
        load_config(overrides=["method.budget=often"])


def test_the_weight_grid_is_a_lab_setting_the_pipeline_refuses():
    cfg = load_config(overrides=["rollout.weight_grid=nvfp4"])
    assert cfg.rollout.weight_grid == "nvfp4" and cfg.rollout.precision == "bf16"
    with pytest.raises(ConfigError, match="rollout.precision=bf16"):
        load_config(overrides=["rollout.weight_grid=int4_g32", "rollout.precision=fp8"])
    with pytest.raises(ConfigError, match="rollout.weight_grid"):
        load_config(overrides=["rollout.weight_grid=int8"])
    with pytest.raises(ConfigError, match="lab setting"):
        resolve_run_parameters("tiny-cpu", ["rollout.weight_grid=mxfp4"], 0, "")


def test_the_measured_budget_is_logged_once_known():
    from dcgrpo.algorithm.step import dual_step

    lam = make_multiplier(load_config(overrides=["method.budget=auto", "method.budget_auto_steps=2"]).method, True)
    first = dual_step(lam, "dc-grpo", 4e-4)
    assert "dc/budget" not in first and first["dc/violation"] == 0.0
    assert dual_step(lam, "dc-grpo", 6e-4)["dc/budget"] == pytest.approx(5e-4)
    fixed = make_multiplier(load_config().method, True)
    assert "dc/budget" not in dual_step(fixed, "dc-grpo", 4e-4)  # a fixed eps is a logged param already
