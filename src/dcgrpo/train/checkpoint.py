"""Training checkpoints: an HF model directory plus the exact loop state.

Layout of one checkpoint (``<out_dir>/checkpoints/step_000008/``, local or s3://)::

    config.json, tokenizer files        -> loadable by vLLM / transformers / export as is
    model.safetensors                   policy weights (fp32)
    trainer/optimizer.safetensors       AdamW state tensors ("<param index>.<name>")
    state.json                          step, round, lambda state, optimizer scalars,
                                        RNG states, data cursor, config hash, history
    manifest.json                       sha256 of every file above (written last)

Atomicity: the directory is assembled in a local temp dir and published by
``dcgrpo.storage.upload_dir`` (staging dir + rename locally; ``_COMPLETE``
marker last on S3). ``<out_dir>/checkpoints/latest`` names the newest one and
is rewritten (atomically) only after it is complete. ``load_checkpoint``
verifies every checksum and raises ``CheckpointError`` naming the bad file.

Resuming from a ``checkpoints/`` directory takes its newest *complete*
checkpoint, not blindly ``latest``: a kill during an S3 upload leaves a
newer prefix without its marker, and a kill between publishing a checkpoint
and rewriting ``latest`` leaves the pointer one behind.
"""

from __future__ import annotations

import ast
import base64
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcgrpo import storage
from dcgrpo.errors import DcgrpoError

if TYPE_CHECKING:  # torch only where tensors are touched: resolve_checkpoint/verify_dir run on the light image
    import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"
# In a subdirectory: vLLM, the exporter and the engine load every top-level
# *.safetensors of a model directory as weights.
OPTIMIZER = "trainer/optimizer.safetensors"
MODEL_FILES_SKIP = {MANIFEST, storage.COMPLETE_MARKER}
STEP_DIR = re.compile(r"step_(\d+)")

log = logging.getLogger(__name__)


class CheckpointError(DcgrpoError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or from another config."""


@dataclass
class LoadedCheckpoint:
    uri: str
    local_dir: Path
    """A local HF model directory with the checkpoint's weights (temp copy for s3://)."""
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    import torch  # torch: not on the light image

    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": repr(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:

    import numpy as np  # numpy: `dcgrpo submit` runs without it
    import torch  # torch: not on the light image

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    random.setstate(ast.literal_eval(state["python"]))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and JSON scalars."""
    import torch  # torch: not on the light image

    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    uri: str,
    model,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    endpoint_url: str | None = None,
    keep: int | None = None,
) -> str:
    """Write a checkpoint atomically to ``uri`` (local or s3://); returns ``uri``. ``keep``: then prune the
    folder to the newest ``keep`` checkpoints (``prune_checkpoints``)."""
    from safetensors.torch import save_file  # torch (through safetensors.torch): not on the light image

    with tempfile.TemporaryDirectory(prefix="dcgrpo-ckpt-") as tmp:
        d = Path(tmp)
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        (d / OPTIMIZER).parent.mkdir()
        save_file(opt_tensors, str(d / OPTIMIZER))
        full_state = {"format_version": FORMAT_VERSION, **state, "optimizer": opt_meta}
        (d / STATE).write_text(json.dumps(full_state, indent=1, sort_keys=True))
        files = sorted(p for p in d.rglob("*") if p.is_file())
        manifest = {"files": {p.relative_to(d).as_posix(): _sha256(p) for p in files}}
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        storage.upload_dir(d, uri, endpoint_url)
    root = uri.rstrip("/").rsplit("/", 1)[0]
    storage.write_text(storage.join(root, "latest"), uri.rstrip("/").rsplit("/", 1)[1], endpoint_url)
    prune_checkpoints(root, keep, endpoint_url)
    return uri


def is_complete(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether ``uri`` holds a fully published checkpoint: its manifest locally (directories appear by
    rename), the completion marker on S3 (objects appear one by one; the marker is written last)."""
    if storage.is_s3(uri):
        return storage.exists(storage.join(uri, storage.COMPLETE_MARKER), endpoint_url)
    return (Path(uri) / MANIFEST).is_file()


def resolve_checkpoint(uri: str, endpoint_url: str | None = None) -> str:
    """A complete checkpoint URI as is; for a ``checkpoints/`` directory, its newest complete checkpoint.

    Raises ``CheckpointError`` naming the directory when it holds none (a run
    killed before or during its first checkpoint): there is nothing to resume.
    """
    uri = str(uri).rstrip("/")
    if is_complete(uri, endpoint_url):
        return uri
    if not storage.exists(uri, endpoint_url):
        raise CheckpointError(f"{uri}: no such checkpoint or checkpoints/ directory (the path does not exist): nothing "
                              "to resume; start it fresh (without --resume), or use --resume auto")  # fmt: skip
    steps = sorted((n for n in storage.list_dirs(uri, endpoint_url) if STEP_DIR.fullmatch(n)), reverse=True)
    for name in steps:
        candidate = storage.join(uri, name)
        if is_complete(candidate, endpoint_url):
            if name != steps[0]:
                log.warning("%s: newest checkpoint %s is incomplete (killed while writing?); resuming %s",
                            uri, steps[0], name)  # fmt: skip
            return candidate
    found = f"only incomplete ones: {', '.join(steps)}" if steps else "none"
    raise CheckpointError(
        f"{uri}: no complete checkpoint to resume from (no {MANIFEST} here; step_* checkpoints under it: {found}); "
        "a run killed before its first checkpoint leaves none: start it fresh (without --resume)"
    )


def verify_dir(local_dir: Path, uri: str) -> dict[str, Any]:
    """Check every file against ``manifest.json``; returns the manifest."""
    mpath = local_dir / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{uri}: no {MANIFEST} (incomplete or not a checkpoint)")
    manifest = json.loads(mpath.read_text())
    for rel, digest in manifest["files"].items():
        p = local_dir / rel
        if not p.is_file():
            raise CheckpointError(f"{uri}: {rel} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{uri}: checksum mismatch in {rel} (corrupted checkpoint)")
    return manifest


def load_checkpoint(uri: str, cache_dir: str | Path, endpoint_url: str | None = None) -> LoadedCheckpoint:
    """Fetch (if remote), verify checksums, and read a checkpoint's state."""
    from safetensors.torch import load_file  # torch (through safetensors.torch): not on the light image

    uri = resolve_checkpoint(str(uri), endpoint_url)
    if storage.is_s3(uri):
        local = Path(cache_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
        storage.download_dir(uri, local, endpoint_url)
    else:
        local = Path(uri)
    verify_dir(local, uri)
    state = json.loads((local / STATE).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{uri}: checkpoint format {state.get('format_version')} != {FORMAT_VERSION}")
    return LoadedCheckpoint(uri, local, state, load_file(str(local / OPTIMIZER)))


# --- the output folder: one run's, resumable, pruned ---------------------------------------------------------------

# A resume must train the same thing: these config sections must match the checkpoint's, except the fields below
# (how long to train, where to log and keep things).
RESUME_MUST_MATCH = ("data.", "model.", "rollout.", "train.", "method.", "reward.")
RESUME_MAY_CHANGE = ("train.rounds", "train.keep_checkpoints")


@contextmanager
def hold_out_dir(out_dir: str) -> Iterator[None]:
    """One training process per local output folder: an exclusive lock on ``<out_dir>/.dcgrpo-train.lock`` for
    the block (released by the OS if the process dies). A second process is refused naming the first.
    S3 folders have no such lock: there ``refuse_foreign_checkpoints`` and distinct --out per run are the rule."""
    if storage.is_s3(out_dir):
        yield
        return

    path = Path(out_dir) / ".dcgrpo-train.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise CheckpointError(
                f"{out_dir} is in use by another training process ({f.read().strip() or 'unknown'}): "
                "give each run its own --out, or wait for that one to end"
            ) from None
        f.truncate(0)
        f.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def find_resume_point(out_dir: str, endpoint_url: str | None = None) -> str | None:
    """The newest complete checkpoint under ``<out_dir>/checkpoints``, or None (nothing to resume: start)."""
    try:
        return resolve_checkpoint(storage.join(out_dir, "checkpoints"), endpoint_url)
    except CheckpointError:
        return None


def read_state(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """A checkpoint's ``state.json`` alone (no weights fetched)."""
    return json.loads(storage.read_text(storage.join(uri, STATE), endpoint_url))


def refuse_foreign_checkpoints(out_dir: str, endpoint_url: str | None = None) -> None:
    """A fresh run never writes into a folder holding another run's checkpoints (their steps would interleave)."""
    found = find_resume_point(out_dir, endpoint_url)
    if found is None:
        return
    st = read_state(found, endpoint_url)
    raise CheckpointError(
        f"{out_dir} already holds checkpoints of another run ({st.get('method')}, step {st.get('step')}, MLflow run "
        f"{st.get('mlflow_run_id')}, config {st.get('config_hash')}): continue it with --resume auto (or "
        f"--resume {storage.join(out_dir, 'checkpoints')}), or give this run its own --out"
    )


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``field: checkpoint value -> this run's value`` for every training field a resume may not change."""
    keys = sorted(k for k in set(saved) | set(now) if k.startswith(RESUME_MUST_MATCH) and k not in RESUME_MAY_CHANGE)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def check_resumable(state: dict[str, Any], uri: str, flat_config: dict[str, Any], config_hash: str) -> None:
    """Refuse (naming the fields) to resume a checkpoint with a config that trains something else."""
    saved = state.get("config")
    if saved is None:  # written before checkpoints carried their config: the hash is all there is
        if state.get("config_hash") != config_hash:
            raise CheckpointError(f"{uri}: written with config {state.get('config_hash')}, this run's is "
                                  f"{config_hash}; resume it with the config it was trained with")  # fmt: skip
        return
    diff = config_differences(saved, flat_config)
    if diff:
        raise CheckpointError(
            f"{uri}: this run's config trains something else than the checkpoint's ({'; '.join(diff)}); resume with "
            f"the same settings (only {', '.join(RESUME_MAY_CHANGE)}, tracking.*, storage.*, eval.*, export.* and "
            "registry.* may change), or start a new run with its own --out"
        )


def prune_checkpoints(root: str, keep: int | None, endpoint_url: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (and incomplete ones older than
    them); returns the names deleted. ``keep=None`` keeps everything."""
    if not keep:
        return []
    names = sorted((n for n in storage.list_dirs(root, endpoint_url) if STEP_DIR.fullmatch(n)), reverse=True)
    complete = [n for n in names if is_complete(storage.join(root, n), endpoint_url)]
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1]
    doomed = [n for n in names if n < oldest_kept]
    for name in doomed:
        storage.remove_dir(storage.join(root, name), endpoint_url)
    log.info("%s: kept the newest %d checkpoints, deleted %s", root, keep, ", ".join(doomed))
    return doomed
