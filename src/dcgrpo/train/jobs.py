"""The whole job behind ``dcgrpo train`` (``dcgrpo demo`` runs the pipeline: ``dcgrpo.pipeline.demo``).

It resolves the model (``model.path`` or a freshly built tiny model with an
SFT warm start, cached under ``storage.root``) and the data
(``data.train_path`` or the synthetic task), then call ``dcgrpo.train.rl.train``
inside one MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dcgrpo import storage
from dcgrpo.data.synthetic import write_synthetic_splits
from dcgrpo.models import build_tiny_model, load_model_dir
from dcgrpo.tracking import start_run
from dcgrpo.train import checkpoint as ckpt
from dcgrpo.train.rl import TrainResult, train
from dcgrpo.train.sft import warm_start

log = logging.getLogger(__name__)


def prepare_inputs(cfg, work_dir: str | Path) -> tuple[Path, str, str]:
    """(model_dir, train_path, val_path): configured ones, else the tiny model + synthetic task."""
    work_dir = Path(work_dir)
    if cfg.data.train_path:
        train_path = cfg.data.train_path
        val_path = cfg.data.val_path or ""
    else:
        data_dir = work_dir / f"data-{cfg.data.synthetic_difficulty}-{cfg.data.seed}"
        t, v = write_synthetic_splits(cfg.data, data_dir)
        train_path, val_path = str(t), str(v)
    if cfg.model.path:
        return load_model_dir(cfg.model.path, work_dir / "model-cache"), train_path, val_path
    key = cfg.model.model_copy(update={"path": None}).model_dump_json()
    import hashlib

    tag = hashlib.sha256((key + cfg.data.model_dump_json()).encode()).hexdigest()[:10]
    sft_dir = work_dir / "models" / f"tiny-sft-{tag}"
    if not (sft_dir / "config.json").is_file():
        base = build_tiny_model(cfg.model, work_dir / "models" / f"tiny-base-{tag}")
        warm_start(cfg, base, train_path, sft_dir)
    return sft_dir, train_path, val_path


def train_job(cfg, *, out_dir: str | None = None, resume: str | None = None, progress: bool = True) -> TrainResult:
    """One training job = one MLflow run; resuming re-attaches to the checkpoint's run."""
    local_root = Path("outputs") if storage.is_s3(cfg.storage.root) else Path(cfg.storage.root)
    model_dir, train_path, val_path = prepare_inputs(cfg, local_root / "work")
    run_name = cfg.tracking.run_name or f"{cfg.method.name}-{cfg.rollout.precision}-{cfg.config_hash()}"
    out_dir = out_dir or storage.join(cfg.storage.root, "runs", run_name)
    run_id = None
    if resume:
        state = ckpt.load_checkpoint(resume, local_root / "work" / "ckpt-cache", cfg.storage.s3_endpoint_url).state
        run_id = state.get("mlflow_run_id")
    tags = {"method": cfg.method.name, "precision": cfg.rollout.precision, "config_hash": cfg.config_hash()}
    with start_run(cfg.tracking, storage_root=str(local_root), run_name=run_name, params=cfg.to_flat_dict(),
                   tags=tags, run_id=run_id) as run:  # fmt: skip
        if run_id is None:
            run.log_text(cfg.to_yaml(), "config.yaml")
        return train(cfg, model_dir=model_dir, train_path=train_path, val_path=val_path or None,
                     out_dir=out_dir, resume_from=resume, run=run, progress=progress)  # fmt: skip
