"""Models by reference: how weights travel between pipeline steps without going through the KFP artifact store.

On a cluster the GPU steps mount the checkpoint volume (``$DCGRPO_MODEL_STORE``) and the model cache
(``$DCGRPO_MODEL_CACHE``); a step writes its weights there and its Model artifact holds only a reference
(``model_ref.json``: ``{"path": <directory>}``). The light steps pass on URIs (``model_reference``) and never
download a model. Where no volume is mounted (kfp.local, tests) the artifact holds the weights themselves.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dcgrpo.deploy import current
from dcgrpo.models import ModelNotFoundError
from dcgrpo.train.checkpoint import resolve_checkpoint

log = logging.getLogger(__name__)

MODEL_STORE_ENV = "DCGRPO_MODEL_STORE"
"""Where GPU steps write weights that later steps read in place: the checkpoint volume's mount (set by the pipeline
on every GPU task, which all mount that volume). Unset or not mounted: weights go into the step's own artifact."""
MODEL_CACHE_ENV = "DCGRPO_MODEL_CACHE"
MODEL_REF_FILE = "model_ref.json"
"""What a Model artifact holds when its weights stay on a shared volume: ``{"path": <directory>}``."""


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
        raise ModelNotFoundError(
            f"{artifact_dir}: its weights are referenced at {target}, which is not there: mount the checkpoint "
            f"volume on this step (${MODEL_STORE_ENV}) or, for a cached task whose files were deleted, run with "
            "caching off"
        )
    return target


def on_shared_volume(path: Path) -> bool:
    """Under the model-cache or checkpoint volume's mount, so a later step can read it in place."""
    mounts = [os.environ.get(k) for k in (MODEL_CACHE_ENV, MODEL_STORE_ENV)]
    return any(m and Path(m).is_dir() and path.resolve().is_relative_to(Path(m).resolve()) for m in mounts)


def is_checkpoint_artifact(model_dir: str) -> bool:
    """A training output (``checkpoints/`` inside) rather than a plain HF model directory."""
    return (Path(resolve_model(model_dir)) / "checkpoints").is_dir()


def latest_model_dir(model_dir: str) -> str:
    """The HF model directory of a Model artifact (the latest checkpoint of a training), wherever its weights are."""

    model_dir = resolve_model(model_dir)
    if is_checkpoint_artifact(model_dir):
        return resolve_checkpoint(str(Path(model_dir) / "checkpoints"))
    return model_dir


def model_reference(model_uri: str, model_dir: str, model_meta: dict[str, Any], fp8_uri: str) -> dict[str, Any]:
    """What evaluate hands on to select_best and register_model instead of weights.

    The artifact URIs of the HF model (the latest checkpoint inside a training's
    artifact) and of the FP8 export, with the training's metadata: the light
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

    c = current()
    mounts = {os.environ.get(MODEL_STORE_ENV) or c.checkpoint_mount: c.checkpoint_pvc,
              os.environ.get(MODEL_CACHE_ENV) or c.model_cache_mount: c.model_cache_pvc}  # fmt: skip
    for mount, claim in mounts.items():
        if Path(path).resolve().is_relative_to(Path(mount).resolve()):
            return f"pvc://{claim}/{Path(path).resolve().relative_to(Path(mount).resolve()).as_posix()}"
    raise ValueError(f"{path} is on no pipeline volume ({', '.join(mounts)})")


def is_remote(uri: str) -> bool:
    """An object-store URI (the cluster's KFP artifacts), as opposed to a local path (kfp.local, the CLI)."""
    return "://" in str(uri)


def weights_uri(uri: str) -> str:
    """The URI serving reads: KFP's default MinIO store names its artifacts ``minio://bucket/key``, which is
    ``s3://bucket/key`` for KServe and vLLM (the serving account's S3 endpoint annotation points at MinIO)."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri
