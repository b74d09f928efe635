"""The train stage on verl (``train.backend=verl``): all rounds of one method as one launch, in its MLflow run.

The verl process logs its steps to the method's MLflow run itself; this stage creates (or, on a retried task,
re-attaches to) that run, logs each round's ``ROUND_DISCREPANCY`` from the trainer's metrics file at the round's
last step, and hands on the HF model verl saved. Runs on the light image (a RayJob launcher): no torch here.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dcgrpo.model_refs import latest_model_dir, on_shared_volume, write_model_ref
from dcgrpo.stages.run import local_root, run_tags
from dcgrpo.tracking import LAMBDA_KEY, ROUND_DISCREPANCY, run_name, run_params, start_run, tracking_uri
from dcgrpo.verl_plugin import rounds as verl_rounds
from dcgrpo.verl_plugin.config import render_env

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"
"""Beside verl's checkpoints: the method's MLflow run id, so a retried task re-attaches to it."""


def train_verl(
    cfg, kfp_run_id: str, dataset_dir: str, base_model_dir: str, out_dir: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """All rounds on verl; returns (Model metadata, Metrics scalars) as ``train.train_step`` does."""
    method, uri = cfg.method.name, tracking_uri(cfg)
    verl_rounds.check_launch(cfg, uri)
    directory = verl_rounds.run_dir(cfg, kfp_run_id, method)
    directory.mkdir(parents=True, exist_ok=True)
    inputs = verl_rounds.stage_inputs(directory, dataset_dir, latest_model_dir(base_model_dir))
    known = json.loads((directory / RUN_FILE).read_text())["run_id"] if (directory / RUN_FILE).is_file() else None
    with start_run(
        cfg.tracking, storage_root=str(local_root(cfg)), run_name=run_name(method, kfp_run_id),
        params=run_params(cfg), tags=run_tags(cfg, kfp_run_id), run_id=known,
    ) as run:  # fmt: skip
        (directory / RUN_FILE).write_text(json.dumps({"run_id": run.run_id}))
        result = verl_rounds.train_rounds(
            cfg, directory=directory, inputs=inputs, method=method, pipeline_run_id=kfp_run_id,
            env=render_env(cfg, uri, run.run_id),
        )  # fmt: skip
        per_round = round_discrepancies(directory, cfg.train.steps_per_round, result.step)
        logged = {step for step, _ in run.get_metric_history(ROUND_DISCREPANCY)}  # by a try before a retry
        for step, d in per_round.items():
            if step not in logged:
                run.log_metrics({ROUND_DISCREPANCY: d}, step=step)
        scalars, _ = verl_round_metrics(directory, result.step - cfg.train.steps_per_round, result.step)
        run_id = run.run_id
    _hand_over(result.hf_model, out_dir)
    d_last = per_round.get(result.step, float("nan"))
    scalars[ROUND_DISCREPANCY] = d_last
    if result.lam is not None:
        scalars[LAMBDA_KEY] = result.lam  # after the last dual step, as verl's checkpoint keeps it
    meta = {
        "method": method, "round": result.step // cfg.train.steps_per_round, "mlflow_run_id": run_id,
        "step": result.step, "lambda": result.lam, "backend": "verl", "checkpoint": str(result.folder),
        "discrepancy": d_last, "rollout_engine": verl_rounds.rollout_engine(directory),  # the verl image's vLLM
    }  # fmt: skip
    return meta, scalars


def _hand_over(hf_model: Path, out_dir: str) -> None:
    """The HF model verl saved: referenced where it is on the checkpoint volume, else copied into the artifact."""
    if on_shared_volume(Path(hf_model)):
        write_model_ref(out_dir, Path(hf_model))
    else:
        shutil.copytree(hf_model, out_dir, dirs_exist_ok=True)


def round_discrepancies(directory: Path, steps_per_round: int, last_step: int) -> dict[int, float]:
    """``ROUND_DISCREPANCY`` of every round up to ``last_step``, keyed by the round's last step."""
    out = {}
    for end in range(steps_per_round, last_step + 1, steps_per_round):
        out[end] = verl_round_metrics(directory, end - steps_per_round, end)[1]
    return out


def verl_round_metrics(directory: Path, first_step: int, last_step: int) -> tuple[dict, float]:
    """(last dc/* values as Metrics scalars, mean batch discrepancy over steps ``first_step+1..last_step``), from
    the metrics file the trainer writes beside its checkpoints (``rounds.read_dc_metrics``), not from MLflow."""
    steps = verl_rounds.read_dc_metrics(directory, first_step, last_step)
    last: dict[str, float] = {}
    for row in steps.values():  # in step order: each key's value at the last step that recorded it
        last.update(row)
    scalars = {k: float(v) for k, v in last.items() if k.startswith("dc/")}
    d = [row["dc/discrepancy_mean"] for row in steps.values() if "dc/discrepancy_mean" in row]
    if not d:
        log.warning("%s: the trainer recorded no dc/discrepancy_mean for steps %d..%d", directory, first_step + 1,
                    last_step)  # fmt: skip
    return scalars, (sum(d) / len(d) if d else float("nan"))
