"""The one step kernel (``dcgrpo.algorithm.step``) on plain tensors, no engine: what both backends call between
their log-prob recompute and their update."""

from __future__ import annotations

import pytest
import torch

from dcgrpo.algorithm import advantage, discrepancy, methods
from dcgrpo.algorithm.dual import LagrangeMultiplier
from dcgrpo.algorithm.step import DC_METRIC_KEYS, SHAPING_KEYS, dual_step, method_hparams, shape_step
from dcgrpo.config import ConfigError, load_config


def _batch(seed: int = 0, B: int = 8, T: int = 6):
    g = torch.Generator().manual_seed(seed)
    logp_train = -torch.rand(B, T, generator=g) * 3  # (B, T)
    logp_infer = logp_train + 0.2 * torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    rewards = (torch.rand(B, generator=g) > 0.5).float()
    return rewards, torch.arange(B // 4).repeat_interleave(4), logp_train, logp_infer, mask


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_the_kernel_is_its_building_blocks_in_order(name):
    rewards, groups, lt, li, mask = _batch()
    mc = load_config(overrides=[f"method.name={name}", "method.margin=0.01"]).method
    out = shape_step(rewards, groups, lt, li, mask, mc, lam=2.5)
    d = discrepancy.token_discrepancy(lt, li, mask, mc.discrepancy)
    want = methods.shape_advantages(name, advantage.grpo_advantage(rewards, groups), d, lt, li, mask,
                                    method_hparams(mc, 2.5))  # fmt: skip
    torch.testing.assert_close(out.shaped.advantages, want.advantages, rtol=0, atol=0)
    assert set(out.metrics) == set(SHAPING_KEYS)
    torch.testing.assert_close(out.discrepancy_mean, discrepancy.masked_mean(d, mask))
    penalised = methods.get_method(name).penalised
    assert (float(out.metrics["dc/penalty_mean"]) > 0) == penalised and float(out.metrics["dc/lambda"]) == 2.5


def test_nan_and_inf_log_probs_leave_the_mask_on_both_backends():
    rewards, groups, lt, li, mask = _batch(1)
    mask[0, 0] = 1.0
    li[0, 0] = float("nan")
    out = shape_step(rewards, groups, lt, li, mask, load_config().method, lam=1.0)
    assert out.shaped.mask[0, 0] == 0 and torch.isfinite(out.shaped.advantages).all()
    assert torch.isfinite(out.discrepancy_mean)


def test_dual_step_moves_lambda_only_for_dual_ascent_and_completes_the_key_set():
    for name, moves in (("dc-grpo", True), ("dual-grpo", False), ("grpo", False)):
        lam = LagrangeMultiplier(0.5, 10.0, 0.01, 100.0)
        dual = dual_step(lam, name, 0.05)
        assert dual["dc/violation"] == pytest.approx(0.04)
        assert dual["dc/lambda_next"] == (pytest.approx(0.9) if moves else 0.5), name
        assert set(dual) | set(SHAPING_KEYS) == set(DC_METRIC_KEYS)


def test_a_registered_method_is_valid_in_the_config_and_runs_in_the_kernel():
    def doubled(seq_adv, d, logp_train, logp_infer, mask, hp):
        return methods.ShapedBatch(2 * seq_adv[:, None] * mask, mask, None)

    with pytest.raises(ConfigError, match="unknown method 'test-doubled'"):
        load_config(overrides=["method.name=test-doubled"])
    methods.register_method("test-doubled")(doubled)
    try:
        mc = load_config(overrides=["method.name=test-doubled"]).method
        rewards, groups, lt, li, mask = _batch(2)
        out = shape_step(rewards, groups, lt, li, mask, mc, lam=0.0)
        grpo = shape_step(rewards, groups, lt, li, mask, load_config(overrides=["method.name=grpo"]).method, 0.0)
        torch.testing.assert_close(out.shaped.advantages, 2 * grpo.shaped.advantages)
    finally:
        methods.METHODS.pop("test-doubled")


def test_method_defaults_live_in_the_config_only():
    import dataclasses

    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(methods.MethodHParams))
    hp = method_hparams(load_config().method, 0.0)
    assert (hp.tis_threshold, hp.icepop_low, hp.icepop_high) == (2.0, 0.5, 5.0)  # config.MethodConfig's
