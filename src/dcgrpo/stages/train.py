"""The train stage: every round of one method, in one MLflow run, resumable at any round.

``train_job`` is the one driver of the built-in loop: ``dcgrpo train`` calls it with the config's data and model,
the pipeline's train task (``train_step``) with the prepared dataset and the warm start, on the checkpoint volume
with ``--resume auto``: a retried or evicted task continues from the newest complete checkpoint (a SIGTERM writes one
at the current step) and logs no point twice. The verl backend runs all rounds as one launch (``train_verl``).

Everything that can fail on the user's input is checked before the MLflow run is created or re-attached: the
environment (``dcgrpo.preflight``), the output folder's owner, the checkpoint to resume, the model and the rows. A
bad input then leaves no empty FAILED run behind, and a resume of a finished job leaves its run FINISHED.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.data.synthetic import read_rows
from dcgrpo.engines import engine_version
from dcgrpo.model_refs import model_store, resolve_model, write_model_ref
from dcgrpo.preflight import check_run_environment, check_writable
from dcgrpo.stages import train_verl
from dcgrpo.stages.data import check_prompts, local_data
from dcgrpo.stages.model import prepare_model
from dcgrpo.stages.run import local_root, run_tags, step_config
from dcgrpo.tracking import ROUND_DISCREPANCY, close_orphaned_runs, run_name, run_params, start_run
from dcgrpo.train import checkpoint as ckpt

log = logging.getLogger(__name__)

RESUME_AUTO = "auto"
"""``--resume auto``: resume ``<out>/checkpoints`` if it holds a complete checkpoint, else start (a pod's command)."""


@dataclass(frozen=True)
class TrainInputs:
    """What a training starts from when it is given rather than taken from the config (the pipeline's artifacts)."""

    model_dir: str
    train_path: str
    val_path: str = ""


def train_job(
    cfg, *, out_dir: str | None = None, resume: str | None = None, progress: bool = True,
    inputs: TrainInputs | None = None, kfp_run_id: str = "",
):  # fmt: skip
    """All rounds of ``cfg.method`` = one MLflow run (``tracking.run_name`` rule); resuming re-attaches to the
    checkpoint's run. Returns ``rl.TrainResult`` whose history is the whole run's (the resumed checkpoint's too)."""

    name = cfg.tracking.run_name or run_name(cfg.method.name, kfp_run_id or cfg.config_hash())
    out_dir = out_dir or storage.join(cfg.storage.root, "runs", name)
    check_run_environment(cfg, need_storage=inputs is None, check_inputs=inputs is None)
    check_writable(out_dir, "--out", cfg.storage.s3_endpoint_url)  # read-only or no bucket: fails now
    with ckpt.hold_out_dir(out_dir):
        loaded = _resume_point(cfg, out_dir, resume)
        if loaded and _rounds_left(cfg, loaded) <= 0:
            return _already_complete(cfg, loaded)
        return _train(cfg, out_dir, loaded, inputs, name, kfp_run_id, progress)


def _resume_point(cfg, out_dir: str, resume: str | None):
    """The checkpoint to continue (checked to train the same thing), or None; runs of this config left RUNNING by a
    crashed process are closed as FAILED (also when there is nothing to resume: one killed before its first
    checkpoint)."""
    endpoint = cfg.storage.s3_endpoint_url
    if resume == RESUME_AUTO:
        resume = ckpt.find_resume_point(out_dir, endpoint)
        log.info("--resume auto: %s", f"resuming {resume}" if resume else f"no checkpoint in {out_dir}: starting")
    elif not resume:
        ckpt.refuse_foreign_checkpoints(out_dir, endpoint)
    loaded = None
    try:
        if resume:
            loaded = ckpt.load_checkpoint(resume, local_root(cfg) / "work" / "ckpt-cache", endpoint)
            ckpt.check_resumable(loaded.state, loaded.uri, cfg.to_flat_dict(), cfg.config_hash())
    finally:
        keep = loaded.state.get("mlflow_run_id") if loaded else None
        close_orphaned_runs(cfg.tracking, storage_root=str(local_root(cfg)), config_hash=cfg.config_hash(), keep=keep)
    return loaded


def _rounds_left(cfg, loaded) -> int:
    from dcgrpo.train.rl import rounds_left  # torch: not on the light image

    return rounds_left(cfg.train, int(loaded.state["step"]))


def _already_complete(cfg, loaded):
    """A resume of a job whose rounds are all done (a retried task, a script run twice): report it, touch nothing,
    exit 0 without reopening its FINISHED run. The result carries the checkpoint's history."""
    from dcgrpo.train.rl import TrainResult  # torch: not on the light image

    state = loaded.state
    log.warning(
        "nothing to do: %s already completed %d of %d rounds (step %d); MLflow run %s left as it is. "
        "Raise train.rounds to train further.",
        loaded.uri, state["step"] // cfg.train.steps_per_round, cfg.train.rounds, state["step"],
        state.get("mlflow_run_id"),
    )  # fmt: skip
    return TrainResult(loaded.uri, int(state["step"]), float(state["lambda"]["value"]), list(state["history"]),
                       state.get("mlflow_run_id"))  # fmt: skip


def _train(cfg, out_dir: str, loaded, inputs: TrainInputs | None, name: str, kfp_run_id: str, progress: bool):
    """Model and rows (checked before the MLflow run), then the loop inside the run."""
    from dcgrpo.train.rl import train  # torch: not on the light image

    endpoint = cfg.storage.s3_endpoint_url
    if inputs is None:
        train_path, val_path = local_data(cfg, local_root(cfg) / "work")
        inputs = TrainInputs("", train_path, val_path)
    rows = read_rows(inputs.train_path, endpoint)
    val_rows = read_rows(inputs.val_path, endpoint) if inputs.val_path else []
    model_dir = loaded.local_dir if loaded else inputs.model_dir or prepare_model(cfg, local_root(cfg) / "work",
                                                                                   inputs.train_path)  # fmt: skip
    check_prompts(cfg, {str(inputs.train_path): rows}, model_dir)  # a too-long prompt: refused before the run
    run_id = loaded.state.get("mlflow_run_id") if loaded else None
    with start_run(cfg.tracking, storage_root=str(local_root(cfg)), run_name=name, params=run_params(cfg),
                   tags=run_tags(cfg, kfp_run_id), run_id=run_id) as run:  # fmt: skip
        if run_id is None:
            run.log_text(cfg.to_yaml(), "config.yaml")
        result = train(cfg, model_dir=model_dir, train_path=inputs.train_path, val_path=inputs.val_path or None,
                       out_dir=out_dir, resume_from=loaded, run=run, progress=progress, rows=rows,
                       val_rows=val_rows)  # fmt: skip
    prior = [h for h in loaded.state.get("history", []) if h.get("step", 0) <= loaded.state["step"]] if loaded else []
    return replace(result, history=prior + result.history)


# ------------------------------------------------------------------ the pipeline's train task


def train_step(
    preset: str, overrides: list[str], method: str, rounds: int, mlflow_uri: str, kfp_run_id: str,
    dataset_dir: str, base_model_dir: str, out_dir: str,
) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
    """All ``rounds`` rounds of ``method`` (0: the preset's ``train.rounds``) from the warm start ``base_model_dir``.

    Returns (metadata for the output Model, scalars for the Metrics artifact). Weights and checkpoints go to the
    checkpoint volume when it is mounted (the Model artifact references them), else into ``out_dir``.
    """
    fields = {"method__name": method} | ({"train__rounds": rounds} if rounds else {})
    cfg = step_config(preset, overrides, mlflow_uri, **fields)
    if cfg.train.backend == "verl":
        return train_verl.train_verl(cfg, kfp_run_id, dataset_dir, base_model_dir, out_dir)
    from dcgrpo.train.rl import summarize  # torch: not on the light image

    store = model_store(kfp_run_id, method)
    weights_dir = str(store) if store is not None else out_dir
    data = Path(dataset_dir)
    inputs = TrainInputs(resolve_model(base_model_dir), str(data / "train.parquet"), str(data / "val.parquet"))
    result = train_job(cfg, out_dir=weights_dir, resume=RESUME_AUTO, inputs=inputs, kfp_run_id=kfp_run_id)
    if store is not None:
        write_model_ref(out_dir, store)
    d_round = last_round_discrepancy(result.history)
    meta = {
        "method": method, "round": result.step // cfg.train.steps_per_round, "mlflow_run_id": result.run_id,
        "step": result.step, "lambda": result.lam, "rollout_engine": engine_version(),
        "checkpoint": Path(result.checkpoint).relative_to(weights_dir).as_posix(),
        "discrepancy": d_round,  # what selection and the gate compare
    }  # fmt: skip
    scalars = summarize(result.history) | {ROUND_DISCREPANCY: d_round}
    return meta, {k: float(v) for k, v in scalars.items()}


def last_round_discrepancy(history: list[dict]) -> float:
    """``ROUND_DISCREPANCY`` of the last round a history holds (NaN: none measured)."""
    values = [h[ROUND_DISCREPANCY] for h in history if ROUND_DISCREPANCY in h]
    return float(values[-1]) if values else float("nan")
