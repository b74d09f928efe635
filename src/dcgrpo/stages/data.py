"""The data stage: DAPO-Math-17K or the synthetic task as verl-schema ``train.parquet`` + ``val.parquet``."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dcgrpo.data.dapo import prepare_dapo
from dcgrpo.data.schema import check_prompt_lengths
from dcgrpo.data.synthetic import read_rows, write_synthetic_splits
from dcgrpo.models import run_tokenizer
from dcgrpo.stages.run import local_root, step_config
from dcgrpo.tracking import KFP_RUN_TAG, run_name, start_run

log = logging.getLogger(__name__)


def prepare_dapo_tracked(
    cfg, source: str, out_dir: str, *, model_uri: str = "", template: str | None = None,
    max_bad_rows: int | None = None, track: bool = True, kfp_run_id: str = "", tokenizer: Any = "run",
):  # fmt: skip
    """(summary, MLflow run id or None): DAPO from ``source`` prepared into ``out_dir`` inside an MLflow run (``prepare-<key>``) holding the summary
    (``track``); a bad input marks that run FAILED. Prompts over ``data.max_prompt_length`` tokens of the run's model
    are dropped and counted (``tokenizer="run"``: ``models.run_tokenizer``; None: not checked here)."""

    if tokenizer == "run":
        tokenizer = run_tokenizer(cfg, model_uri, local_root(cfg))

    def prepare():
        return prepare_dapo(
            source, out_dir, template=template or cfg.data.prompt_template, val_fraction=cfg.data.val_fraction,
            seed=cfg.data.seed, max_bad_rows=max_bad_rows, tokenizer=tokenizer,
            max_prompt_length=cfg.data.max_prompt_length,
        )  # fmt: skip

    if not track:
        return prepare(), None
    tags = {KFP_RUN_TAG: kfp_run_id, "dcgrpo.step": "prepare"} if kfp_run_id else {"dcgrpo.step": "prepare"}
    name = run_name("prepare", kfp_run_id)
    with start_run(cfg.tracking, storage_root=str(local_root(cfg)), run_name=name, tags=tags) as run:
        summary = prepare()
        run.log_params({"data.source": summary.source, "data.form": summary.form,
                        "data.prompt_template": summary.template, "data.seed": summary.seed,
                        "data.val_fraction": cfg.data.val_fraction})  # fmt: skip
        run.log_metrics(summary.metrics())
        run.log_dict(asdict(summary), "data/summary.json")
    return summary, run.run_id


def prepare_data_step(
    preset: str, overrides: list[str], data_uri: str, out_dir: str, mlflow_uri: str = "", kfp_run_id: str = "",
    model_uri: str = "",
) -> dict[str, Any]:  # fmt: skip
    """The pipeline's data: DAPO from ``data_uri`` (``prepare_dapo_tracked``), else the synthetic task, into ``out_dir``.

    Prompts over ``data.max_prompt_length`` tokens of the run's model (``model_uri``, else ``model.path``, else the
    tiny model) are dropped where a tokenizer is installed; the light image has none, so on a cluster the warm
    start checks the lengths instead (``model.warm_start_step``), before any engine starts.
    """
    cfg = step_config(preset, overrides, mlflow_uri)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if data_uri:
        tokenizer = _tokenizer_if_installed(cfg, model_uri)
        summary, _ = prepare_dapo_tracked(cfg, data_uri, out_dir, kfp_run_id=kfp_run_id, tokenizer=tokenizer)
        return {k: v for k, v in asdict(summary).items() if isinstance(v, int | float | str)}

    tags = {KFP_RUN_TAG: kfp_run_id, "dcgrpo.step": "prepare"}
    with start_run(cfg.tracking, storage_root=str(local_root(cfg)), run_name=run_name("prepare", kfp_run_id),
                   tags=tags) as run:  # fmt: skip
        train, val = write_synthetic_splits(cfg.data, out_dir)
        meta = {"source": "synthetic", "difficulty": cfg.data.synthetic_difficulty, "train": str(train),
                "val": str(val)}  # fmt: skip
        run.log_params({f"data.{k}": v for k, v in meta.items()})
    return meta


def local_data(cfg, work_dir: str | Path) -> tuple[str, str]:
    """(train_path, val_path) of ``dcgrpo train``: the configured ones, else the synthetic task under ``work_dir``."""
    if cfg.data.train_path:
        return cfg.data.train_path, cfg.data.val_path or ""

    data_dir = Path(work_dir) / f"data-{cfg.data.synthetic_difficulty}-{cfg.data.seed}"
    t, v = write_synthetic_splits(cfg.data, data_dir)
    return str(t), str(v)


def _tokenizer_if_installed(cfg, model_uri: str):
    """The run's tokenizer where transformers is installed (the GPU image, a local install), else None."""
    try:
        import transformers  # noqa: F401  (the light image has no transformers: lengths are checked later)
    except ImportError:
        log.info("no tokenizer on this image: prompt lengths are checked by the warm start")
        return None

    return run_tokenizer(cfg, model_uri, local_root(cfg))


def check_prompts(cfg, rows_by_file: dict[str, list[dict]], model_dir: str | Path) -> None:
    """Refuse (naming file and rows) prompts longer than ``data.max_prompt_length`` tokens of ``model_dir``'s
    tokenizer: before any MLflow run or engine, so a bad dataset leaves nothing half-done."""
    from transformers import AutoTokenizer  # transformers: not on the light image

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    for path, rows in rows_by_file.items():
        check_prompt_lengths(rows, tokenizer, cfg.data.max_prompt_length, path)


def read_prepared(dataset_dir: str | Path) -> dict[str, list[dict]]:
    """The rows of a prepared dataset's ``train.parquet`` and ``val.parquet`` (those present), by file."""

    paths = [Path(dataset_dir) / split for split in ("train.parquet", "val.parquet")]
    return {str(p): read_rows(p) for p in paths if p.is_file()}
