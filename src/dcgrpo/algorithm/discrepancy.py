"""Train-inference discrepancy: per-token metrics and masked statistics.

The paper (DC-GRPO, arXiv 2606.08779, Sec. 3.1, Eq. 5-7) measures, for every
generated token, how differently the training engine and the inference engine
score the *same* token under the *same* weights. Both engines are black boxes:
only the log-probability each assigns to the sampled token is used.

NaN / inf policy (decided here, once, for the whole project): a log-prob that
is NaN or +inf is meaningless and is treated as a padded token (mask 0); a
-inf log-prob means "probability 0", which is a legitimate value for the
``prob_diff`` metric (p = 0) but makes ``ratio`` / ``log_ratio`` infinite, so
those tokens are clamped to ``MAX_TOKEN_DISCREPANCY``. A single broken token
therefore never turns a batch mean into NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor

# Upper bound for one token's discrepancy. prob_diff is already <= 1; the
# ratio metrics are unbounded, and an engine returning -inf for one token
# must not dominate a batch mean by itself.
MAX_TOKEN_DISCREPANCY = 10.0
# exp(LOGP_FLOOR) ~ 1e-30: a -inf log-prob still gives a finite ratio.
LOGP_FLOOR = -69.0

DiscrepancyFn = Callable[[Tensor, Tensor], Tensor]
DISCREPANCY_FNS: dict[str, DiscrepancyFn] = {}


def register_discrepancy(name: str) -> Callable[[DiscrepancyFn], DiscrepancyFn]:
    """Register a token-discrepancy metric under ``name`` (raises on duplicates)."""

    def decorator(fn: DiscrepancyFn) -> DiscrepancyFn:
        if name in DISCREPANCY_FNS:
            raise ValueError(f"discrepancy kind {name!r} is already registered")
        DISCREPANCY_FNS[name] = fn
        return fn

    return decorator


@register_discrepancy("prob_diff")
def _prob_diff(logp_train: Tensor, logp_infer: Tensor) -> Tensor:
    """Eq. 5: d_t = |p_train - p_infer| (bounded in [0, 1]; the paper's default)."""
    return (logp_train.exp() - logp_infer.exp()).abs()


@register_discrepancy("ratio")
def _ratio(logp_train: Tensor, logp_infer: Tensor) -> Tensor:
    """Eq. 6: d_t = |p_train / p_infer - 1| (the importance ratio's distance from 1)."""
    return ((logp_train - logp_infer).exp() - 1.0).abs()


@register_discrepancy("log_ratio")
def _log_ratio(logp_train: Tensor, logp_infer: Tensor) -> Tensor:
    """Eq. 7: d_t = |log p_train - log p_infer|."""
    return (logp_train - logp_infer).abs()


def valid_token_mask(logp_train: Tensor, logp_infer: Tensor, mask: Tensor) -> Tensor:
    """Response mask with NaN/+inf log-prob tokens removed (see module docstring).

    Shapes: all (B, T). Returns a float mask (B, T).
    """
    bad = torch.isnan(logp_train) | torch.isnan(logp_infer)
    bad |= (logp_train == float("inf")) | (logp_infer == float("inf"))
    return mask.to(logp_train.dtype) * (~bad).to(logp_train.dtype)


def token_discrepancy(
    logp_train: Tensor,
    logp_infer: Tensor,
    mask: Tensor,
    kind: str = "prob_diff",
) -> Tensor:
    """Per-token train-inference discrepancy d_t (Eq. 5-7).

    Args:
        logp_train: (B, T) log-prob of each sampled token under the training engine.
        logp_infer: (B, T) log-prob of the same token under the inference engine.
        mask: (B, T) 1 for response tokens, 0 for padding.
        kind: ``prob_diff`` |p_t - p_i|, ``ratio`` |p_t/p_i - 1|, ``log_ratio``
            |log p_t - log p_i|.

    Returns:
        (B, T) non-negative discrepancy, 0 where ``mask`` is 0 or a log-prob is
        NaN/+inf, at most ``MAX_TOKEN_DISCREPANCY``.
    """
    if kind not in DISCREPANCY_FNS:
        raise ValueError(f"unknown discrepancy kind {kind!r}; choose from {sorted(DISCREPANCY_FNS)}")
    if logp_train.shape != logp_infer.shape or logp_train.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: logp_train {tuple(logp_train.shape)}, "
            f"logp_infer {tuple(logp_infer.shape)}, mask {tuple(mask.shape)}"
        )
    valid = valid_token_mask(logp_train, logp_infer, mask)  # (B, T)
    # Sanitise before the metric so masked garbage never produces NaN gradients.
    lt = torch.where(valid > 0, logp_train, torch.zeros_like(logp_train)).clamp(min=LOGP_FLOOR)
    li = torch.where(valid > 0, logp_infer, torch.zeros_like(logp_infer)).clamp(min=LOGP_FLOOR)
    d = DISCREPANCY_FNS[kind](lt, li)  # (B, T)
    d = torch.nan_to_num(d, nan=0.0, posinf=MAX_TOKEN_DISCREPANCY).clamp(max=MAX_TOKEN_DISCREPANCY)
    return d * valid


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 if the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def masked_stats(values: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Summary statistics of ``values`` over masked-in positions.

    Args:
        values: (B, T) per-token values (e.g. the output of ``token_discrepancy``).
        mask: (B, T) 1 for positions to include.

    Returns:
        dict of 0-d tensors: ``mean``, ``max``, ``p99`` (linear interpolation,
        as ``torch.quantile``), ``std`` (population std, as verl's
        ``rollout_probs_diff_std``). All 0 for an empty mask.
    """
    selected = values[mask.bool()]  # (N,)
    if selected.numel() == 0:
        zero = values.new_zeros(())
        return {"mean": zero, "max": zero, "p99": zero, "std": zero}
    selected = selected.double()  # quantile wants float; double keeps the p99 exact
    return {
        "mean": selected.mean().to(values.dtype),
        "max": selected.max().to(values.dtype),
        "p99": torch.quantile(selected, 0.99).to(values.dtype),
        "std": selected.std(unbiased=False).to(values.dtype),
    }
