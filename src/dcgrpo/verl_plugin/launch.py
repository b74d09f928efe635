"""``python -m dcgrpo.verl_plugin.launch [--stop-at-step N] <verl overrides>``: what every verl launch runs.

It writes (or, without ``--stop-at-step``, removes) ``ROUND_FILE`` in the
run's ``trainer.default_local_dir`` and then runs ``verl.trainer.main_ppo``
in this process with the overrides, so one RayJob or one in-pod launch trains
exactly one pipeline round: the ``dc_grpo`` trainer reads the file and stops
after step N with a checkpoint. Imports nothing from verl itself (verl is run
as ``__main__``). The other files a launch leaves beside the checkpoints for the
pipeline's train step are defined here too: ``ENGINE_FILE`` and ``DC_METRICS_FILE``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from dcgrpo.engines import engine_version
from dcgrpo.verl_plugin import ROUND_FILE

TRAIN_MAIN = "verl.trainer.main_ppo"
LOCAL_DIR_KEY = "trainer.default_local_dir"


def local_dir_of(overrides: list[str]) -> str:
    """The value of ``trainer.default_local_dir=`` in ``overrides`` (the last one wins, as in Hydra)."""
    found = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.lstrip("+").startswith(LOCAL_DIR_KEY + "=")]
    if not found:
        raise SystemExit(f"dcgrpo launch: {LOCAL_DIR_KEY}=... missing from the verl overrides")
    return found[-1]


def write_round_file(local_dir: str | Path, stop_at_step: int | None) -> Path:
    """Record (or clear, with None) where this launch stops; atomic."""
    path = Path(local_dir) / ROUND_FILE
    if stop_at_step is None:
        path.unlink(missing_ok=True)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stop_at_step": int(stop_at_step)}))
    os.replace(tmp, path)
    return path


ENGINE_FILE = "rollout_engine.json"
"""What the launch records of its rollout engine (the verl image's vLLM): the registry tags it on the model."""


def write_engine_file(local_dir: str | Path) -> Path:
    """``{"rollout_engine": "vllm <version>", "verl": <version>}`` of this image, in the run's checkpoint dir."""
    try:
        verl = version("verl")
    except PackageNotFoundError:
        verl = "not installed"
    path = Path(local_dir) / ENGINE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rollout_engine": f"{engine_version()} (verl {verl})", "verl": verl}))
    return path


DC_METRICS_FILE = "dc_metrics.jsonl"
"""The ``dc/*`` metrics of each step, one JSON line ``{"step": N, "dc/...": value, ...}`` a step, appended by the
``dc_grpo`` trainer beside its checkpoints: what the pipeline's train step reads back (verl logs the same values
to MLflow for people). A step a resumed launch redid appears again, later in the file."""


def append_dc_metrics(local_dir: str | Path, step: int, metrics: dict[str, float]) -> Path:
    """Append step ``step``'s ``metrics`` to ``DC_METRICS_FILE`` as one line, flushed to disk before returning.

    A line an earlier crash cut short is ended first, so it stays one unreadable line the reader skips.
    """
    path = Path(local_dir) / DC_METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n"
    with open(path, "a+b") as f:  # appends go to the end whatever the read position
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 1, 0))
        torn = size > 0 and f.read(1) != b"\n"
        f.write((b"\n" if torn else b"") + line.encode())
        f.flush()
        os.fsync(f.fileno())
    return path


def read_stop_step(local_dir: str | Path) -> int | None:
    """The step this launch stops after, or None (train to ``total_training_steps``)."""
    path = Path(local_dir) / ROUND_FILE
    if not path.is_file():
        return None
    return int(json.loads(path.read_text())["stop_at_step"])


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    stop = None
    if args[:1] == ["--stop-at-step"]:
        if len(args) < 2 or not args[1].isdigit() or int(args[1]) < 1:
            raise SystemExit(f"dcgrpo launch: --stop-at-step needs a positive step, got {args[1:2]}")
        stop, args = int(args[1]), args[2:]
    write_round_file(local_dir_of(args), stop)
    write_engine_file(local_dir_of(args))
    sys.argv = [TRAIN_MAIN, *args]
    runpy.run_module(TRAIN_MAIN, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
