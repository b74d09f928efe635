"""The model stage: the base policy a training starts from (a configured model, or the tiny model after SFT)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from dcgrpo.model_refs import model_store, on_shared_volume, write_model_ref
from dcgrpo.models import load_model_dir
from dcgrpo.stages.data import check_prompts, local_data, read_prepared
from dcgrpo.stages.run import local_root, step_config


def prepare_model(cfg, work_dir: str | Path, train_path: str) -> Path:
    """``model.path`` (local dir, s3:// HF dir or Hub id; ``dcgrpo.models.load_model_dir``) as a local
    directory, else the tiny model after its SFT warm start on ``train_path`` (cached by config)."""
    from dcgrpo.train.sft import tiny_policy  # torch: not on the light image

    work_dir = Path(work_dir)
    if cfg.model.path:
        return load_model_dir(cfg.model.path, work_dir / "model-cache", cfg.storage.s3_endpoint_url)
    key = cfg.model.model_copy(update={"path": None}).model_dump_json()
    tag = hashlib.sha256((key + cfg.data.model_dump_json()).encode()).hexdigest()[:10]
    sft_dir = work_dir / "models" / f"tiny-sft-{tag}"
    if not (sft_dir / "config.json").is_file():
        tiny_policy(cfg, train_path, sft_dir)
    return sft_dir


def warm_start_step(
    preset: str, overrides: list[str], model_uri: str, dataset_dir: str, out_dir: str, kfp_run_id: str = ""
) -> dict:
    """The pipeline's base policy: ``model_uri`` (else ``model.path``), or a tiny model after SFT.

    On a cluster the weights stay on a volume and ``out_dir`` only references them: a base model loaded into the
    model-cache volume is referenced where it is, a trained tiny model is written to the checkpoint volume
    (``model_refs.model_store``). Elsewhere ``out_dir`` holds the weights. Prompts too long for the model's
    tokenizer are refused here, before any engine starts.
    """
    cfg = step_config(preset, overrides)
    field = "model_uri" if model_uri else "model.path"
    model_uri = model_uri or cfg.model.path or ""
    store = model_store(kfp_run_id, "base")
    if model_uri:
        # Local dir, s3:// HF dir or Hub id, through the model-cache PVC ($DCGRPO_MODEL_CACHE) when mounted.
        src = load_model_dir(model_uri, local_root(cfg) / "model-cache", cfg.storage.s3_endpoint_url, field=field)
        check_prompts(cfg, read_prepared(dataset_dir), src)
        if on_shared_volume(src):
            write_model_ref(out_dir, src)
        elif store is not None:
            shutil.copytree(src, store, dirs_exist_ok=True)
            write_model_ref(out_dir, store)
        else:
            shutil.copytree(src, out_dir, dirs_exist_ok=True)
        return {"base": model_uri}
    from dcgrpo.train.sft import tiny_policy  # torch: not on the light image

    tiny_policy(cfg, str(Path(dataset_dir) / "train.parquet"), store or out_dir)
    check_prompts(cfg, read_prepared(dataset_dir), store or out_dir)
    if store is not None:
        write_model_ref(out_dir, store)
    return {"base": f"tiny-{cfg.model.arch}+sft{cfg.model.sft_steps}"}


def prepare_inputs(cfg, work_dir: str | Path) -> tuple[Path, str, str]:
    """(model_dir, train_path, val_path) of a run outside the pipeline: the configured ones, else the tiny model
    after SFT and the synthetic task (the benchmarks' and ``dcgrpo train``'s inputs)."""
    train_path, val_path = local_data(cfg, work_dir)
    return prepare_model(cfg, work_dir, train_path), train_path, val_path
