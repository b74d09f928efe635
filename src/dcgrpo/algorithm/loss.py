"""PPO-clip surrogate on the (penalised) advantage, and token aggregation.

DC-GRPO (Eq. 12) optimises the ordinary clipped surrogate with A'_t in place
of the GRPO advantage. The implementation matches verl's ``vanilla`` policy
loss (asymmetric clip ranges, dual-clip for negative advantages, log-ratio
clamped to +-20, optional rollout-correction weights multiplied into the
per-token loss) so the same config gives the same loss on either backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcgrpo.algorithm.discrepancy import masked_mean

Tensor = torch.Tensor

AggFn = Callable[[Tensor, Tensor], Tensor]
LOSS_AGG_FNS: dict[str, AggFn] = {}


def register_loss_agg(name: str) -> Callable[[AggFn], AggFn]:
    """Register a token-aggregation mode under ``name`` (raises on duplicates)."""

    def decorator(fn: AggFn) -> AggFn:
        if name in LOSS_AGG_FNS:
            raise ValueError(f"loss aggregation {name!r} is already registered")
        LOSS_AGG_FNS[name] = fn
        return fn

    return decorator


@register_loss_agg("token-mean")
def _token_mean(loss_mat: Tensor, mask: Tensor) -> Tensor:
    """Mean over every response token of the batch (DAPO's choice)."""
    return masked_mean(loss_mat, mask)


@register_loss_agg("seq-mean-token-sum")
def _seq_mean_token_sum(loss_mat: Tensor, mask: Tensor) -> Tensor:
    seq_loss = (loss_mat * mask).sum(-1)  # (B,)
    seq_valid = (mask.sum(-1) > 0).to(loss_mat.dtype)
    return (seq_loss * seq_valid).sum() / seq_valid.sum().clamp(min=1.0)


@register_loss_agg("seq-mean-token-mean")
def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor) -> Tensor:
    """Mean over tokens of each sequence, then over sequences (original GRPO)."""
    tokens = mask.sum(-1)  # (B,)
    seq_loss = (loss_mat * mask).sum(-1) / (tokens + 1e-8)
    seq_valid = (tokens > 0).to(loss_mat.dtype)
    return (seq_loss * seq_valid).sum() / seq_valid.sum().clamp(min=1.0)


def agg_loss(loss_mat: Tensor, mask: Tensor, agg: str = "token-mean") -> Tensor:
    """Aggregate a (B, T) per-token loss into a scalar with mode ``agg``."""
    if agg not in LOSS_AGG_FNS:
        raise ValueError(f"unknown loss aggregation {agg!r}; choose from {sorted(LOSS_AGG_FNS)}")
    return LOSS_AGG_FNS[agg](loss_mat, mask.to(loss_mat.dtype))


def ppo_clip_loss(
    logp_new: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    is_weights: Tensor | None = None,
    agg: str = "token-mean",
    clip_ratio_c: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO surrogate (Schulman et al. 2017; DC-GRPO Eq. 12) with dual clip.

    r_t = exp(logp_new - logp_old)
    L_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    for A_t < 0 additionally L_t = min(L_t, -A_t * clip_ratio_c)  (dual clip)
    L_t *= w_t when rollout-correction weights are given.

    Args:
        logp_new: (B, T) log-probs under the policy being optimised (grad flows).
        logp_old: (B, T) log-probs under the policy that was rolled out, as
            recomputed by the training engine (detached).
        adv: (B, T) token advantage (already penalised for DC-GRPO).
        mask: (B, T) response mask.
        clip_low, clip_high: clip range (DAPO's clip-higher uses high > low).
        is_weights: optional (B, T) detached rollout-correction weights.
        agg: token aggregation mode (see ``LOSS_AGG_FNS``).
        clip_ratio_c: dual-clip bound (> 1).

    Returns:
        loss (0-d tensor, differentiable) and metrics (0-d detached tensors):
        ``clipfrac``, ``clipfrac_lower`` (dual clip), ``approx_kl`` (mean of
        logp_old - logp_new), ``ratio_mean``.
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
    mask = mask.to(logp_new.dtype)
    log_ratio = (logp_new - logp_old).clamp(-20.0, 20.0)  # (B, T)
    ratio = log_ratio.exp()
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    loss_dual = torch.minimum(loss_ppo, -adv * clip_ratio_c)
    loss_mat = torch.where(adv < 0, loss_dual, loss_ppo)
    if is_weights is not None:
        loss_mat = loss_mat * is_weights
    loss = agg_loss(loss_mat, mask, agg)

    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).to(mask.dtype), mask),
            "clipfrac_lower": masked_mean(((loss_ppo > -adv * clip_ratio_c) & (adv < 0)).to(mask.dtype), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy of the categorical given by ``logits`` (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
