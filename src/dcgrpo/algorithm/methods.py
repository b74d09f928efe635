"""The method registry: how each method turns a GRPO advantage into what the
PPO-clip loss consumes (token advantages, loss mask, optional IS weights).

Every method of the config runs through the same training loop, which
dispatches only through ``METHODS``; there is no if/elif on method names
anywhere else. Whether lambda moves is part of the method's entry:

    grpo       A'_t = A                      lambda unused
    dual-grpo  A'_t = A - lambda d_t          lambda fixed at lambda_init
    dc-grpo    A'_t = A - lambda_k d_t        lambda by dual ascent (Eq. 11)
    tis        A'_t = A, w_t = TIS weight     (verl decoupled_token_is)
    mis        A'_t = A, sequence weight + rejection mask (decoupled_seq_is_rs)
    icepop     A'_t = A, IcePop token weight  (decoupled_token_icepop)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a method runs: the config checks names against this registry without it
    from torch import Tensor


@dataclass(frozen=True)
class MethodHParams:
    """Scalars a method may read. No defaults here: ``dcgrpo.algorithm.step.method_hparams`` builds them from
    the config's ``method`` section, where the defaults live."""

    lam: float
    margin: float
    tis_threshold: float
    mis_threshold: float
    mis_low: float
    mis_high: float
    icepop_low: float
    icepop_high: float


@dataclass(frozen=True)
class ShapedBatch:
    advantages: Tensor  # (B, T) token advantages for the surrogate
    mask: Tensor  # (B, T) loss mask (MIS may drop sequences)
    is_weights: Tensor | None  # (B, T) detached rollout-correction weights, or None


ShapeFn = Callable[["Tensor", "Tensor", "Tensor", "Tensor", "Tensor", MethodHParams], ShapedBatch]


@dataclass(frozen=True)
class Method:
    name: str
    shape: ShapeFn
    penalised: bool  # applies the lambda * d penalty
    dual_ascent: bool  # lambda is updated by Eq. 11 every step


METHODS: dict[str, Method] = {}


def register_method(name: str, *, penalised: bool = False, dual_ascent: bool = False):
    """Register a method's shaping function (raises on duplicates)."""

    def decorator(fn: ShapeFn) -> ShapeFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = Method(name, fn, penalised, dual_ascent)
        return fn

    return decorator


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    return seq_adv.unsqueeze(-1) * mask.to(seq_adv.dtype)  # (B, T)


@register_method("grpo")
def _grpo(seq_adv, d, logp_train, logp_infer, mask, hp: MethodHParams) -> ShapedBatch:
    return ShapedBatch(_broadcast(seq_adv, mask), mask, None)


def _penalised(seq_adv, d, logp_train, logp_infer, mask, hp: MethodHParams) -> ShapedBatch:
    from dcgrpo.algorithm.advantage import dc_penalized_advantage  # torch: not on the light image

    adv = dc_penalized_advantage(seq_adv, d, mask, hp.lam, hp.margin)  # Eq. 8-10
    return ShapedBatch(adv, mask, None)


register_method("dual-grpo", penalised=True)(_penalised)
register_method("dc-grpo", penalised=True, dual_ascent=True)(_penalised)


@register_method("tis")
def _tis(seq_adv, d, logp_train, logp_infer, mask, hp: MethodHParams) -> ShapedBatch:
    from dcgrpo.algorithm.advantage import tis_weights  # torch: not on the light image

    w = tis_weights(logp_train, logp_infer, mask, hp.tis_threshold)
    return ShapedBatch(_broadcast(seq_adv, mask), mask, w)


@register_method("mis")
def _mis(seq_adv, d, logp_train, logp_infer, mask, hp: MethodHParams) -> ShapedBatch:
    from dcgrpo.algorithm.advantage import mis_weights_and_mask  # torch: not on the light image

    w, kept = mis_weights_and_mask(logp_train, logp_infer, mask, hp.mis_threshold, hp.mis_low, hp.mis_high)
    return ShapedBatch(_broadcast(seq_adv, kept), kept, w)


@register_method("icepop")
def _icepop(seq_adv, d, logp_train, logp_infer, mask, hp: MethodHParams) -> ShapedBatch:
    from dcgrpo.algorithm.advantage import icepop_weights  # torch: not on the light image

    w = icepop_weights(logp_train, logp_infer, mask, hp.icepop_low, hp.icepop_high)
    return ShapedBatch(_broadcast(seq_adv, mask), mask, w)


def shape_advantages(
    method: str,
    seq_adv: Tensor,
    d: Tensor,
    logp_train: Tensor,
    logp_infer: Tensor,
    mask: Tensor,
    hp: MethodHParams,
) -> ShapedBatch:
    """Dispatch to the registered method. Shapes: seq_adv (B,), the rest (B, T)."""
    return get_method(method).shape(seq_adv, d, logp_train, logp_infer, mask, hp)
