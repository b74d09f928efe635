"""Pipeline steps as library functions: what each KFP component calls.

Every step rebuilds the one config from ``(preset, overrides)`` (so a step
fails on a bad value before doing work), takes local paths of its input
artifacts and writes into the local path of its output artifact. They are
plain functions: the components in ``components/`` are one-line shells over
them, and tests call them directly too.

MLflow: one run per method per pipeline run, created by the first training
round and re-attached by later rounds, evaluation and registration (its id
travels in the Model artifact's metadata). Every run carries the tag
``kfp_run_id`` so the exit handler can find and fail them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from dcgrpo import storage
from dcgrpo.config import RunConfig, load_config
from dcgrpo.registry import Registered
from dcgrpo.stages.registration import best_method_index, promote_version, register_and_gate

log = logging.getLogger(__name__)

KFP_RUN_TAG = "kfp_run_id"
EVAL_METRICS_TAG = "dcgrpo.eval_metrics"
EVAL_ENGINE_TAG = "dcgrpo.eval_engine"
MODEL_STORE_ENV = "DCGRPO_MODEL_STORE"
"""Where GPU steps write weights that later steps read in place: the checkpoint volume's mount (set by the pipeline
on every GPU task, which all mount that volume). Unset or not mounted: weights go into the step's own artifact."""
MODEL_REF_FILE = "model_ref.json"
"""What a Model artifact holds when its weights stay on a shared volume: ``{"path": <directory>}``."""


def step_config(preset: str, overrides: list[str], mlflow_uri: str = "", **fields: Any) -> RunConfig:
    """The run config of a step: preset + user overrides + what the pipeline decides (``fields``)."""
    items = list(overrides or [])
    if mlflow_uri:
        items.append(f"tracking.mlflow_uri={mlflow_uri}")
    items += [f"{k.replace('__', '.')}={json.dumps(v) if isinstance(v, list | dict) else v}" for k, v in fields.items()]
    return load_config(preset=preset or None, overrides=items)


def _local_root(cfg: RunConfig) -> Path:
    return storage.local_root(cfg.storage.root)


def _mlflow_client(cfg: RunConfig):
    """The MLflow tracking + registry client of a step (URI resolved as the training runs resolve it)."""
    from dcgrpo.registry import client
    from dcgrpo.tracking import tracking_uri

    return client(tracking_uri(cfg))


# ------------------------------------------------------------------ models by reference


def model_store(kfp_run_id: str, *parts: str) -> Path | None:
    """The directory on the checkpoint volume for a step's weights (``models/<run>/<parts>``), or None when the
    volume is not mounted here (kfp.local, tests, a cluster without it): then weights go through the artifact."""
    root = os.environ.get(MODEL_STORE_ENV)
    if not root or not Path(root).is_dir():
        if root:
            log.info("%s=%s is not mounted: weights go through the KFP artifact store", MODEL_STORE_ENV, root)
        return None
    return Path(root, "models", kfp_run_id or "no-run-id", *parts)


def write_model_ref(artifact_dir: str, weights_dir: Path) -> None:
    """Make ``artifact_dir`` (a Model artifact) a reference to ``weights_dir`` instead of a copy of it."""
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    (Path(artifact_dir) / MODEL_REF_FILE).write_text(json.dumps({"path": str(weights_dir)}))


def resolve_model(artifact_dir: str) -> str:
    """The directory holding a Model artifact's weights: the one it references, else the artifact itself."""
    ref = Path(artifact_dir) / MODEL_REF_FILE
    if not ref.is_file():
        return artifact_dir
    target = json.loads(ref.read_text())["path"]
    if not Path(target).is_dir():
        from dcgrpo.models import ModelNotFoundError

        raise ModelNotFoundError(
            f"{artifact_dir}: its weights are referenced at {target}, which is not there: mount the checkpoint "
            f"volume on this step (${MODEL_STORE_ENV}) or, for a cached task whose files were deleted, run with "
            "caching off"
        )
    return target


def _on_shared_volume(path: Path) -> bool:
    """Under the model-cache or checkpoint volume's mount, so a later step can read it in place."""
    mounts = [os.environ.get(k) for k in ("DCGRPO_MODEL_CACHE", MODEL_STORE_ENV)]
    return any(m and Path(m).is_dir() and path.resolve().is_relative_to(Path(m).resolve()) for m in mounts)


# ------------------------------------------------------------------ data, base model


def prepare_data_step(
    preset: str,
    overrides: list[str],
    data_uri: str,
    out_dir: str,
    mlflow_uri: str = "",
    kfp_run_id: str = "",
    model_uri: str = "",
) -> dict[str, Any]:
    """``train.parquet`` + ``val.parquet`` in ``out_dir``: DAPO from ``data_uri``, else synthetic.

    Runs inside an MLflow run (``prepare-data``, tagged with the KFP run id)
    holding the preparation summary; a bad input marks that run FAILED.
    Prompts over ``data.max_prompt_length`` tokens of the run's model (``model_uri``, else ``model.path``, else
    the tiny model) are dropped where a tokenizer is installed; the light image has none, so on a cluster the
    warm start checks the lengths instead (``warm_start_step``), before any engine starts.
    """
    from dataclasses import asdict

    from dcgrpo.tracking import run_name, start_run

    cfg = step_config(preset, overrides, mlflow_uri)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tags = {KFP_RUN_TAG: kfp_run_id, "dcgrpo.step": "prepare"}
    name = run_name("prepare-data", kfp_run_id)
    with start_run(cfg.tracking, storage_root=str(_local_root(cfg)), run_name=name, tags=tags) as run:
        if data_uri:
            from dcgrpo.data.dapo import prepare_dapo

            summary = prepare_dapo(
                data_uri, out_dir, template=cfg.data.prompt_template, val_fraction=cfg.data.val_fraction,
                seed=cfg.data.seed, tokenizer=_tokenizer_if_installed(cfg, model_uri),
                max_prompt_length=cfg.data.max_prompt_length,
            )  # fmt: skip
            run.log_metrics(summary.metrics())
            run.log_dict(asdict(summary), "data/summary.json")
            return {k: v for k, v in asdict(summary).items() if isinstance(v, int | float | str)}
        from dcgrpo.data.synthetic import write_synthetic_splits

        train, val = write_synthetic_splits(cfg.data, out_dir)
        meta = {
            "source": "synthetic",
            "difficulty": cfg.data.synthetic_difficulty,
            "train": str(train),
            "val": str(val),
        }
        run.log_params({f"data.{k}": v for k, v in meta.items()})
        return meta


def _tokenizer_if_installed(cfg, model_uri: str):
    """The run's tokenizer where transformers is installed (the GPU image, a local install), else None."""
    try:
        import transformers  # noqa: F401  (the light image has no transformers: lengths are checked later)
    except ImportError:
        log.info("no tokenizer on this image: prompt lengths are checked by the warm start")
        return None
    from dcgrpo.models import run_tokenizer

    return run_tokenizer(cfg, model_uri, _local_root(cfg))


def _check_prompt_lengths(cfg, dataset_dir: str, model_dir: str | Path) -> None:
    """Refuse (naming file and rows) a prepared dataset with prompts longer than ``data.max_prompt_length``."""
    from transformers import AutoTokenizer

    from dcgrpo.data.schema import check_prompt_lengths
    from dcgrpo.data.synthetic import read_rows

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    for split in ("train.parquet", "val.parquet"):
        path = Path(dataset_dir) / split
        if path.is_file():
            check_prompt_lengths(read_rows(path), tokenizer, cfg.data.max_prompt_length, str(path))


def warm_start_step(
    preset: str, overrides: list[str], model_uri: str, dataset_dir: str, out_dir: str, kfp_run_id: str = ""
) -> dict:
    """The base policy: ``model_uri`` (else ``model.path``), or a tiny model after SFT.

    On a cluster the weights stay on a volume and ``out_dir`` only references them: a base model loaded into the
    model-cache volume is referenced where it is, a trained tiny model is written to the checkpoint volume
    (``model_store``). Elsewhere ``out_dir`` holds the weights.
    """
    cfg = step_config(preset, overrides)
    field = "model_uri" if model_uri else "model.path"
    model_uri = model_uri or cfg.model.path or ""
    store = model_store(kfp_run_id, "base")
    if model_uri:
        from dcgrpo.models import load_model_dir

        # Local dir, s3:// HF dir or Hub id, through the model-cache PVC ($DCGRPO_MODEL_CACHE) when mounted.
        src = load_model_dir(model_uri, _local_root(cfg) / "model-cache", cfg.storage.s3_endpoint_url, field=field)
        _check_prompt_lengths(cfg, dataset_dir, src)  # before any engine: the rounds would refuse them mid-run
        if _on_shared_volume(src):
            write_model_ref(out_dir, src)
        elif store is not None:
            shutil.copytree(src, store, dirs_exist_ok=True)
            write_model_ref(out_dir, store)
        else:
            shutil.copytree(src, out_dir, dirs_exist_ok=True)
        return {"base": model_uri}
    from dcgrpo.train.sft import tiny_policy

    tiny_policy(cfg, str(Path(dataset_dir) / "train.parquet"), store or out_dir)
    _check_prompt_lengths(cfg, dataset_dir, store or out_dir)
    if store is not None:
        write_model_ref(out_dir, store)
    return {"base": f"tiny-{cfg.model.arch}+sft{cfg.model.sft_steps}"}


# ------------------------------------------------------------------ training


def _is_checkpoint_artifact(model_dir: str) -> bool:
    return (Path(resolve_model(model_dir)) / "checkpoints").is_dir()


def train_round_step(
    preset: str,
    overrides: list[str],
    method: str,
    round_index: int,
    rounds: int,
    mlflow_uri: str,
    kfp_run_id: str,
    dataset_dir: str,
    model_in_dir: str,
    model_in_meta: dict[str, Any],
    out_dir: str,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train round ``round_index`` (0-based) of ``method``, resuming ``model_in_dir``'s checkpoint.

    Returns (metadata for the output Model, scalars for the Metrics artifact).
    Rounds at or past ``rounds`` copy the input through unchanged.
    """
    from dcgrpo.tracking import run_name, run_params, start_run

    if round_index >= rounds:
        shutil.copytree(model_in_dir, out_dir, dirs_exist_ok=True)
        return {**model_in_meta, "skipped_round": round_index + 1}, {}
    cfg = step_config(preset, overrides, mlflow_uri, method__name=method, train__rounds=rounds)
    from dcgrpo.preflight import check_run_environment

    # Its inputs and outputs are artifacts: what can still be wrong before the round's compute is the server.
    check_run_environment(cfg, need_storage=False, check_inputs=False)
    if cfg.train.backend == "verl":
        return _train_round_verl(cfg, method, round_index, rounds, kfp_run_id, dataset_dir, model_in_dir,
                                 model_in_meta, out_dir)  # fmt: skip
    from dcgrpo.engines import engine_version
    from dcgrpo.train.rl import summarize, train  # torch: after the verl branch, which runs on the light image

    model_in = resolve_model(model_in_dir)
    resume = str(Path(model_in) / "checkpoints") if _is_checkpoint_artifact(model_in) else None
    run_id = model_in_meta.get("mlflow_run_id") if resume else None
    data = Path(dataset_dir)
    store = model_store(kfp_run_id, method, f"round-{round_index + 1}")  # the checkpoint volume, when mounted
    weights_dir = str(store) if store is not None else out_dir
    with start_run(
        cfg.tracking, storage_root=str(_local_root(cfg)), run_name=run_name(method, kfp_run_id),
        params=run_params(cfg), tags=_run_tags(cfg, kfp_run_id, method), run_id=run_id,
    ) as run:  # fmt: skip
        log.info("%s round %d of %d: MLflow run %s", method, round_index + 1, rounds, run.run_id)
        result = train(
            cfg, model_dir=model_in, train_path=str(data / "train.parquet"), val_path=str(data / "val.parquet"),
            out_dir=weights_dir, resume_from=resume, run=run, rounds=1, progress=True,
        )  # fmt: skip
        d_round = _round_discrepancy([h.get("dc/discrepancy_mean") for h in result.history])
        run.log_metrics({ROUND_DISCREPANCY: d_round}, step=result.step)
    if store is not None:
        write_model_ref(out_dir, store)
    scalars = summarize(result.history) | {ROUND_DISCREPANCY: d_round}
    meta = {
        "method": method, "round": round_index + 1, "mlflow_run_id": result.run_id, "step": result.step,
        "lambda": result.lam, "checkpoint": Path(result.checkpoint).relative_to(weights_dir).as_posix(),
        "rollout_engine": engine_version(),
        "discrepancy": d_round,  # what selection and the gate compare
    }  # fmt: skip
    return meta, {k: float(v) for k, v in scalars.items()}


ROUND_DISCREPANCY = "dc/discrepancy_round_mean"
"""The mean over a round's steps of the batch-mean discrepancy ``dc/discrepancy_mean``: what method selection and
the promotion gate compare (the registry's ``dc/discrepancy_final`` of a version is its last round's), logged to
MLflow at the round's last step and shown under this name by the demo and the evaluation report."""
LAMBDA_KEY = "dc/lambda_next"
"""Lambda after a step's dual update (Eq. 11): the one a checkpoint keeps and the next round starts from. A run's
final lambda (the registry's ``dc/lambda_final``, the demo table, the report) is its last step's value of it."""


def _round_discrepancy(values: list[float | None]) -> float:
    measured = [v for v in values if v is not None]
    return sum(measured) / len(measured) if measured else float("nan")


def _run_tags(cfg: RunConfig, kfp_run_id: str, method: str, **extra: str) -> dict[str, str]:
    """A method's MLflow run tags: the pipeline run (``KFP_RUN_TAG``), the method, and the precision each engine
    ran at (rollouts in ``rollout.precision``; evaluation and serving on the FP8 export)."""
    return {KFP_RUN_TAG: kfp_run_id, "method": method, "dcgrpo.rollout_precision": cfg.rollout.precision,
            "dcgrpo.eval_precision": "fp8", **extra}  # fmt: skip


VERL_ROUND_FILE = "verl_round.json"
"""What an intermediate verl round's Model artifact holds: where its checkpoint is (the weights stay on the volume)."""


def _train_round_verl(
    cfg: RunConfig, method: str, round_index: int, rounds: int, kfp_run_id: str, dataset_dir: str,
    model_in_dir: str, model_in_meta: dict[str, Any], out_dir: str,
) -> tuple[dict[str, Any], dict[str, float]]:  # fmt: skip
    """The verl backend of ``train_round_step``: one round of verl in the method's MLflow run.

    The last round's Model artifact is the HF model verl saved (what export and
    evaluation read); earlier rounds write only ``VERL_ROUND_FILE``, since verl
    resumes from the checkpoint volume, not from the artifact.
    """
    from dcgrpo.tracking import run_name, run_params, start_run, tracking_uri
    from dcgrpo.verl_plugin import rounds as verl_rounds
    from dcgrpo.verl_plugin.config import render_env

    uri = tracking_uri(cfg)
    verl_rounds.check_launch(cfg, uri)
    directory = verl_rounds.run_dir(cfg, kfp_run_id, method)
    directory.mkdir(parents=True, exist_ok=True)
    inputs = verl_rounds.stage_inputs(directory, dataset_dir, latest_model_dir(model_in_dir))
    first_step = round_index * cfg.train.steps_per_round
    with start_run(
        cfg.tracking, storage_root=str(_local_root(cfg)), run_name=run_name(method, kfp_run_id),
        params=run_params(cfg), tags=_run_tags(cfg, kfp_run_id, method, backend="verl"),
        run_id=model_in_meta.get("mlflow_run_id"),
    ) as run:  # fmt: skip
        result = verl_rounds.train_round(
            cfg, directory=directory, inputs=inputs, round_number=round_index + 1, method=method,
            pipeline_run_id=kfp_run_id, env=render_env(cfg, uri, run.run_id),
        )  # fmt: skip
        run_id = run.run_id
        scalars, d_round = _verl_round_metrics(directory, first_step, result.step)
        run.log_metrics({ROUND_DISCREPANCY: d_round}, step=result.step)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if round_index + 1 == rounds:  # the HF model verl saved on the checkpoint volume: referenced, not copied
        if _on_shared_volume(Path(result.hf_model)):
            write_model_ref(out_dir, Path(result.hf_model))
        else:
            shutil.copytree(result.hf_model, out, dirs_exist_ok=True)
    else:
        (out / VERL_ROUND_FILE).write_text(json.dumps({"checkpoint": str(result.folder), "step": result.step}))
    scalars[ROUND_DISCREPANCY] = d_round
    if result.lam is not None:
        scalars[LAMBDA_KEY] = result.lam  # after the round's last dual step, as verl's checkpoint keeps it
    meta = {
        "method": method, "round": round_index + 1, "mlflow_run_id": run_id, "step": result.step,
        "lambda": result.lam, "backend": "verl",
        "checkpoint": str(result.folder), "discrepancy": d_round,
        "rollout_engine": verl_rounds.rollout_engine(directory),  # the verl image's vLLM, as its launch recorded
    }  # fmt: skip
    return meta, scalars


def _verl_round_metrics(directory: Path, first_step: int, last_step: int) -> tuple[dict, float]:
    """(last dc/* values as Metrics scalars, mean batch discrepancy over this round's steps ``first_step+1..last_step``),
    from the metrics file the trainer writes beside its checkpoints (``rounds.read_dc_metrics``), not from MLflow."""
    from dcgrpo.verl_plugin.rounds import read_dc_metrics

    steps = read_dc_metrics(directory, first_step, last_step)
    last: dict[str, float] = {}
    for row in steps.values():  # in step order: each key's value at the last step that recorded it
        last.update(row)
    scalars = {k: float(v) for k, v in last.items() if k.startswith("dc/")}
    d = [row["dc/discrepancy_mean"] for row in steps.values() if "dc/discrepancy_mean" in row]
    if not d:
        log.warning("%s: the trainer recorded no dc/discrepancy_mean for steps %d..%d", directory, first_step + 1,
                    last_step)  # fmt: skip
    return scalars, (sum(d) / len(d) if d else float("nan"))


def latest_model_dir(model_dir: str) -> str:
    """The HF model directory of a Model artifact (the latest checkpoint of a round), wherever its weights are."""
    from dcgrpo.train.checkpoint import resolve_checkpoint

    model_dir = resolve_model(model_dir)
    if _is_checkpoint_artifact(model_dir):
        return resolve_checkpoint(str(Path(model_dir) / "checkpoints"))
    return model_dir


def export_fp8_step(preset: str, overrides: list[str], model_dir: str, model_meta: dict, out_dir: str) -> dict:
    """The FP8 (compressed-tensors) export of the latest checkpoint."""
    from dcgrpo.export import export_fp8

    cfg = step_config(preset, overrides)
    report = export_fp8(latest_model_dir(model_dir), out_dir, cfg.export)
    return {
        **{k: model_meta[k] for k in ("method", "mlflow_run_id") if k in model_meta},
        "scheme": report.scheme, "source_bytes": report.source_bytes, "export_bytes": report.export_bytes,
        "quantized_weights": report.quantized,
    }  # fmt: skip


# ------------------------------------------------------------------ evaluation


def _eval_target(cfg: RunConfig, model_dir: str, fp8_dir: str) -> tuple[str, RunConfig]:
    """What the deploy engine evaluates.

    On a GPU: the FP8 export itself (vLLM's FP8 kernels). On CPU vLLM has no
    FP8 kernels, so the latest checkpoint is served with ``rollout.precision=fp8``:
    weights rounded by the same quantiser as the export (``engines/fp8.py``),
    which tests/test_fp8_export.py checks equals the export bit for bit.
    """
    from dcgrpo.engines.vllm_engine import has_cuda

    if has_cuda():
        return fp8_dir, cfg
    return latest_model_dir(model_dir), cfg.model_copy(
        update={"rollout": cfg.rollout.model_copy(update={"precision": "fp8"})}
    )


class Evaluated(NamedTuple):
    scalars: dict[str, float]
    gate_value: float
    reference_meta: dict[str, Any]
    """Added to the model reference's metadata: ``eval_metrics`` and ``eval_engine``."""


def evaluate_step(
    preset: str,
    overrides: list[str],
    mlflow_uri: str,
    dataset_dir: str,
    model_meta: dict[str, Any],
    model_dir: str,
    fp8_dir: str,
    report_path: str,
) -> Evaluated:
    """avg@k per benchmark on the deployed (FP8) model; logs to the method's MLflow run.

    Returns ``Evaluated``: scalars for the Metrics artifact, the gate metric's value, and the metadata the model
    reference carries on to registration (the metrics and the engine: no MLflow round trip). The ``synthetic``
    benchmark is the held-out split of the synthetic task, drawn as ``prepare_data`` drew it from the same config.
    """
    from dcgrpo.engines import engine_version
    from dcgrpo.evaluate import evaluate
    from dcgrpo.plots import write_report
    from dcgrpo.tracking import start_run

    cfg = step_config(preset, overrides, mlflow_uri)
    target, eval_cfg = _eval_target(cfg, model_dir, fp8_dir)
    out = tempfile.mkdtemp(prefix="dcgrpo-eval-")
    with start_run(cfg.tracking, storage_root=str(_local_root(cfg)), run_id=model_meta["mlflow_run_id"]) as run:
        report = evaluate(target, eval_cfg, out, run=run, progress=False)
        metrics = report.metrics()
        run.set_tags({EVAL_METRICS_TAG: json.dumps(metrics), EVAL_ENGINE_TAG: engine_version()})
    gate = cfg.eval.gate_metric
    if gate not in metrics:
        raise KeyError(f"eval.gate_metric {gate!r} was not measured; measured: {sorted(metrics)}")
    plot = Path(resolve_model(model_dir)) / "plots" / "dc_curves.png"
    write_report(
        report_path, f"dcgrpo evaluation: {model_meta.get('method', '')}",
        report_summary(cfg, model_meta, gate, metrics[gate], engine_version()), report.table(), plot,
        note=f"{report.settings_line()}. {report.throughput_line()} Scores in percent; the gate reads {gate} as a "
        "fraction.",
    )  # fmt: skip
    scalars = {k: float(v) for k, v in metrics.items()}  # MLflow's names, in KFP too
    return Evaluated(scalars, float(metrics[gate]), {"eval_metrics": metrics, "eval_engine": engine_version()})


def report_summary(
    cfg: RunConfig, meta: dict[str, Any], gate: str, gate_value: float, eval_engine: str
) -> dict[str, Any]:
    """The head table of a method's evaluation report: the names and values the demo table, MLflow and the
    registry show for the same quantities (KFP metadata turns integers into floats: they are ints again here)."""

    def num(key: str) -> Any:
        value = meta.get(key)
        return int(value) if isinstance(value, float) and value.is_integer() and key in ("round", "step") else value

    rows = {
        "method": meta.get("method", ""),
        "rounds trained": num("round"),
        "steps": num("step"),
        f"lambda after the last step ({LAMBDA_KEY})": meta.get("lambda"),
        f"mean d, last round ({ROUND_DISCREPANCY})": meta.get("discrepancy"),
        f"{gate} (gate, FP8)": gate_value,
        "promotion limit on mean d": cfg.promotion_discrepancy_limit(),
        "rollouts": f"{cfg.rollout.precision} on {meta.get('rollout_engine', '?')}",
        "evaluation": f"fp8 on {eval_engine}",
        "MLflow run": meta.get("mlflow_run_id", ""),
    }
    return {k: v for k, v in rows.items() if v is not None}


# ------------------------------------------------------------------ selection, registry


def model_reference(model_uri: str, model_dir: str, model_meta: dict[str, Any], fp8_uri: str) -> dict[str, Any]:
    """What evaluate hands on to select_best and register_model instead of weights (issue 12, point 8).

    The artifact URIs of the HF model (the latest checkpoint inside a round's
    artifact) and of the FP8 export, with the round's metadata: the light
    steps pass and register these references; they never download a model
    (a KFP task downloads every input artifact, so they take none).
    """
    weights = resolve_model(model_dir)
    if weights != model_dir:  # the weights stay on the checkpoint volume: a URI KServe and people can read
        return {"model_uri": volume_uri(latest_model_dir(model_dir)), "fp8_uri": fp8_uri, "metadata": dict(model_meta)}
    sub = Path(os.path.relpath(latest_model_dir(model_dir), model_dir)).as_posix()
    hf_uri = model_uri if sub == "." else f"{model_uri.rstrip('/')}/{sub}"
    return {"model_uri": hf_uri, "fp8_uri": fp8_uri, "metadata": dict(model_meta)}


def volume_uri(path: str) -> str:
    """``pvc://<claim>/<path>`` (KServe's storageUri scheme) of a directory on a mounted pipeline volume."""
    from dcgrpo.deploy import current

    c = current()
    mounts = {os.environ.get(MODEL_STORE_ENV) or c.checkpoint_mount: c.checkpoint_pvc,
              os.environ.get("DCGRPO_MODEL_CACHE") or c.model_cache_mount: c.model_cache_pvc}  # fmt: skip
    for mount, claim in mounts.items():
        if Path(path).resolve().is_relative_to(Path(mount).resolve()):
            return f"pvc://{claim}/{Path(path).resolve().relative_to(Path(mount).resolve()).as_posix()}"
    raise ValueError(f"{path} is on no pipeline volume ({', '.join(mounts)})")


class Best(NamedTuple):
    method: str
    gate_value: float
    reference: dict


def select_best_step(
    preset: str, overrides: list[str], methods: list[str], gate_values: list[float], references: list[dict]
) -> Best:
    """The best method (``stages.registration.best_method_index``: within the promotion discrepancy limit) and its
    ``model_reference`` (nothing is copied: the weights stay where evaluate read them)."""
    if not methods or len(methods) != len(gate_values) or len(references) != len(methods):
        raise ValueError(f"{len(methods)} methods, {len(gate_values)} gate values, {len(references)} models")
    cfg = step_config(preset, overrides)
    budget = cfg.promotion_discrepancy_limit()
    d = [float(r["metadata"].get("discrepancy", float("inf"))) for r in references]  # none recorded: never within
    i = best_method_index(cfg, [float(g) for g in gate_values], d)
    log.info("best method: %s (gate %s; discrepancy %s; budget %.3g)", methods[i],
             dict(zip(methods, gate_values, strict=True)), dict(zip(methods, d, strict=True)), budget)  # fmt: skip
    return Best(methods[i], float(gate_values[i]), references[i])


def _run_summary(client, run_id: str, meta: dict[str, Any]) -> tuple[dict[str, float], float, str | None]:
    """(eval metrics, final lambda, evaluation engine): from the model reference's metadata when evaluate and the
    last round handed them on (the pipeline), else from the method's MLflow run (a reference from elsewhere)."""
    if meta.get("eval_metrics") and meta.get("lambda") is not None:
        return dict(meta["eval_metrics"]), float(meta["lambda"]), meta.get("eval_engine")
    run = client.get_run(run_id)
    metrics = json.loads(run.data.tags.get(EVAL_METRICS_TAG, "{}"))
    if not metrics:
        raise RuntimeError(f"MLflow run {run_id} has no evaluation results ({EVAL_METRICS_TAG}); evaluate first")
    last = run.data.metrics  # lambda after the last step (dc/lambda is the one the last step used)
    return metrics, last.get("dc/lambda_next", last.get("dc/lambda", float("nan"))), run.data.tags.get(EVAL_ENGINE_TAG)


def register_step(
    preset: str, overrides: list[str], mlflow_uri: str, model_name: str, model_meta: dict, model_dir: str,
    fp8_dir: str, force: bool = False,
) -> Registered:  # fmt: skip
    """Register the FP8 export (and the bf16 checkpoint) and evaluate the promotion gate.

    ``model_dir``/``fp8_dir`` are local paths (kfp.local, tests: uploaded as
    MLflow run artifacts, served through MLflow's artifact proxy) or artifact
    URIs (a cluster: registered by reference, nothing downloaded or uploaded).

    ``passes_gate`` decides whether the pipeline's promote task runs at all, so
    ``force`` (the run's ``force_promotion``) lets it run on a failed gate too;
    promote then records the decision as forced. Registration and gate: ``stages.registration.register_and_gate`` (as
    ``dcgrpo register``).
    """
    cfg = step_config(preset, overrides, mlflow_uri)
    mlc = _mlflow_client(cfg)
    run_id = model_meta["mlflow_run_id"]
    metrics, lam, eval_engine = _run_summary(mlc, run_id, model_meta)
    by_ref = _is_remote(model_dir)  # a cluster's artifact store: register where it is; a local path: upload
    bf16 = _weights_uri(model_dir) if by_ref else latest_model_dir(model_dir)
    fp8 = _weights_uri(fp8_dir) if by_ref else fp8_dir
    return register_and_gate(
        mlc, cfg, model_name, run_id, fp8, metrics=metrics, final_lambda=lam,
        discrepancy=float(model_meta["discrepancy"]), bf16_twin=bf16, by_reference=by_ref,
        rollout_engine=model_meta.get("rollout_engine"), eval_engine=eval_engine, force=force,
    )  # fmt: skip


def _is_remote(uri: str) -> bool:
    """An object-store URI (the cluster's KFP artifacts), as opposed to a local path (kfp.local, the CLI)."""
    return "://" in str(uri)


def _weights_uri(uri: str) -> str:
    """The URI serving reads: KFP's default MinIO store names its artifacts ``minio://bucket/key``, which is
    ``s3://bucket/key`` for KServe and vLLM (the serving account's S3 endpoint annotation points at MinIO)."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri


def promote_step(preset: str, overrides: list[str], mlflow_uri: str, model_name: str, version: str, force: bool) -> str:
    """Promote ``version`` (the one register_step returned) through the registry's gate.

    Bound to that version even if another run has registered a newer challenger
    meanwhile; the registry's promotion lock orders concurrent runs. ``stages.registration.promote_version`` (as
    ``dcgrpo promote``).
    """
    cfg = step_config(preset, overrides, mlflow_uri)
    # registry.serve_on_promote: the InferenceService is applied before the alias moves (the registry's serve hook).
    decision = promote_version(_mlflow_client(cfg), cfg, model_name, version, force=force,
                               serve=cfg.registry.serve_on_promote)  # fmt: skip
    return f"{'promoted' if decision.promoted else 'not promoted'}: {decision.reason}"


def mark_failed_step(mlflow_uri: str, kfp_run_id: str, state: str, error: str = "") -> int:
    """Exit handler: when the pipeline did not succeed, mark its unfinished MLflow runs FAILED.

    Returns the number of runs marked. A succeeded pipeline changes nothing.
    """
    if state.upper() in ("SUCCEEDED", "SKIPPED"):
        return 0
    mlc = _mlflow_client(step_config("", [], mlflow_uri))
    experiments = [e.experiment_id for e in mlc.search_experiments()]
    runs = mlc.search_runs(experiments, filter_string=f"tags.{KFP_RUN_TAG} = '{kfp_run_id}'") if experiments else []
    for run in runs:
        # KFP says only which group failed ("Task exit-handler-1 failed."); the failing step's own exception is
        # the tag dcgrpo.error of the run it was writing to, when it was writing to one.
        own = run.data.tags.get("dcgrpo.error")
        note = f"; this run's own error: {own}" if own else "; the failed step's log in KFP says why"
        mlc.set_tag(run.info.run_id, "dcgrpo.pipeline_error",
                    f"pipeline run {kfp_run_id} ended {state}: {error or state}{note}"[:5000])  # fmt: skip
        mlc.set_terminated(run.info.run_id, "FAILED")
    log.warning("pipeline %s ended %s: marked %d MLflow run(s) FAILED", kfp_run_id, state, len(runs))
    return len(runs)
