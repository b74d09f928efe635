"""Advantages: GRPO outcome advantage, the DC-GRPO penalty, and the peer
baselines' importance weights / masks (token TIS, sequence MIS, IcePop).

The baselines follow verl's rollout correction (``rollout_corr_helper.py``)
so numbers are comparable with runs on verl: log_ratio = logp_train -
logp_infer, clamped to +-20 before exponentiating; weights are zero on
padding; TIS truncates (clamps) the weight at C; IcePop zeroes token
weights outside [low, high]; MIS is verl's ``decoupled_seq_is_rs``
(sequence-level weight truncated at C, and sequences rejected by the
``seq_sum_k1`` statistic leaving [log low, log high]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Tensor = torch.Tensor

# verl's SAFETY_BOUND: exp(20) ~ 4.9e8 is the largest ratio ever formed.
LOG_RATIO_BOUND = 20.0


def _group_index(group_ids: Tensor | Sequence, device: torch.device) -> Tensor:
    """Map arbitrary group ids (ints, strings, uuids) to 0..G-1, in first-seen order."""
    if isinstance(group_ids, Tensor):
        _, inverse = torch.unique(group_ids, return_inverse=True)
        return inverse.to(device)
    seen: dict = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], device=device, dtype=torch.long)


def grpo_advantage(
    rewards: Tensor,
    group_ids: Tensor | Sequence,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage (Shao et al. 2024; DC-GRPO Eq. 3).

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), with mean and std over the
    responses of the same prompt (group). std is the unbiased sample std, as
    in verl's ``compute_grpo_outcome_advantage``; a group of one response gets
    mean 0 and std 1 there, and here too (config validation forbids group
    size 1, so this only matters for hand-built batches). A group whose
    rewards are all equal gets advantage 0: it carries no learning signal.

    Args:
        rewards: (B,) scalar outcome reward per response.
        group_ids: (B,) group (prompt) id per response: a tensor or a sequence
            of hashables.
        norm_by_std: divide by the group std (False = Dr. GRPO).
        eps: added to the std.

    Returns:
        (B,) per-sequence advantage.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if len(group_ids) != rewards.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {rewards.shape[0]} rewards")
    idx = _group_index(group_ids, rewards.device)  # (B,)
    num_groups = int(idx.max()) + 1 if idx.numel() else 0
    r = rewards.to(torch.float64)  # float64 so the mean of equal rewards is exactly that reward
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, idx, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, idx, r)
    mean = total / count  # (G,)
    sq_dev = torch.zeros_like(count).index_add_(0, idx, (r - mean[idx]) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()  # (G,) unbiased
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = r - mean[idx]
    if norm_by_std:
        denom = std[idx] + eps
        # An all-equal group has adv exactly 0; keep it 0 even with eps=0 (verl would give NaN).
        adv = torch.where(denom > 0, adv / denom.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(adv))
    return adv.to(rewards.dtype)


def dc_penalized_advantage(
    adv: Tensor,
    discrepancy: Tensor,
    mask: Tensor,
    lam: float | Tensor,
    margin: float,
) -> Tensor:
    """DC-GRPO penalised token advantage (Eq. 8-10).

    A'_t = A - lam * max(d_t - margin, 0)

    margin 0 is the paper's final method (the penalty is linear in d); a
    positive margin is the token-hinge variant of Section 5 that leaves tokens
    within the margin untouched.

    Args:
        adv: (B,) per-sequence or (B, T) per-token advantage.
        discrepancy: (B, T) token discrepancy d_t (``token_discrepancy``).
        mask: (B, T) response mask.
        lam: the Lagrange multiplier (>= 0).
        margin: token hinge (>= 0).

    Returns:
        (B, T) penalised advantage, 0 on padding.
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)  # (B, 1) broadcasts over tokens
    excess = (discrepancy - margin).clamp(min=0.0)  # (B, T)
    return (adv - lam * excess) * mask.to(discrepancy.dtype)


def token_log_ratio(logp_train: Tensor, logp_infer: Tensor, mask: Tensor) -> Tensor:
    """log(p_train / p_infer) per token, 0 on padding. (B, T)."""
    return (logp_train - logp_infer) * mask.to(logp_train.dtype)


def tis_weights(logp_train: Tensor, logp_infer: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Token-level truncated importance sampling (TIS) weights.

    w_t = min(p_train / p_infer, C), 0 on padding; as verl's
    ``rollout_is=token, rollout_is_threshold=C``.

    Shapes: (B, T) in, (B, T) out (detached).
    """
    log_ratio = token_log_ratio(logp_train, logp_infer, mask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    w = log_ratio.exp() * mask
    return w.clamp(max=threshold).detach()


def icepop_weights(logp_train: Tensor, logp_infer: Tensor, mask: Tensor, low: float, high: float) -> Tensor:
    """IcePop token weights: the ratio where it lies in [low, high], else 0.

    As verl's ``rollout_is=token, rollout_is_threshold="low_high"``
    (preset ``decoupled_token_icepop``: 0.5 and 5.0). The response mask is
    unchanged; out-of-range tokens simply get zero weight in the loss.

    Shapes: (B, T) in, (B, T) out (detached).
    """
    log_ratio = token_log_ratio(logp_train, logp_infer, mask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    w = log_ratio.exp() * mask
    keep = (w >= low) & (w <= high)
    return torch.where(keep, w, torch.zeros_like(w)).detach()


def mis_weights_and_mask(
    logp_train: Tensor,
    logp_infer: Tensor,
    mask: Tensor,
    threshold: float,
    low: float,
    high: float,
) -> tuple[Tensor, Tensor]:
    """Sequence-level masked importance sampling (MIS).

    As verl's preset ``decoupled_seq_is_rs``: the sequence weight
    prod_t p_train/p_infer (log-sum clamped to +-20) truncated at C, and a
    rejection mask that drops whole sequences whose ``seq_sum_k1`` statistic
    sum_t log(p_infer / p_train) leaves [log low, log high].

    Returns:
        weights (B, T) (the sequence weight on every response token, detached),
        mask (B, T) the response mask with rejected sequences zeroed.
    """
    fmask = mask.to(logp_train.dtype)
    seq_log_ratio = token_log_ratio(logp_train, logp_infer, fmask).sum(-1, keepdim=True)  # (B, 1)
    w = seq_log_ratio.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp().expand_as(fmask) * fmask
    w = w.clamp(max=threshold).detach()
    seq_k1 = (-token_log_ratio(logp_train, logp_infer, fmask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)).sum(-1)  # (B,)
    keep = (seq_k1 >= math.log(low)) & (seq_k1 <= math.log(high))  # (B,)
    return w, fmask * keep.unsqueeze(-1).to(fmask.dtype)
