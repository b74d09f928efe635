"""The pipeline's run parameters that default to the preset's value, resolved once for both paths.

``pipeline_arguments`` (CLI, CI) and the pipeline's first step (a run started in the Kubeflow UI with only a
preset chosen) both call ``resolve_run_parameters``.
"""

from __future__ import annotations

from typing import NamedTuple

from dcgrpo.config import ConfigError, load_config


class RunParameters(NamedTuple):
    """The pipeline parameters that default to the preset's value, resolved."""

    rounds: int
    model_name: str
    round_pod: str = "gpu"
    """``launcher`` when rounds train on a RayJob (the round task only launches and follows it), else ``gpu``."""


def round_pod(cfg) -> str:
    """Where a round's compute runs: the pipeline selects the round task's pod size by this (issue 12, point 9)."""
    return "launcher" if cfg.train.backend == "verl" and cfg.verl.launch == "rayjob" else "gpu"


def resolve_run_parameters(
    preset: str, overrides: list[str] | None, rounds: int, model_name: str, max_rounds: int
) -> RunParameters:
    """``rounds`` 0 -> the preset's ``train.rounds``, ``model_name`` '' -> its ``registry.model_name``.

    One function for both paths: ``pipeline_arguments`` (CLI, CI) and the
    pipeline's first step (a run started in the Kubeflow UI with only a preset
    chosen). Raises ``ConfigError`` naming ``rounds`` when the count is more
    than the compiled pipeline can run, before anything trains.
    """
    cfg = load_config(preset=preset or None, overrides=list(overrides or []))
    if cfg.rollout.weight_grid != "none":
        raise ConfigError(
            f"rollout.weight_grid={cfg.rollout.weight_grid} is a lab setting (benchmarks/lab.py): the "
            "pipeline exports and serves FP8, so its rounds would train against a deployment it never makes"
        )
    n = int(rounds) or cfg.train.rounds
    if not 1 <= n <= max_rounds:
        source = "" if rounds else f" (preset {cfg.preset}'s train.rounds)"
        raise ConfigError(
            f"rounds={n}{source}: this compiled pipeline runs 1 to {max_rounds} rounds; ask for fewer, or "
            f"recompile with `dcgrpo compile --max-rounds {n}` and upload or submit that YAML"
        )
    return RunParameters(n, model_name or cfg.registry.model_name, round_pod(cfg))
