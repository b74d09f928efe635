"""The mechanism lab's pure parts (benchmarks/mechanism.py): token statistics and the ``lowp`` variant (ours)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from dcgrpo.algorithm.discrepancy import token_discrepancy
from dcgrpo.algorithm.methods import MethodHParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mechanism  # noqa: E402


def _hp(lam: float, margin: float = 0.0) -> MethodHParams:
    return MethodHParams(lam=lam, margin=margin, tis_threshold=2.0, mis_threshold=2.0, mis_low=0.5, mis_high=2.0,
                         icepop_low=0.5, icepop_high=5.0)  # fmt: skip


def test_token_stats_put_the_penalty_where_d_is():
    # Four tokens, one per probability bin; the p=0.6 token has by far the largest gap and the trainer rates it
    # above the deploy engine.
    p = torch.tensor([[0.05, 0.3, 0.6, 0.95]])
    q = torch.tensor([[0.05, 0.29, 0.5, 0.95]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the p=0.95 token is padding
    d = token_discrepancy(p.log(), q.log(), mask, "prob_diff")
    s = mechanism.token_stats(p.log(), q.log(), d, mask, lam=10.0, margin=0.0)
    assert s["tokens"] == 3
    assert s["share_.5-.9"] == pytest.approx(0.1 / 0.11, rel=1e-5) and s["share_.1-.5"] == pytest.approx(
        0.01 / 0.11, rel=1e-5
    )
    assert s["share_p<.1"] == pytest.approx(0.0, abs=1e-9) and s["share_>.9"] == 0.0
    assert s["share_p_above_q"] == pytest.approx(1.0)
    assert s["mean_pos_all"] == pytest.approx(1.0) and s["mean_pos_weighted"] == pytest.approx(
        (0.01 + 0.2) / 0.11, rel=1e-5
    )
    assert math.isnan(s["d_by_p_>.9"]) and s["d_by_p_.5-.9"] == pytest.approx(0.1, rel=1e-5)


def test_token_stats_margin_leaves_tokens_within_it_out_of_the_penalty():
    p = torch.tensor([[0.3, 0.6]])
    q = torch.tensor([[0.29, 0.5]])
    mask = torch.ones(1, 2)
    d = token_discrepancy(p.log(), q.log(), mask, "prob_diff")
    s = mechanism.token_stats(p.log(), q.log(), d, mask, lam=10.0, margin=0.02)
    assert s["share_.5-.9"] == pytest.approx(1.0) and s["share_.1-.5"] == pytest.approx(0.0, abs=1e-9)


def test_gap_follows_p_times_one_minus_p_under_a_fixed_logit_error():
    """The premise of ``lowp``: with one logit error on the sampled token, d = |p - p'| peaks at p = 1/2."""
    logits = torch.linspace(-6, 6, 200)
    p = torch.sigmoid(logits)  # a two-token vocabulary: p of the sampled token
    q = torch.sigmoid(logits + 0.01)  # the deploy engine's logit is off by 0.01
    d = token_discrepancy(p.log()[None], q.log()[None], torch.ones(1, 200), "prob_diff")
    s = mechanism.token_stats(p.log()[None], q.log()[None], d, torch.ones(1, 200), lam=0.0, margin=0.0)
    assert s["corr_d_pq"] > 0.999
    assert float(p[d[0].argmax()]) == pytest.approx(0.5, abs=0.02)


def test_lowp_penalises_only_tokens_the_trainer_gives_less_than_one_half():
    seq_adv = torch.tensor([1.0, -1.0])
    p = torch.tensor([[0.2, 0.7], [0.4, 0.9]])
    d = torch.full((2, 2), 0.01)
    mask = torch.ones(2, 2)
    out = mechanism.lowp_shaping(seq_adv, d, p.log(), p.log(), mask, _hp(lam=10.0))
    assert torch.allclose(out.advantages, torch.tensor([[0.9, 1.0], [-1.1, -1.0]]))
    assert out.is_weights is None and torch.equal(out.mask, mask)


def test_quick_settings_are_a_subset_of_the_full_lab():
    full = {mechanism.run_key(s) for s in mechanism.settings(quick=False)}
    assert {mechanism.run_key(s) for s in mechanism.settings(quick=True)} <= full
    assert len(full) == len(mechanism.settings(quick=False))  # every setting has its own cache key
