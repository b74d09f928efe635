"""The project's math-verify reward as a verl custom reward function.

verl's reward loop calls ``compute_score(data_source=, solution_str=,
ground_truth=, extra_info=, **reward_kwargs)`` once per response (in a thread
pool). ``config.render_overrides`` points verl here with
``reward.custom_reward_function.path=pkg://dcgrpo.verl_plugin.reward`` and
passes the ``reward`` section of the run config as ``reward_kwargs``, so verl
runs score exactly as the single-machine loop scores them (same extraction,
same fast path, same sandboxed verifier pool with its hard timeout), whatever
the ``data_source`` (verl's own default would route ``math_dapo`` to its
DAPO scorer and refuse our ``synthetic/*`` sources).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from dcgrpo.config import RewardConfig
from dcgrpo.reward import score


@lru_cache(maxsize=8)
def _reward_config(items: tuple[tuple[str, Any], ...]) -> RewardConfig:
    return RewardConfig(**dict(items))


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> float:
    """1.0 if ``solution_str``'s final answer equals ``ground_truth`` (math-verify), else 0.0.

    ``kwargs`` that name a ``RewardConfig`` field (timeout_s, max_answer_chars,
    ...) configure the scorer; verl's own extras (reward router address,
    reward-model tokenizer) are ignored.
    """
    known = tuple(sorted((k, v) for k, v in kwargs.items() if k in RewardConfig.model_fields))
    return score(solution_str, str(ground_truth), _reward_config(known))
