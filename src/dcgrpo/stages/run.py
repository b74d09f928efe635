"""What every stage shares: the step's config, its local root, its MLflow client, and a training run's tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.config import RunConfig, load_config
from dcgrpo.tracking import KFP_RUN_TAG


def step_config(preset: str, overrides: list[str], mlflow_uri: str = "", **fields: Any) -> RunConfig:
    """The run config of a step: preset + user overrides + what the pipeline decides (``fields``; ``a__b`` = a.b)."""
    items = list(overrides or [])
    if mlflow_uri:
        items.append(f"tracking.mlflow_uri={mlflow_uri}")
    items += [f"{k.replace('__', '.')}={json.dumps(v) if isinstance(v, list | dict) else v}" for k, v in fields.items()]
    return load_config(preset=preset or None, overrides=items)


def local_root(cfg: RunConfig) -> Path:
    return storage.local_root(cfg.storage.root)


def mlflow_client(cfg: RunConfig):
    """The MLflow tracking + registry client of a step (URI resolved as the training runs resolve it)."""
    from dcgrpo.tracking import mlflow_client as client
    from dcgrpo.tracking import tracking_uri

    return client(tracking_uri(cfg))


def run_tags(cfg: RunConfig, kfp_run_id: str = "") -> dict[str, str]:
    """A training run's MLflow tags: the method, the config, the precision each engine ran at (rollouts in
    ``rollout.precision``; a pipeline evaluates and serves the FP8 export), the backend and the pipeline run."""
    tags = {"method": cfg.method.name, "config_hash": cfg.config_hash(), "backend": cfg.train.backend,
            "dcgrpo.rollout_precision": cfg.rollout.precision}  # fmt: skip
    if kfp_run_id:
        tags |= {KFP_RUN_TAG: kfp_run_id, "dcgrpo.eval_precision": "fp8"}
    return tags


PACKAGES = {"gpu": "dc_grpo.yaml", "launcher": "dc_grpo_rayjob.yaml"}
"""The compiled pipeline for each train pod: the GPU train task (the built-in loop, verl single-node), or a light
launcher task following the RayJob that holds the GPUs (``verl.launch=rayjob``). Same graph; only the train task's
pod differs (``pipelines/dc_grpo.py``)."""


def train_pod(cfg: RunConfig) -> str:
    """Where a run's training computes: ``launcher`` when verl runs on a RayJob, else ``gpu``."""
    return "launcher" if cfg.train.backend == "verl" and cfg.verl.launch == "rayjob" else "gpu"


def check_train_pod(cfg: RunConfig, compiled_for: str) -> None:
    """Refuse, before any pod starts, a run whose training needs the other package's train task."""
    from dcgrpo.config import ConfigError

    wanted = train_pod(cfg)
    if wanted != compiled_for:
        how = "verl on a RayJob (train.backend=verl, verl.launch=rayjob)" if wanted == "launcher" else (
            "on the train task's own GPU pod")  # fmt: skip
        raise ConfigError(
            f"train.backend={cfg.train.backend}: preset {cfg.preset or 'default'} trains {how}, which this pipeline "
            f"package was not compiled for; run {PACKAGES[wanted]} instead (`dcgrpo submit` picks it by itself)"
        )


def resolve_pipeline_run(preset: str, overrides: list[str], rounds: int, model_name: str, compiled_for: str):
    """The pipeline's first check: ``rounds`` 0 and ``model_name`` '' take the preset's values, and the run's
    training must suit the package (``check_train_pod``); a ``ConfigError`` here stops the run before any pod."""
    from dcgrpo.config import resolve_run_parameters

    resolved = resolve_run_parameters(preset, overrides, rounds, model_name, 10**9)
    check_train_pod(load_config(preset=preset or None, overrides=list(overrides or [])), compiled_for)
    return resolved.rounds, resolved.model_name
