"""Penalty variants of ours (issue 28): shapes, masking, hand-computed cases."""

import torch

from dcgrpo.algorithm.penalty import group_baseline_penalty, sequence_penalty


def test_group_baseline_hand_computed():
    # Two prompts, two responses each, two positions; response 1 has no token at position 1.
    d = torch.tensor([[0.1, 0.4], [0.3, 9.0], [0.2, 0.2], [0.6, 0.8]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    out = group_baseline_penalty(d, mask, ["a", "a", "b", "b"])
    expected = torch.tensor([
        [0.1 - 0.3, 0.4],  # position 1: the other response of "a" is padding there, so no baseline
        [0.3 - 0.1, 0.0],  # padding stays 0 (its d of 9 never enters a baseline)
        [0.2 - 0.6, 0.2 - 0.8],
        [0.6 - 0.2, 0.8 - 0.2],
    ])  # fmt: skip
    torch.testing.assert_close(out, expected)


def test_group_baseline_leave_one_out_over_three_and_shapes():
    d = torch.tensor([[1.0], [2.0], [6.0]])
    out = group_baseline_penalty(d, torch.ones(3, 1), torch.tensor([7, 7, 7]))
    torch.testing.assert_close(out, torch.tensor([[1.0 - 4.0], [2.0 - 3.5], [6.0 - 1.5]]))
    big = group_baseline_penalty(torch.rand(6, 5), torch.ones(6, 5), [0, 0, 1, 1, 2, 2])
    assert big.shape == (6, 5)


def test_group_baseline_equal_d_in_a_group_gives_zero():
    d = torch.full((4, 3), 0.25)
    out = group_baseline_penalty(d, torch.ones(4, 3), [0, 0, 1, 1])
    assert torch.count_nonzero(out) == 0


def test_sequence_penalty_hand_computed_and_masking():
    d = torch.tensor([[0.1, 0.3, 5.0], [0.0, 0.0, 0.0], [0.2, 0.4, 0.6]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    out = sequence_penalty(d, mask)
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.2, 0.0], [0.0, 0.0, 0.0], [0.4, 0.4, 0.4]]))
