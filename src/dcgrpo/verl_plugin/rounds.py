"""A pipeline's training on verl (``train.backend=verl``): what the train task does.

All rounds of one method in one pipeline run share a directory on the
checkpoint volume (``verl.checkpoint_dir``, a PVC mounted in the step's pod
and on every Ray node):

    <checkpoint_dir>/<method>-<pipeline run id>/
        inputs/data/{train,val}.parquet   staged once by the first launch
        inputs/model/                     the warm-start model (HF)
        dcgrpo_round.json                 where the current launch stops
        mlflow_run.json                   the method's MLflow run (a retried task re-attaches)
        rollout_engine.json               the launch's vLLM and verl versions
        dc_metrics.jsonl                  each step's dc/* metrics, one JSON line a step
        global_step_N/actor/huggingface/  verl's checkpoint, HF weights included
        global_step_N/dc_grpo.json        lambda
        latest_checkpointed_iteration.txt verl's tracker

One launch (RayJob or in-pod) trains all rounds and stops after step
rounds x steps_per_round; verl checkpoints each round and resumes from the
latest checkpoint by itself. A retried task whose checkpoint is already there
launches nothing.
Imports nothing from verl.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcgrpo.config import ConfigError, RunConfig
from dcgrpo.verl_plugin.config import ray_env_overrides, render_overrides
from dcgrpo.verl_plugin.launch import DC_METRICS_FILE, ENGINE_FILE
from dcgrpo.verl_plugin.rayjob import RayJobFailed, job_name, run_rayjob, run_single_node

log = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
"""verl's tracker of the newest complete checkpoint (written after the step's folder)."""
LAMBDA_FILE = "dc_grpo.json"
"""The dc_grpo trainer's lambda state inside ``global_step_N`` (``trainer.CHECKPOINT_FILE``)."""


@dataclass(frozen=True)
class StagedInputs:
    train: str
    val: str
    model: str


@dataclass(frozen=True)
class RoundCheckpoint:
    step: int
    folder: Path
    hf_model: Path
    lam: float | None


def run_dir(cfg: RunConfig, pipeline_run_id: str, method: str) -> Path:
    """This method's directory for this pipeline run on the checkpoint volume."""
    root = Path(cfg.verl.checkpoint_dir)
    if not root.is_dir():
        raise ConfigError(
            f"verl.checkpoint_dir: {root} is not a directory in this pod. train.backend=verl keeps verl's "
            "checkpoints there across rounds: mount the checkpoint PVC at that path (dcgrpo compile "
            "--checkpoint-pvc NAME --checkpoint-mount PATH) or set verl.checkpoint_dir"
        )
    return root / job_name(f"{method}-{pipeline_run_id}")


def stage_inputs(directory: Path, dataset_dir: str | Path, model_dir: str | Path) -> StagedInputs:
    """Copy the prepared parquet and the base model next to the checkpoints, once.

    The copy is built aside and renamed into place, so a crash midway leaves no
    half-staged inputs; later rounds and retries find it and copy nothing.
    """
    inputs = directory / "inputs"
    if not inputs.is_dir():
        partial = directory / "inputs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "data").mkdir(parents=True)
        for split in ("train", "val"):
            src = Path(dataset_dir) / f"{split}.parquet"
            if not src.is_file():
                raise FileNotFoundError(f"prepared dataset: {src} is missing")
            shutil.copy2(src, partial / "data" / src.name)
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"base model: {model_dir} has no config.json (not an HF model directory)")
        # the optimizer state of a warm start is ours, not the model's: verl gets weights + tokenizer
        shutil.copytree(model_dir, partial / "model", ignore=shutil.ignore_patterns("trainer", "checkpoints"))
        partial.rename(inputs)
        log.info("staged the dataset and base model in %s", inputs)
    return StagedInputs(
        train=str(inputs / "data" / "train.parquet"),
        val=str(inputs / "data" / "val.parquet"),
        model=str(inputs / "model"),
    )


def latest_step(directory: Path) -> int:
    """verl's newest complete checkpoint step in ``directory`` (0: none yet)."""
    tracker = directory / LATEST_FILE
    if not tracker.is_file():
        return 0
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise RayJobFailed(f"{tracker}: expected a step number, found {text[:80]!r}")
    return int(text)


def read_checkpoint(directory: Path) -> RoundCheckpoint:
    """The newest checkpoint's step, HF weights and lambda; a clear error when incomplete."""
    step = latest_step(directory)
    if step == 0:
        raise RayJobFailed(f"verl finished but wrote no checkpoint in {directory} ({LATEST_FILE} missing)")
    folder = directory / f"global_step_{step}"
    hf = folder / "actor" / "huggingface"
    if not (hf / "config.json").is_file() or not any(hf.glob("*.safetensors")):
        raise RayJobFailed(
            f"{hf}: no HF weights in verl's step-{step} checkpoint (actor.checkpoint.save_contents needs hf_model)"
        )
    lam = None
    if (folder / LAMBDA_FILE).is_file():
        lam = float(json.loads((folder / LAMBDA_FILE).read_text())["multiplier"]["value"])
    return RoundCheckpoint(step=step, folder=folder, hf_model=hf, lam=lam)


def check_launch(cfg: RunConfig, mlflow_uri: str) -> None:
    """Refuse a launch whose results could not come back (before any GPU is asked for)."""
    if cfg.verl.launch == "rayjob" and not mlflow_uri.startswith(("http://", "https://", "databricks")):
        raise ConfigError(
            f"tracking.mlflow_uri: a RayJob's nodes log to MLflow themselves and cannot reach {mlflow_uri!r}; "
            "give the MLflow server's http(s) URI, or use verl.launch=single-node"
        )
    if cfg.verl.launch == "single-node":
        _check_local_gpus(cfg.verl.gpus_per_node)


def _check_local_gpus(wanted: int) -> None:
    try:
        import torch  # torch: not on the light image
    except ImportError:  # verl's own error says it
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < have < wanted:
        raise ConfigError(
            f"verl.gpus_per_node={wanted} but this pod sees {have} GPU(s): compile with --accelerator-limit "
            f"{wanted} or set verl.gpus_per_node={have}"
        )


def train_rounds(
    cfg: RunConfig,
    *,
    directory: Path,
    inputs: StagedInputs,
    method: str,
    pipeline_run_id: str,
    env: dict[str, str],
    api: Any = None,
) -> RoundCheckpoint:
    """Train every round of ``cfg.train.rounds`` on verl in one launch (one RayJob) and return its last checkpoint.

    verl checkpoints each round and resumes from its newest checkpoint by itself; a retried task whose checkpoint
    is complete launches nothing, and a retried launcher re-attaches to the RayJob of the same name
    (``rayjob.submit_rayjob``).
    """
    stop = cfg.train.rounds * cfg.train.steps_per_round
    done = latest_step(directory)
    if done >= stop:
        log.info("verl: %s already has step %d of %d (a retried task): not launched again", directory, done, stop)
    else:
        overrides = render_overrides(
            cfg, train_files=inputs.train, val_files=inputs.val, model_path=inputs.model,
            experiment_name=directory.name, local_dir=str(directory),
        )  # fmt: skip
        log.info("verl: steps %d..%d, %d rounds (%s)", done + 1, stop, cfg.train.rounds, cfg.verl.launch)
        if cfg.verl.launch == "single-node":
            run_single_node(overrides + ray_env_overrides(env), env=env, stop_at_step=stop)
        else:
            run_rayjob(cfg, overrides, name=f"{method}-{pipeline_run_id}", env=env, api=api, stop_at_step=stop)
    result = read_checkpoint(directory)
    if result.step < stop:
        raise RayJobFailed(f"verl ended at step {result.step}, before step {stop}")
    return result


def rollout_engine(directory: Path) -> str | None:
    """The rollout engine the round's launch recorded in ``directory`` (``launch.write_engine_file``), or None."""
    path = Path(directory) / ENGINE_FILE
    return json.loads(path.read_text())["rollout_engine"] if path.is_file() else None


def read_dc_metrics(directory: Path, first_step: int, last_step: int) -> dict[int, dict[str, float]]:
    """The ``dc/*`` metrics the trainer recorded for steps ``first_step+1..last_step`` (``launch.DC_METRICS_FILE``),
    by step in order; {} when there is no file.

    A step recorded twice (a retried launch resumed before it and redid it) keeps its last line; a line a crash cut
    short is skipped with a warning.
    """
    path = Path(directory) / DC_METRICS_FILE
    if not path.is_file():
        return {}
    by_step: dict[int, dict[str, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, TypeError, KeyError, AttributeError):
            log.warning("%s, line %d: skipped, not a complete record (a write cut short?): %.80r", path, number, line)
            continue
        if first_step < step <= last_step:
            by_step[step] = row
    return dict(sorted(by_step.items()))
