"""What every stage shares: the step's config, its local root, its MLflow client, and a training run's tags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.config import RunConfig, load_config
from dcgrpo.tracking import KFP_RUN_TAG, tracking_uri
from dcgrpo.tracking import mlflow_client as tracking_client


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
    return tracking_client(tracking_uri(cfg))


def run_tags(cfg: RunConfig, kfp_run_id: str = "") -> dict[str, str]:
    """A training run's MLflow tags: the method, the config, the precision each engine ran at (rollouts in
    ``rollout.precision``; a pipeline evaluates and serves the FP8 export), the backend and the pipeline run."""
    tags = {"method": cfg.method.name, "config_hash": cfg.config_hash(), "backend": cfg.train.backend,
            "dcgrpo.rollout_precision": cfg.rollout.precision}  # fmt: skip
    if kfp_run_id:
        tags |= {KFP_RUN_TAG: kfp_run_id, "dcgrpo.eval_precision": "fp8"}
    return tags
