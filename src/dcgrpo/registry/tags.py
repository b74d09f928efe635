"""The tags a model version carries: what the gate compares and what an operator reads (one place for the keys)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dcgrpo.config import one_spelling
from dcgrpo.registry.connection import RegistryError

TAG_RUN_ID = "run_id"
TAG_METRICS = "eval_metrics"  # JSON {metric: value}: metric keys may hold characters tag keys cannot ("@")
TAG_LAMBDA = "dc/lambda_final"
TAG_DISCREPANCY = "dc/discrepancy_final"
TAG_CONFIG_HASH = "config_hash"
TAG_QUANTIZATION = "quantization"
TAG_STORAGE_URI = "storage_uri"
TAG_SOURCE_DIR = "source_dir"  # the registered directory (absolute path or s3:// URI): the idempotency key
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_COMPARED_TO = "promotion.compared_to"
TAG_DECIDED_AT = "promotion.decided_at"
TAG_ENGINE_PREFIX = "dcgrpo.engine."


def _tag_key(metric: str) -> str:
    """A metric name as a valid tag key (MLflow allows only [/\\w.\\- :])."""
    return "metric." + re.sub(r"[^/\w.\- :]", "_", metric)


def version_tags(
    run_id: str,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str,
    storage_uri: str | None = None,
    source_dir: str | None = None,
    engines: dict[str, str] | None = None,
) -> dict[str, str]:
    """The tags a model version carries: what the gate compares and what an operator reads.

    ``engines``: the vLLM versions of the rollouts the discrepancy was measured on, of evaluation and of
    serving (``engine_tags``); a verl run's rollout engine differs from the served one (README, images)."""
    tags = {
        TAG_RUN_ID: run_id,
        TAG_METRICS: json.dumps({k: float(v) for k, v in sorted(metrics.items())}),
        TAG_LAMBDA: repr(float(final_lambda)),
        TAG_DISCREPANCY: repr(float(discrepancy)),
        TAG_CONFIG_HASH: config_hash,
        TAG_QUANTIZATION: quantization,
    }
    tags.update({_tag_key(k): repr(float(v)) for k, v in metrics.items()})
    if storage_uri:
        tags[TAG_STORAGE_URI] = storage_uri
    if source_dir:
        tags[TAG_SOURCE_DIR] = source_dir
    tags.update(engines or {})
    return tags


def engine_tags(rollout: str | None, evaluation: str | None, serving_image: str) -> dict[str, str]:
    """``dcgrpo.engine.{rollout,eval,serving}`` and ``dcgrpo.engine.rollout_matches_serving``.

    ``serving_image`` is ``registry.vllm_image`` (``vllm/vllm-openai:v0.33.0`` -> ``vllm 0.33.0``). The match
    says whether the discrepancy DC-GRPO constrained is the served engine's: "false" for verl rounds (vLLM
    0.24.0 in the verl image), "unknown" when a round did not record its engine.
    """
    tag = serving_image.rsplit(":", 1)[-1].removeprefix("v") if ":" in serving_image else ""
    serving = f"vllm {tag}" if tag else serving_image
    tags = {"rollout": rollout or "unknown", "eval": evaluation or "unknown", "serving": serving}
    match = "unknown" if not rollout else str(rollout.split(" (")[0] == serving).lower()
    return {TAG_ENGINE_PREFIX + k: v for k, v in tags.items()} | {TAG_ENGINE_PREFIX + "rollout_matches_serving": match}


def load_metrics(value: str, what: str = "metrics") -> dict[str, float]:
    """Eval metrics given as a JSON object of numbers, inline or in a file (the CLI's ``--metrics``).

    Checked before anything is written, so a typo fails with one line naming
    ``what`` instead of a traceback or a version with unusable gate tags.
    """
    text = value
    try:
        if Path(value).is_file():
            text = Path(value).read_text()
    except OSError:  # too long to be a path: inline JSON
        pass
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{what}: not JSON ({exc}): {text[:80]!r}") from exc
    numbers = isinstance(data, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in data.values()
    )
    if not numbers or not data:
        raise RegistryError(f'{what}: expected a JSON object of numbers, e.g. {{"eval/aime24/avg_16": 0.3}}; '
                            f"got {text[:80]!r}")  # fmt: skip
    return {one_spelling(str(k)): float(v) for k, v in data.items()}


def metric(mv, name: str) -> float | None:
    """A version's eval metric; versions registered before the one spelling (``avg@k``) are read as ``avg_k``."""
    try:
        stored = json.loads(mv.tags.get(TAG_METRICS, "{}"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"version {mv.version}: tag {TAG_METRICS} is not JSON: {exc}") from exc
    value = {one_spelling(k): v for k, v in stored.items()}.get(one_spelling(name))
    return None if value is None else float(value)
