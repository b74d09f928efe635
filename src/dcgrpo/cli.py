"""`dcgrpo` command line: a thin shell over library functions.

Every subcommand takes ``--config FILE``, ``--preset NAME`` and repeated
``--set section.field=value`` overrides, resolved by ``dcgrpo.config`` alone.
Errors a user can fix (bad config, missing file, unreachable server) print one
clear message and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from dcgrpo.config import ConfigError, RunConfig, load_config

log = logging.getLogger("dcgrpo")


class UserError(RuntimeError):
    """A failure caused by input or environment, reported without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (sections as in dcgrpo.config)")
    p.add_argument("--preset", help="tiny-cpu (default), qwen3-8b or qwen3-30b-a3b")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-5 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides, preset=args.preset)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the fully resolved config as YAML (what a run would use)."""
    cfg = config_from_args(args)
    print(f"# preset: {cfg.preset}  hash: {cfg.config_hash()}")
    print(cfg.to_yaml(), end="")
    return 0


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="grpo,dc-grpo", help="comma-separated methods to run side by side")
    p.add_argument("--rounds", type=int, help="training rounds (default: the config's train.rounds)")
    p.add_argument("--data-uri", default="", help="prepared/raw DAPO parquet (local or s3://); empty = synthetic")
    p.add_argument("--model-uri", default="", help="HF-format base model (local or s3://); empty = tiny + SFT")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI seen from the pipeline pods")
    p.add_argument("--model-name", help="MLflow registered model name (default: registry.model_name)")
    p.add_argument("--force-promotion", action="store_true", help="promote even when the gate fails")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    p.add_argument("--experiment", default="dcgrpo", help="KFP experiment name")
    p.add_argument("--package", default=None, help="compiled pipeline YAML (default: pipelines/compiled/dc_grpo.yaml)")
    _pipeline_args(p)


def _arguments(args: argparse.Namespace) -> dict:
    from dcgrpo.pipeline import pipeline_arguments

    return pipeline_arguments(
        args.preset or "tiny-cpu", args.overrides, [m for m in args.methods.split(",") if m], args.rounds,
        args.data_uri, args.model_uri, args.mlflow_uri, args.model_name, args.force_promotion,
    )  # fmt: skip


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default=None, help="where to write the YAML (default: pipelines/compiled/dc_grpo.yaml)")
    p.add_argument("--image", help="image of the light (CPU) steps (default: components.DEFAULT_IMAGE)")
    p.add_argument("--trainer-image", help="image of the GPU steps (default: components.DEFAULT_TRAINER_IMAGE)")
    p.add_argument("--max-rounds", type=int, default=4, help="round tasks compiled in (runs use <= this many)")
    p.add_argument("--gpu-pool", default="cloud.google.com/gke-nodepool=gpu-pool", help="node selector KEY=VALUE")


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the pipeline to YAML for upload in the Kubeflow UI."""
    from components import DEFAULT_IMAGE, DEFAULT_TRAINER_IMAGE

    from dcgrpo.pipeline import COMPILED_PATH, compile_yaml

    key, _, value = args.gpu_pool.partition("=")
    if not value:
        raise UserError(f"--gpu-pool {args.gpu_pool!r}: expected KEY=VALUE")
    path = compile_yaml(
        args.output or COMPILED_PATH, image=args.image or DEFAULT_IMAGE,
        trainer_image=args.trainer_image or DEFAULT_TRAINER_IMAGE,
        max_rounds=args.max_rounds, gpu_node_selector=(key, value),
    )  # fmt: skip
    print(path)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit one pipeline run to a Kubeflow Pipelines endpoint."""
    from dcgrpo.pipeline import COMPILED_PATH, submit

    print(submit(args.host, _arguments(args), args.experiment, Path(args.package or COMPILED_PATH)))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Create a recurring run (max concurrency 1, no catch-up) for scheduled retraining."""
    from dcgrpo.pipeline import COMPILED_PATH, schedule

    try:
        job_id = schedule(args.host, args.cron, _arguments(args), args.experiment, args.job_name,
                          Path(args.package or COMPILED_PATH))  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(job_id)
    return 0


def _schedule_args(p: argparse.ArgumentParser) -> None:
    _cluster_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first: '0 0 3 * * 0' = Sundays 03:00")
    p.add_argument("--job-name", default="dcgrpo-retrain", help="recurring run name")


# name -> (handler, help, extra-argument adder). Later modules add their
# commands here; each handler is a few lines around one library call.
COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None] | None]
] = {
    "config": (cmd_config, "print the resolved run config", None),
    "compile": (cmd_compile, "compile the Kubeflow pipeline to YAML", _compile_args),
    "submit": (cmd_submit, "submit one pipeline run to Kubeflow", _cluster_args),
    "schedule": (cmd_schedule, "schedule recurring retraining on Kubeflow", _schedule_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        if add_args is not None:
            add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.handler(args)
    except (ConfigError, UserError, FileNotFoundError) as exc:
        print(f"dcgrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
