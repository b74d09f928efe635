"""Hand-computed checks of every function in dcgrpo.algorithm."""

import math

import pytest
import torch

from dcgrpo.algorithm import advantage, discrepancy, dual, loss, methods

LN = math.log


def logp(*probs):
    return torch.tensor([[LN(p) for p in row] for row in probs], dtype=torch.float64)


# ---------------------------------------------------------------- discrepancy


def test_token_discrepancy_kinds_by_hand():
    lt = logp([0.5, 0.2, 0.9])
    li = logp([0.4, 0.25, 0.9])
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    d = discrepancy.token_discrepancy(lt, li, mask, "prob_diff")
    torch.testing.assert_close(d, torch.tensor([[0.1, 0.05, 0.0]], dtype=torch.float64))
    d = discrepancy.token_discrepancy(lt, li, mask, "ratio")
    torch.testing.assert_close(d, torch.tensor([[0.25, 0.2, 0.0]], dtype=torch.float64))
    d = discrepancy.token_discrepancy(lt, li, mask, "log_ratio")
    torch.testing.assert_close(d, torch.tensor([[LN(1.25), LN(1.25), 0.0]], dtype=torch.float64))


def test_token_discrepancy_default_kind_is_prob_diff_and_masked_tokens_are_zero():
    lt = logp([0.3, 0.6])
    li = logp([0.1, 0.1])
    mask = torch.tensor([[0, 1]])
    d = discrepancy.token_discrepancy(lt, li, mask)
    assert d[0, 0] == 0.0
    assert d[0, 1].item() == pytest.approx(0.5)


def test_token_discrepancy_unknown_kind_and_shape_mismatch():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown discrepancy kind 'kl'"):
        discrepancy.token_discrepancy(x, x, x, "kl")
    with pytest.raises(ValueError, match="shape mismatch"):
        discrepancy.token_discrepancy(x, torch.zeros(2, 4), x)


def test_nan_and_inf_logprobs_do_not_poison_the_batch():
    inf = float("inf")
    lt = torch.tensor([[LN(0.5), float("nan"), -inf, LN(0.5)]])
    li = torch.tensor([[LN(0.4), LN(0.5), LN(0.5), inf]])
    mask = torch.ones(1, 4)
    for kind in ("prob_diff", "ratio", "log_ratio"):
        d = discrepancy.token_discrepancy(lt, li, mask, kind)
        assert torch.isfinite(d).all(), kind
        assert d[0, 1] == 0 and d[0, 3] == 0, "NaN / +inf tokens are treated as padding"
        assert d.max() <= discrepancy.MAX_TOKEN_DISCREPANCY
    # -inf means p = 0: a legitimate prob_diff of |0 - 0.5|.
    d = discrepancy.token_discrepancy(lt, li, mask, "prob_diff")
    assert d[0, 2].item() == pytest.approx(0.5)
    assert d[0, 0].item() == pytest.approx(0.1)
    # ratio with p_train = 0: |0/0.5 - 1| = 1; log_ratio is clamped to the cap.
    assert discrepancy.token_discrepancy(lt, li, mask, "ratio")[0, 2].item() == pytest.approx(1.0)
    assert discrepancy.token_discrepancy(lt, li, mask, "log_ratio")[0, 2] == discrepancy.MAX_TOKEN_DISCREPANCY


def test_gradients_through_masked_garbage_are_finite():
    lt = torch.tensor([[LN(0.5), float("nan")]], requires_grad=True)
    li = torch.tensor([[LN(0.4), LN(0.3)]])
    d = discrepancy.token_discrepancy(lt, li, torch.ones(1, 2))
    d.sum().backward()
    assert torch.isfinite(lt.grad).all()


def test_masked_stats_by_hand():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    stats = discrepancy.masked_stats(values, mask)
    assert stats["mean"].item() == pytest.approx(2.5)
    assert stats["max"].item() == pytest.approx(4.0)
    # p99 of [1,2,3,4] with linear interpolation: 3 + 0.97 * 1
    assert stats["p99"].item() == pytest.approx(3.97)
    assert stats["std"].item() == pytest.approx(math.sqrt(1.25))
    empty = discrepancy.masked_stats(values, torch.zeros_like(mask))
    assert all(v.item() == 0.0 for v in empty.values())


# ---------------------------------------------------------------- advantage


def test_grpo_advantage_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    adv = advantage.grpo_advantage(rewards, groups, eps=0.0)
    # group a: mean 1/3, unbiased std sqrt(1/3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    expected = [(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected))
    no_std = advantage.grpo_advantage(rewards, groups, norm_by_std=False)
    torch.testing.assert_close(no_std, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))


def test_grpo_equal_rewards_give_exactly_zero_and_tensor_ids_work():
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.3, 0.3])
    adv = advantage.grpo_advantage(rewards, torch.tensor([5, 5, 5, 9, 9]))
    assert torch.equal(adv, torch.zeros(5))


def test_grpo_interleaved_groups_and_singletons():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0])
    adv = advantage.grpo_advantage(rewards, [0, 1, 0, 2], eps=0.0)
    # group 0 = {1, 3}: mean 2, std sqrt(2); singleton groups: mean 0, std 1 (verl's rule)
    torch.testing.assert_close(adv, torch.tensor([-1 / math.sqrt(2), 2.0, 1 / math.sqrt(2), 5.0]))


def test_grpo_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        advantage.grpo_advantage(torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="3 group ids for 2 rewards"):
        advantage.grpo_advantage(torch.zeros(2), [0, 0, 1])


def test_dc_penalized_advantage_by_hand():
    adv = torch.tensor([1.0, -0.5])
    d = torch.tensor([[0.1, 0.3, 0.0], [0.2, 0.05, 0.9]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = advantage.dc_penalized_advantage(adv, d, mask, lam=2.0, margin=0.0)
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.4, 1.0], [-0.9, -0.6, 0.0]]))
    hinge = advantage.dc_penalized_advantage(adv, d, mask, lam=2.0, margin=0.1)
    torch.testing.assert_close(hinge, torch.tensor([[1.0, 0.6, 1.0], [-0.7, -0.5, 0.0]]))
    # lambda 0 is plain GRPO broadcast over tokens
    zero = advantage.dc_penalized_advantage(adv, d, mask, lam=0.0, margin=0.0)
    torch.testing.assert_close(zero, torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]]))


def test_tis_icepop_mis_by_hand():
    lt = logp([0.5, 0.9, 0.1], [0.5, 0.5, 0.5])
    li = logp([0.5, 0.3, 0.5], [0.25, 0.5, 0.5])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    # token ratios: [1, 3, 0.2], [2, 1, (pad)]
    tis = advantage.tis_weights(lt, li, mask, threshold=2.0)
    torch.testing.assert_close(tis, torch.tensor([[1.0, 2.0, 0.2], [2.0, 1.0, 0.0]], dtype=torch.float64))
    ice = advantage.icepop_weights(lt, li, mask, low=0.5, high=2.5)
    torch.testing.assert_close(ice, torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64))
    w, kept = advantage.mis_weights_and_mask(lt, li, mask, threshold=2.0, low=0.45, high=2.0)
    # sequence ratios: 1 * 3 * 0.2 = 0.6 (seq_k1 = log 1/0.6: kept), 2 * 1 = 2 (seq_k1 = log 0.5 >= log 0.45: kept)
    torch.testing.assert_close(w, torch.tensor([[0.6, 0.6, 0.6], [2.0, 2.0, 0.0]], dtype=torch.float64))
    assert kept.tolist() == [[1, 1, 1], [1, 1, 0]]
    _, kept = advantage.mis_weights_and_mask(lt, li, mask, threshold=2.0, low=0.7, high=2.0)
    assert kept.tolist() == [[1, 1, 1], [0, 0, 0]], "ratio 2 => seq_k1 = log 0.5 < log 0.7: rejected"


# ---------------------------------------------------------------- dual


def test_lagrange_multiplier_projected_dual_ascent():
    lam = dual.LagrangeMultiplier(init=0.5, lr=10.0, budget=0.01, max_value=1.0)
    assert lam.update(0.03) == pytest.approx(0.7)  # 0.5 + 10 * 0.02
    assert lam.update(0.5) == 1.0  # projected to max_value
    assert lam.update(0.0) == pytest.approx(0.9)
    assert lam.update(torch.tensor(-1.0)) == 0.0  # projected to 0, tensor input accepted
    assert lam.violation(0.03) == pytest.approx(0.02)


def test_lagrange_multiplier_skips_non_finite_and_round_trips():
    lam = dual.LagrangeMultiplier(init=0.2, lr=1.0, budget=0.0, max_value=5.0)
    lam.update(float("nan"))
    lam.update(float("inf"))
    assert lam.value == 0.2 and lam.num_skipped == 2
    lam.update(0.3)
    other = dual.LagrangeMultiplier(init=0.0, lr=0.0, budget=0.0, max_value=0.0)
    other.load_state_dict(lam.state_dict())
    assert other.state_dict() == lam.state_dict()
    assert other.update(0.1) == lam.update(0.1)
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"value": 1.0})


def test_lagrange_multiplier_rejects_invalid():
    with pytest.raises(ValueError, match="max_value"):
        dual.LagrangeMultiplier(init=2.0, lr=1.0, budget=0.0, max_value=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        dual.LagrangeMultiplier(init=0.0, lr=1.0, budget=-1.0, max_value=1.0)


def test_dual_ascent_keeps_mean_discrepancy_near_budget():
    """A toy closed loop: d responds to lambda as d = d0 / (1 + lambda); the
    multiplier must settle where d = budget (lambda* = d0/eps - 1 = 4)."""
    lam = dual.LagrangeMultiplier(init=0.0, lr=20.0, budget=0.01, max_value=100.0)
    for _ in range(2000):
        lam.update(0.05 / (1.0 + lam.value))
    assert lam.value == pytest.approx(4.0, rel=1e-3)


# ---------------------------------------------------------------- loss


def test_ppo_clip_loss_by_hand():
    logp_old = torch.zeros(1, 4)
    # ratios: 1.5 (A>0: clipped at 1.28), 0.5 (A>0: unclipped 0.5), 5.0 (A<0: dual clip at 3), 0.7 (A<0: clipped 0.8)
    logp_new = torch.tensor([[LN(1.5), LN(0.5), LN(5.0), LN(0.7)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4)
    out, metrics = loss.ppo_clip_loss(logp_new, logp_old, adv, mask, clip_low=0.2, clip_high=0.28)
    expected = (-1.28 - 0.5 + 3.0 + 0.8) / 4
    assert out.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clipfrac"].item() == pytest.approx(0.5)  # tokens 0 and 3
    assert metrics["clipfrac_lower"].item() == pytest.approx(0.25)  # token 2
    assert metrics["approx_kl"].item() == pytest.approx(-(LN(1.5) + LN(0.5) + LN(5.0) + LN(0.7)) / 4)
    out.backward()
    # only token 1 (unclipped) carries gradient: d/dlogp (-A r) / 4 = -0.5 / 4
    torch.testing.assert_close(logp_new.grad, torch.tensor([[0.0, -0.125, 0.0, 0.0]]))


def test_ppo_clip_loss_weights_mask_and_aggregation():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    tok, _ = loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2)
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 4) / 4)
    seq, _ = loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2, agg="seq-mean-token-mean")
    assert seq.item() == pytest.approx(-(2.0 + 4.0) / 2)
    seqsum, _ = loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2, agg="seq-mean-token-sum")
    assert seqsum.item() == pytest.approx(-(6.0 + 4.0) / 2)
    w = torch.tensor([[0.5, 0.0, 1.0], [2.0, 1.0, 1.0]])
    weighted, _ = loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2, is_weights=w)
    assert weighted.item() == pytest.approx(-(0.5 + 0 + 3 + 8) / 4)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2, agg="sum")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        loss.ppo_clip_loss(logp, logp, adv, mask, 0.2, 0.2, clip_ratio_c=1.0)


def test_entropy_from_logits():
    uniform = torch.zeros(2, 4)
    torch.testing.assert_close(loss.entropy_from_logits(uniform), torch.full((2,), LN(4)))


# ---------------------------------------------------------------- methods


def _batch():
    torch.manual_seed(0)
    lt = torch.log_softmax(torch.randn(4, 5, 7), -1)[..., 0]
    li = lt + 0.3 * torch.randn(4, 5)
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    d = discrepancy.token_discrepancy(lt, li, mask)
    seq_adv = advantage.grpo_advantage(torch.tensor([1.0, 0.0, 1.0, 0.0]), [0, 0, 1, 1])
    return seq_adv, d, lt, li, mask


def test_method_registry_has_all_config_methods_and_rejects_duplicates():
    assert set(methods.METHODS) == {"grpo", "dual-grpo", "dc-grpo", "tis", "mis", "icepop"}
    assert methods.get_method("dc-grpo").dual_ascent and methods.get_method("dc-grpo").penalised
    assert methods.get_method("dual-grpo").penalised and not methods.get_method("dual-grpo").dual_ascent
    assert not methods.get_method("grpo").penalised
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("grpo")(lambda *a: None)
    with pytest.raises(ValueError, match="unknown method 'ppo'"):
        methods.get_method("ppo")


def test_methods_shape_as_their_building_blocks():
    seq_adv, d, lt, li, mask = _batch()
    from dcgrpo.algorithm.step import method_hparams
    from dcgrpo.config import MethodConfig

    hp = method_hparams(MethodConfig(margin=0.01), lam=3.0)  # the config's thresholds: 2.0, (0.5, 5.0), (2.0, 0.5, 2.0)
    grpo = methods.shape_advantages("grpo", seq_adv, d, lt, li, mask, hp)
    torch.testing.assert_close(grpo.advantages, seq_adv[:, None] * mask)
    assert grpo.is_weights is None
    dc = methods.shape_advantages("dc-grpo", seq_adv, d, lt, li, mask, hp)
    torch.testing.assert_close(dc.advantages, advantage.dc_penalized_advantage(seq_adv, d, mask, 3.0, 0.01))
    assert (dc.advantages <= grpo.advantages + 1e-7).all(), "the penalty only lowers advantages"
    tis = methods.shape_advantages("tis", seq_adv, d, lt, li, mask, hp)
    torch.testing.assert_close(tis.is_weights, advantage.tis_weights(lt, li, mask, 2.0))
    ice = methods.shape_advantages("icepop", seq_adv, d, lt, li, mask, hp)
    torch.testing.assert_close(ice.is_weights, advantage.icepop_weights(lt, li, mask, 0.5, 5.0))
    mis = methods.shape_advantages("mis", seq_adv, d, lt, li, mask, hp)
    w, kept = advantage.mis_weights_and_mask(lt, li, mask, 2.0, 0.5, 2.0)
    torch.testing.assert_close(mis.is_weights, w)
    torch.testing.assert_close(mis.mask, kept)
