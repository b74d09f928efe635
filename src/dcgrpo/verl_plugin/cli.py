"""``dcgrpo train-verl``: the pipeline train step's verl backend.

    dcgrpo train-verl --preset qwen3-8b --train-files s3://b/prep/train.parquet --round 1
        renders the verl overrides and a RayJob, submits it, follows it to the end
    ... --mode single-node      runs verl in this pod instead (one machine)
    ... --dry-run               prints the RayJob YAML (or the verl command) and exits

Exit 0 when training finished, 1 when the job failed (its error is printed).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

import yaml

from dcgrpo import deploy
from dcgrpo.config import ConfigError, load_config
from dcgrpo.deploy import DeploymentContract
from dcgrpo.verl_plugin.config import ray_env_overrides, render_env, render_overrides, train_command
from dcgrpo.verl_plugin.rayjob import RayJobFailed, render_rayjob, run_rayjob, run_single_node

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train-files", required=True, help="prepared training parquet (verl schema), local or s3://")
    p.add_argument("--val-files", help="prepared validation parquet (default: the training files)")
    p.add_argument("--model-path", help="HF model directory (default: model.path)")
    p.add_argument("--round", type=int, help="pipeline round r: stop after step r x steps_per_round (default: all)")
    p.add_argument("--mode", choices=["rayjob", "single-node"], default="rayjob",
                   help="rayjob: submit a KubeRay RayJob and follow it (default); single-node: run verl here")  # fmt: skip
    p.add_argument("--name", help="RayJob / experiment name (default: tracking.run_name or the config hash)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: tracking.mlflow_uri)")
    p.add_argument("--mlflow-run-id", help="attach verl's MLflow logger to this run")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--namespace", help="RayJob namespace (default: this pod's, else the deployment contract's)")
    p.add_argument("--image", help="image of the Ray nodes (default: the deployment contract's verl_image)")


def _contract(args: argparse.Namespace) -> DeploymentContract:
    """The deployment contract (``dcgrpo.deploy.current()``) with this command's --namespace/--image."""
    update = {"namespace": args.namespace, "verl_image": args.image}
    return deploy.current().model_copy(update={k: v for k, v in update.items() if v})


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, preset=args.preset)
    name = args.name or cfg.tracking.run_name or f"dcgrpo-verl-{cfg.config_hash()}"
    if args.round is not None and not 1 <= args.round <= cfg.train.rounds:
        raise ConfigError(f"--round {args.round}: must be between 1 and train.rounds ({cfg.train.rounds})")
    stop = args.round * cfg.train.steps_per_round if args.round else None
    overrides = render_overrides(
        cfg, train_files=args.train_files, val_files=args.val_files, model_path=args.model_path, experiment_name=name
    )
    env = render_env(cfg, args.mlflow_uri, args.mlflow_run_id)
    try:
        if args.mode == "single-node":
            overrides = overrides + ray_env_overrides(env)
            if args.dry_run:
                print(shlex.join(train_command(overrides, python=sys.executable, stop_at_step=stop)))
                return 0
            run_single_node(overrides, env=env, stop_at_step=stop)
        else:
            if args.dry_run:
                body = render_rayjob(cfg, overrides, name=name, env=env, stop_at_step=stop, contract=_contract(args))
                yaml.safe_dump(body, sys.stdout, sort_keys=False)
                return 0
            run_rayjob(cfg, overrides, name=name, env=env, stop_at_step=stop, contract=_contract(args))
    except RayJobFailed as exc:
        print(f"dcgrpo train-verl: {exc}", file=sys.stderr)
        return 1
    return 0
