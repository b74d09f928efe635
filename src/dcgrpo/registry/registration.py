"""Registration: a model directory (local or s3://) becomes a model version with its gate tags.

    register  -> version N with tags (run, metrics, lambda, d, config hash, quantization, source), alias
                 ``challenger``; registering the same (run, source, quantization) again returns N

A registration that fails writes nothing: inputs are checked first; a version
or registered model it created is deleted again.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import NamedTuple

from dcgrpo import storage
from dcgrpo.config import RegistryConfig
from dcgrpo.registry.connection import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    MISSING,
    RegistryError,
    alias_version,
    check_model_name,
)
from dcgrpo.registry.promotion import gate
from dcgrpo.registry.tags import TAG_DECISION, TAG_QUANTIZATION, TAG_REASON, TAG_SOURCE_DIR, version_tags

log = logging.getLogger(__name__)

BF16_SUFFIX: str = RegistryConfig.model_fields["bf16_suffix"].default


def _source_id(model_dir: str) -> str:
    """The registered directory as recorded in ``source_dir``: s3:// as given, local paths absolute."""
    model_dir = str(model_dir).rstrip("/")
    return model_dir if storage.is_s3(model_dir) else str(Path(model_dir).resolve())


def _artifact_key(source_dir: str, quantization: str) -> str:
    """The run-artifact folder name of one registered directory: stable, so a retried registration of the same
    directory writes the same folder, and distinct for distinct directories."""
    return f"{quantization}-{hashlib.sha256(source_dir.encode()).hexdigest()[:12]}"


def _get_run(mlflow_client, name: str, run_id: str):
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in MISSING:
            raise RegistryError(f"{name}: run_id {run_id!r}: no such MLflow run") from exc
        raise


def _existing_version(mlflow_client, name: str, run_id: str, source_dir: str, quantization: str):
    """The version already registered from this run, directory and quantization, if any (oldest first)."""
    found = [
        mv
        for mv in mlflow_client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
        if mv.tags.get(TAG_SOURCE_DIR) == source_dir and mv.tags.get(TAG_QUANTIZATION) == quantization
    ]
    return min(found, key=lambda mv: int(mv.version), default=None)


def _oldest_of_duplicates(mlflow_client, name: str, mv, run_id: str, source_dir: str, quantization: str):
    """The version to keep when this directory got registered twice: a create retried after the server had done it
    (MLflow's HTTP retries), or two registrations racing. The oldest stays; ours is deleted if it is not that one."""
    oldest = _existing_version(mlflow_client, name, run_id, source_dir, quantization)
    if oldest is None or oldest.version == mv.version:
        return mv
    log.warning("registry: %s v%s duplicates v%s (same run %s, %s): deleting v%s",
                name, mv.version, oldest.version, run_id, source_dir, mv.version)  # fmt: skip
    _delete_version_quietly(mlflow_client, name, mv.version)
    return oldest


def _delete_version_quietly(mlflow_client, name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    try:
        mlflow_client.delete_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in MISSING:  # a retried delete that went through the first time
            raise


def _ensure_registered_model(mlflow_client, name: str) -> bool:
    """Create the registered model if it is missing; True if this call created it."""
    from mlflow.exceptions import MlflowException  # mlflow: `dcgrpo submit` runs without it

    try:
        mlflow_client.create_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def _undo_registration(mlflow_client, name: str, version: str | None, created_model: bool) -> None:
    """Best-effort removal of what a failed registration wrote (the caller re-raises its error)."""
    try:
        if version is not None:
            mlflow_client.delete_model_version(name, version)
        # Only a model this call created, and only while empty: another run may have registered meanwhile.
        if created_model and not mlflow_client.search_model_versions(f"name='{name}'"):
            mlflow_client.delete_registered_model(name)
    except Exception as exc:  # the registry may be what failed
        log.warning("registry: could not undo the failed registration of %s v%s: %s", name, version, exc)


def _check_values(name: str, values: dict[str, float]) -> None:
    check_model_name(name)
    for key, value in values.items():
        if not math.isfinite(float(value)):
            raise RegistryError(f"{name}: {key} is {value}; refusing to register a version with a non-finite value")


def _upload(mlflow_client, run, model_dir: str, source_dir: str, quantization: str, artifact_path: str,
            endpoint_url: str | None) -> str:  # fmt: skip
    """Log ``model_dir`` as run artifacts; the version's source URI.

    One artifact folder per (directory, quantization) of the run: a second directory registered from the same
    run never rewrites the files an earlier version (a served champion) points at."""
    artifact_path = f"{artifact_path}/{_artifact_key(source_dir, quantization)}"
    with storage.local_copy(model_dir, endpoint_url) as local:
        if not (Path(local) / "config.json").is_file():
            raise RegistryError(f"{model_dir}: not a model directory (no config.json)")
        mlflow_client.log_artifacts(run.info.run_id, str(local), artifact_path)
    return f"{run.info.artifact_uri}/{artifact_path}"


def _create_version(mlflow_client, name: str, source: str, run_id: str, tags: dict[str, str], alias: str):
    """Create the version and alias it; on failure, delete what this call created and re-raise."""
    source_dir, quantization = tags[TAG_SOURCE_DIR], tags[TAG_QUANTIZATION]
    created_model = _ensure_registered_model(mlflow_client, name)
    version = None
    try:
        mv = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        version = mv.version
        mv = _oldest_of_duplicates(mlflow_client, name, mv, run_id, source_dir, quantization)
        if mv.version != version:
            version = None  # ours was the duplicate (deleted); the one kept may be another caller's: not ours to undo
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
    except Exception:
        _undo_registration(mlflow_client, name, version, created_model)
        raise
    return mv


def register_model(
    mlflow_client,
    name: str,
    run_id: str,
    model_dir: str,
    *,
    metrics: dict[str, float],
    final_lambda: float,
    discrepancy: float,
    config_hash: str,
    quantization: str = "fp8",
    artifact_path: str = "model",
    alias: str = CHALLENGER_ALIAS,
    endpoint_url: str | None = None,
    by_reference: bool = False,
    engines: dict[str, str] | None = None,
):
    """Log ``model_dir`` (local or s3://) as run artifacts, register it as a new version, alias it.

    ``by_reference``: ``model_dir`` is an object-store URI (a pipeline's artifact on the cluster) that
    becomes the version's source and ``storage_uri`` as it is: nothing is downloaded or uploaded.

    Idempotent: if this run already registered this directory with this
    quantization (a retried pipeline step, a repeated command), that version
    gets the alias and is returned; nothing is uploaded or created again.
    Inputs (values, run, directory) are checked before anything is written;
    if a later write fails, the version (and a registered model this call
    created) is deleted again, so a failed registration leaves the registry as it was.
    """
    _check_values(name, {"final_lambda": final_lambda, "discrepancy": discrepancy, **metrics})
    run = _get_run(mlflow_client, name, run_id)
    source_dir = str(model_dir).rstrip("/") if by_reference else _source_id(model_dir)
    mv = _existing_version(mlflow_client, name, run_id, source_dir, quantization)
    if mv is not None:
        mlflow_client.set_registered_model_alias(name, alias, mv.version)
        log.info("registry: %s version %s reused (same run %s, %s, %s), alias %s",
                 name, mv.version, run_id, source_dir, quantization, alias)  # fmt: skip
        return mv
    source = source_dir
    if not by_reference:
        source = _upload(mlflow_client, run, model_dir, source_dir, quantization, artifact_path, endpoint_url)
    tags = version_tags(
        run_id, metrics, final_lambda, discrepancy, config_hash, quantization,
        storage_uri=str(model_dir) if by_reference or storage.is_s3(model_dir) else None, source_dir=source_dir,
        engines=engines,
    )  # fmt: skip
    mv = _create_version(mlflow_client, name, source, run_id, tags, alias)
    log.info("registry: %s version %s registered (%s), alias %s", name, mv.version, quantization, alias)
    return mv


class Registered(NamedTuple):
    version: str
    passes_gate: bool
    """The gate passed, or ``force``: whether a promotion should follow."""
    reason: str
    model_name: str
    """The registered model the version belongs to (``+ bf16_suffix`` for a bf16 registration)."""


def register_candidate(
    mlflow_client,
    model_name: str,
    run_id: str,
    model_dir: str,
    *,
    gate_metric: str,
    max_discrepancy: float,
    quantization: str = "fp8",
    bf16_twin: str | None = None,
    bf16_suffix: str = BF16_SUFFIX,
    champion_alias: str = CHAMPION_ALIAS,
    force: bool = False,
    **common,
) -> Registered:
    """Register ``model_dir`` (``register_model``; ``common``: its keyword arguments) and gate it against its
    model's champion (``gate_metric``, ``max_discrepancy``: ``promotion.gate``'s).

    ``quantization`` "bf16" registers under ``model_name + bf16_suffix``; ``bf16_twin``: the unquantised checkpoint
    of an FP8 export, registered there first, with the same tags. A failed gate is recorded on the version
    (``promotion.decision=rejected`` and its reason) unless ``force``: then a promotion follows, which records its
    own decision. Returns ``passes_gate`` = passed or forced.
    """
    twin_name = model_name + bf16_suffix
    if bf16_twin is not None:
        register_model(mlflow_client, twin_name, run_id, bf16_twin, quantization="bf16", artifact_path="model-bf16",
                       **common)  # fmt: skip
    name = twin_name if quantization == "bf16" else model_name
    artifact_path = "model-bf16" if quantization == "bf16" else "model"
    mv = register_model(mlflow_client, name, run_id, model_dir, quantization=quantization,
                        artifact_path=artifact_path, **common)  # fmt: skip
    champion = alias_version(mlflow_client, name, champion_alias)
    ok, reason = gate(mv, champion, gate_metric, max_discrepancy)
    if not ok and not force:  # no promotion (which records its own decision) follows: record this one
        mlflow_client.set_model_version_tag(name, mv.version, TAG_DECISION, "rejected")
        mlflow_client.set_model_version_tag(name, mv.version, TAG_REASON, reason)
    log.info("registered %s v%s; gate: %s (%s)%s", name, mv.version, ok, reason, "; forced" if force else "")
    return Registered(str(mv.version), ok or force, reason if ok or not force else f"forced (gate said: {reason})",
                      name)  # fmt: skip
