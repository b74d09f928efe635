"""The pipeline's run parameters, resolved and checked once for both paths, and the package that can run them.

``pipeline_arguments`` (CLI, CI) and the pipeline's first step (a run started in the Kubeflow UI with only a
preset chosen) both call ``resolve_run_parameters``.
"""

from __future__ import annotations

from typing import NamedTuple

from dcgrpo.config import ConfigError, RunConfig, load_config

PACKAGES = {"gpu": "dc_grpo.yaml", "launcher": "dc_grpo_rayjob.yaml"}
"""The compiled pipeline for each train pod: the GPU train task (the built-in loop, verl single-node), or a light
launcher task following the RayJob that holds the GPUs (``verl.launch=rayjob``). Same graph; only the train task's
pod differs (``pipelines/dc_grpo.py``)."""


class RunParameters(NamedTuple):
    """The pipeline parameters that default to the preset's value, resolved."""

    rounds: int
    model_name: str


def resolve_run_parameters(preset: str, overrides: list[str] | None, rounds: int, model_name: str) -> RunParameters:
    """``rounds`` 0 -> the preset's ``train.rounds``, ``model_name`` '' -> its ``registry.model_name``; any number
    of rounds (one train task per method runs them all). Refuses a lab-only setting the pipeline cannot deploy."""
    cfg = load_config(preset=preset or None, overrides=list(overrides or []))
    if cfg.rollout.weight_grid != "none":
        raise ConfigError(
            f"rollout.weight_grid={cfg.rollout.weight_grid} is a lab setting (benchmarks/lab.py): the "
            "pipeline exports and serves FP8, so its rounds would train against a deployment it never makes"
        )
    return RunParameters(int(rounds) or cfg.train.rounds, model_name or cfg.registry.model_name)


def train_pod(cfg: RunConfig) -> str:
    """Where a run's training computes: ``launcher`` when verl runs on a RayJob, else ``gpu``."""
    return "launcher" if cfg.train.backend == "verl" and cfg.verl.launch == "rayjob" else "gpu"


def check_train_pod(cfg: RunConfig, compiled_for: str) -> None:
    """Refuse, before any pod starts, a run whose training needs the other package's train task."""
    wanted = train_pod(cfg)
    if wanted != compiled_for:
        how = "verl on a RayJob (train.backend=verl, verl.launch=rayjob)" if wanted == "launcher" else (
            "on the train task's own GPU pod")  # fmt: skip
        raise ConfigError(
            f"train.backend={cfg.train.backend}: preset {cfg.preset or 'default'} trains {how}, which this pipeline "
            f"package was not compiled for; run {PACKAGES[wanted]} instead (`dcgrpo submit` picks it by itself)"
        )


def resolve_pipeline_run(preset: str, overrides: list[str], rounds: int, model_name: str, compiled_for: str):
    """The pipeline's first check: ``resolve_run_parameters``, and the run's training must suit the package
    (``check_train_pod``); a ``ConfigError`` here stops the run before any pod."""
    resolved = resolve_run_parameters(preset, overrides, rounds, model_name)
    check_train_pod(load_config(preset=preset or None, overrides=list(overrides or [])), compiled_for)
    return resolved
