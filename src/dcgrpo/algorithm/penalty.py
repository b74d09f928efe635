"""Variants of the DC-GRPO penalty term (ours, issue 28; none of them is the paper's method).

The paper's shaping is ``A'_t = A - lambda * d_t`` (Eq. 8-10, ``advantage.dc_penalized_advantage``). Each
function here returns the (B, T) quantity that takes d_t's place, so a variant's advantage is
``A - lambda * penalty``; padding is 0 throughout.

- ``group_baseline_penalty``: d_t minus the leave-one-out mean of d over the other responses of the same prompt
  at the same position (a baseline for the penalty, as GRPO's group mean is for the reward).
- ``sequence_penalty``: the penalty once per sequence, its mean d on every token of the response.
"""

from __future__ import annotations

import torch

from dcgrpo.algorithm.advantage import _group_index

Tensor = torch.Tensor


def group_baseline_penalty(d: Tensor, mask: Tensor, group_ids: Tensor | list) -> Tensor:
    """Ours: the penalty with a per-group, per-position baseline,

        d~_{i,t} = d_{i,t} - (sum_{j in g(i), j != i} m_{j,t} d_{j,t}) / (sum_{j in g(i), j != i} m_{j,t})

    over the responses j of the same prompt g(i) that have a token at position t; where no other response of the
    group reaches t the baseline is 0 (d~ = d). A baseline that does not depend on the sampled token leaves the
    penalty's expected gradient unchanged and removes the part of its spread the state explains.

    Args:
        d: (B, T) token discrepancy. mask: (B, T) response mask. group_ids: (B,) prompt id per response.

    Returns:
        (B, T) baselined penalty, 0 on padding (it can be negative).
    """
    m = mask.to(d.dtype)
    idx = _group_index(group_ids, d.device)  # (B,)
    groups = int(idx.max()) + 1 if idx.numel() else 0
    dm = d * m
    total = torch.zeros(groups, d.shape[1], dtype=d.dtype, device=d.device).index_add_(0, idx, dm)  # (G, T)
    count = torch.zeros_like(total).index_add_(0, idx, m)
    others_total, others_count = total[idx] - dm, count[idx] - m  # (B, T) leave one out
    baseline = torch.where(others_count > 0, others_total / others_count.clamp(min=1.0), torch.zeros_like(d))
    return (d - baseline) * m


def sequence_penalty(d: Tensor, mask: Tensor) -> Tensor:
    """Ours: the penalty once per sequence, ``dbar_i = sum_t m_{i,t} d_{i,t} / sum_t m_{i,t}`` on every token of
    response i (the sequence-level granularity Section 4 argues against, kept as a control).

    Shapes: d, mask (B, T) -> (B, T), 0 on padding and for an empty response.
    """
    m = mask.to(d.dtype)
    seq = (d * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return seq * m
