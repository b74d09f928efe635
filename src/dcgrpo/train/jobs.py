"""The whole job behind ``dcgrpo train`` (``dcgrpo demo`` runs the pipeline: ``dcgrpo.pipeline.demo``).

It resolves the model (``model.path`` or a freshly built tiny model with an
SFT warm start, cached under ``storage.root``) and the data
(``data.train_path`` or the synthetic task), then calls ``dcgrpo.train.rl.train``
inside one MLflow run.

Everything that can fail on the user's input is checked before that run is
created or re-attached: the environment (``dcgrpo.preflight``), the
checkpoint to resume, the model and the training rows. A bad input then
leaves no empty FAILED run behind, and ``--resume`` of a finished job leaves
its run FINISHED.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from dcgrpo import storage
from dcgrpo.data.synthetic import read_rows, write_synthetic_splits
from dcgrpo.models import load_model_dir
from dcgrpo.preflight import check_run_environment, check_writable
from dcgrpo.tracking import close_orphaned_runs, start_run, tracking_uri
from dcgrpo.train import checkpoint as ckpt
from dcgrpo.train.rl import TrainResult, rounds_left, train
from dcgrpo.train.sft import tiny_policy

log = logging.getLogger(__name__)


def prepare_data(cfg, work_dir: str | Path) -> tuple[str, str]:
    """(train_path, val_path): the configured ones, else the synthetic task written under ``work_dir``."""
    if cfg.data.train_path:
        return cfg.data.train_path, cfg.data.val_path or ""
    data_dir = Path(work_dir) / f"data-{cfg.data.synthetic_difficulty}-{cfg.data.seed}"
    t, v = write_synthetic_splits(cfg.data, data_dir)
    return str(t), str(v)


def prepare_model(cfg, work_dir: str | Path, train_path: str) -> Path:
    """``model.path`` (local dir, s3:// HF dir or Hub id; ``dcgrpo.models.load_model_dir``) as a local
    directory, else the tiny model after its SFT warm start (cached by config)."""
    work_dir = Path(work_dir)
    if cfg.model.path:
        return load_model_dir(cfg.model.path, work_dir / "model-cache", cfg.storage.s3_endpoint_url)
    key = cfg.model.model_copy(update={"path": None}).model_dump_json()
    tag = hashlib.sha256((key + cfg.data.model_dump_json()).encode()).hexdigest()[:10]
    sft_dir = work_dir / "models" / f"tiny-sft-{tag}"
    if not (sft_dir / "config.json").is_file():
        tiny_policy(cfg, train_path, sft_dir)
    return sft_dir


def prepare_inputs(cfg, work_dir: str | Path) -> tuple[Path, str, str]:
    """(model_dir, train_path, val_path): configured ones, else the tiny model + synthetic task."""
    train_path, val_path = prepare_data(cfg, work_dir)
    return prepare_model(cfg, work_dir, train_path), train_path, val_path


def _already_complete(cfg, loaded: ckpt.LoadedCheckpoint) -> TrainResult:
    """``--resume`` of a job whose rounds are all done: report it, touch nothing.

    Exit 0, not an error: the state the user asked for (``train.rounds``
    rounds trained) exists, so re-running a finished job (a retried pipeline
    step, a script run twice) succeeds without reopening its FINISHED run.
    """
    state = loaded.state
    log.warning(
        "nothing to do: %s already completed %d of %d rounds (step %d); MLflow run %s left as it is. "
        "Raise train.rounds to train further.",
        loaded.uri, state["step"] // cfg.train.steps_per_round, cfg.train.rounds, state["step"],
        state.get("mlflow_run_id"),
    )  # fmt: skip
    return TrainResult(loaded.uri, int(state["step"]), float(state["lambda"]["value"]), [],
                       state.get("mlflow_run_id"))  # fmt: skip


def _check_prompts(cfg, model_dir, rows: list[dict], train_path: str) -> None:
    from transformers import AutoTokenizer

    from dcgrpo.data.schema import check_prompt_lengths

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    check_prompt_lengths(rows, tokenizer, cfg.data.max_prompt_length, str(train_path))


RESUME_AUTO = "auto"
"""``--resume auto``: resume ``<out>/checkpoints`` if it holds a complete checkpoint, else start (a pod's command)."""


def train_job(cfg, *, out_dir: str | None = None, resume: str | None = None, progress: bool = True) -> TrainResult:
    """One training job = one MLflow run; resuming re-attaches to the checkpoint's run.

    Before that run is touched: preflight (storage, ``out_dir``, inputs, MLflow), the output folder's owner
    (one training process at a time; a fresh run never writes into another run's checkpoints), the resume
    checkpoint (its newest complete one, trained with the same settings), runs of this config left RUNNING by a
    crashed process closed as FAILED, then model and rows.
    """
    endpoint = cfg.storage.s3_endpoint_url
    local_root = storage.local_root(cfg.storage.root)
    run_name = cfg.tracking.run_name or f"{cfg.method.name}-{cfg.rollout.precision}-{cfg.config_hash()}"
    out_dir = out_dir or storage.join(cfg.storage.root, "runs", run_name)
    check_run_environment(cfg, tracking_uri=tracking_uri(cfg))
    check_writable(out_dir, "--out", endpoint)  # a read-only path or a missing bucket fails now, not after a round
    with ckpt.hold_out_dir(out_dir):
        if resume == RESUME_AUTO:
            resume = ckpt.find_resume_point(out_dir, endpoint)
            log.info("--resume auto: %s", f"resuming {resume}" if resume else f"no checkpoint in {out_dir}: starting")
        elif not resume:
            ckpt.refuse_foreign_checkpoints(out_dir, endpoint)
        loaded = None
        try:
            if resume:
                loaded = ckpt.load_checkpoint(resume, local_root / "work" / "ckpt-cache", endpoint)
                ckpt.check_resumable(loaded.state, loaded.uri, cfg.to_flat_dict(), cfg.config_hash())
        finally:  # also when there is nothing to resume: a run killed before its first checkpoint is closed here
            keep = loaded.state.get("mlflow_run_id") if loaded else None
            close_orphaned_runs(cfg.tracking, storage_root=str(local_root), config_hash=cfg.config_hash(), keep=keep)
        if loaded and rounds_left(cfg.train, int(loaded.state["step"])) <= 0:
            return _already_complete(cfg, loaded)
        train_path, val_path = prepare_data(cfg, local_root / "work")
        rows = read_rows(train_path, endpoint)
        val_rows = read_rows(val_path, endpoint) if val_path else []
        model_dir = loaded.local_dir if loaded else prepare_model(cfg, local_root / "work", train_path)
        _check_prompts(cfg, model_dir, rows, train_path)  # a too-long prompt is refused before the MLflow run
        run_id = loaded.state.get("mlflow_run_id") if loaded else None
        tags = {"method": cfg.method.name, "precision": cfg.rollout.precision, "config_hash": cfg.config_hash()}
        with start_run(cfg.tracking, storage_root=str(local_root), run_name=run_name, params=cfg.to_flat_dict(),
                       tags=tags, run_id=run_id) as run:  # fmt: skip
            if run_id is None:
                run.log_text(cfg.to_yaml(), "config.yaml")
            return train(cfg, model_dir=model_dir, train_path=train_path, val_path=val_path or None,
                         out_dir=out_dir, resume_from=loaded, run=run, progress=progress, rows=rows,
                         val_rows=val_rows)  # fmt: skip
