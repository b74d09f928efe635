"""dcgrpo: DC-GRPO reinforcement learning for LLMs whose rollouts come from a quantized (FP8) inference engine, run
as a Kubeflow pipeline with MLflow tracking and registry. `dcgrpo demo` runs the whole pipeline on this machine.

Each subcommand is a few lines around one library function.

Every subcommand takes ``--config FILE``, ``--preset NAME`` and repeated
``--set section.field=value`` overrides, resolved by ``dcgrpo.config`` alone.
Errors a user can fix (bad config, missing file, unreachable server) print one
clear message and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from dcgrpo import cli_args, shutdown, storage
from dcgrpo.config import DEFAULT_PRESET, RunConfig, load_config
from dcgrpo.data.benchmarks import BenchmarkError
from dcgrpo.data.dapo import DapoSchemaError
from dcgrpo.deploy import DeploymentContract
from dcgrpo.errors import DcgrpoError
from dcgrpo.evaluate import load_benchmarks
from dcgrpo.models import parse_hf_id
from dcgrpo.pipeline import compile_yaml, default_compile_output, pipeline_arguments, schedule, submit
from dcgrpo.preflight import check_exists, check_writable
from dcgrpo.registry import ALREADY, load_metrics, version_by_alias
from dcgrpo.registry import client as registry_client
from dcgrpo.serving import render_champion_manifests
from dcgrpo.stages.data import prepare_dapo_tracked
from dcgrpo.stages.evaluate import evaluate_tracked
from dcgrpo.stages.registration import promote_version, register_and_gate, rollback_version
from dcgrpo.stages.train import train_job
from dcgrpo.tracking import tracking_uri
from dcgrpo.verl_plugin import cli as verl_cli

log = logging.getLogger("dcgrpo")


class UserError(DcgrpoError):
    """A failure caused by the command's arguments, reported without a traceback."""


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides, preset=args.preset)


def cmd_config(args: argparse.Namespace) -> int:
    """Print the fully resolved config as YAML (what a run would use)."""
    cfg = config_from_args(args)
    print(f"# preset: {cfg.preset}  hash: {cfg.config_hash()}")
    print(cfg.to_yaml(), end="")
    return 0


def _arguments(args: argparse.Namespace) -> dict:
    return pipeline_arguments(
        args.preset or DEFAULT_PRESET, args.overrides, [m for m in args.methods.split(",") if m], args.rounds,
        args.data_uri, args.model_uri, args.mlflow_uri, args.model_name, args.force_promotion,
    )  # fmt: skip


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the pipeline to YAML for upload in the Kubeflow UI."""
    if args.config or args.preset or args.overrides:
        raise UserError(
            "compile takes no run config: preset and overrides are pipeline parameters, given at "
            "submit/schedule time or in the Kubeflow UI"
        )

    update: dict = {"light_image": args.image, "gpu_image": args.trainer_image, "verl_image": args.verl_image,
                    "checkpoint_pvc": args.checkpoint_pvc, "checkpoint_mount": args.checkpoint_mount}  # fmt: skip
    if args.gpu_pool is not None:
        key, _, value = args.gpu_pool.partition("=")
        if not key or not value:
            raise UserError(f"--gpu-pool {args.gpu_pool!r}: expected KEY=VALUE")
        update["gpu_node_selector"] = {key: value}
    if args.accelerator_limit < 1:
        raise UserError(f"--accelerator-limit {args.accelerator_limit}: must be >= 1")
    defaults = DeploymentContract().model_dump()
    contract = DeploymentContract(**defaults | {k: v for k, v in update.items() if v is not None})
    if args.output:
        pods = {args.output: args.train_pod or "gpu"}
    elif args.train_pod:
        raise UserError("--train-pod needs --output FILE (without it, both packages are written)")
    else:
        pods = {default_compile_output(pod): pod for pod in ("gpu", "launcher")}
    for out, pod in pods.items():
        print(compile_yaml(out, contract, accelerator_limit=args.accelerator_limit, train_pod=pod))
    return 0


def _need_host(args: argparse.Namespace) -> None:
    if not args.host:
        raise UserError("no Kubeflow Pipelines endpoint: pass --host https://<kfp>/pipeline or set $KFP_HOST")


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit one pipeline run to a Kubeflow Pipelines endpoint."""
    _need_host(args)
    run_id, state = submit(
        args.host, _arguments(args), args.experiment, Path(args.package) if args.package else None,
        namespace=args.namespace,
        service_account=args.service_account, wait_s=args.wait_timeout if args.wait else None,
    )  # fmt: skip
    print(run_id if state is None else f"{run_id} {state}")
    if state is not None and state.upper() != "SUCCEEDED":
        print(f"dcgrpo submit: run {run_id} ended {state}", file=sys.stderr)
        return 1
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    """Create a recurring run (max concurrency 1, no catch-up) for scheduled retraining."""
    _need_host(args)
    try:
        job_id = schedule(args.host, args.cron, _arguments(args), args.experiment, args.job_name,
                          Path(args.package) if args.package else None, args.namespace,
                          args.service_account)  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(job_id)
    return 0


# --- export / register / promote (dcgrpo.export, dcgrpo.registry) ---------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    """Write an HF checkpoint (local or s3://) as an FP8 compressed-tensors checkpoint."""
    from dcgrpo.export import ExportError, export_fp8  # torch: not on the light image

    cfg = config_from_args(args)
    try:
        report = export_fp8(args.source, args.dest, cfg.export, cfg.storage.s3_endpoint_url)
    except ExportError as exc:
        raise UserError(str(exc)) from exc
    print(f"{report.dest}: {report.quantized} FP8 weights, {report.source_bytes} -> {report.export_bytes} bytes")
    return 0


def _tracking_client(cfg: RunConfig, uri: str | None):
    return registry_client(tracking_uri(cfg, uri))  # the pipeline steps' rule: one MLflow for both paths


def cmd_register(args: argparse.Namespace) -> int:
    """Register a model directory as a new version (alias challenger) with its gate tags, and gate it against the
    champion as the pipeline does (``stages.registration.register_and_gate``: a refused version records the rejection).

    Registering the same run, directory and quantization again prints the existing version.
    """
    cfg = config_from_args(args)
    metrics = load_metrics(args.metrics, "--metrics")  # before any server call: a typo fails fast
    registered = register_and_gate(
        _tracking_client(cfg, args.tracking_uri), cfg, args.model_name or cfg.registry.model_name, args.run_id,
        args.model_dir, metrics=metrics, final_lambda=args.final_lambda, discrepancy=args.discrepancy,
        quantization=args.quantization,
    )  # fmt: skip
    print(f"{registered.model_name} version {registered.version}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a version (default: the challenger, resolved once) to champion if it passes the gate (or --force),
    or roll back to an earlier one; with --serve (or registry.serve_on_promote) apply its InferenceService first;
    render serving manifests."""
    cfg = config_from_args(args)
    if args.model_name:
        cfg.registry.model_name = args.model_name
    reg = cfg.registry
    mlc = _tracking_client(cfg, args.tracking_uri)
    serve = args.serve or reg.serve_on_promote
    if args.rollback_to:
        decision = rollback_version(mlc, cfg, reg.model_name, args.rollback_to, serve=serve)
    else:
        version = args.version or version_by_alias(mlc, reg.model_name, reg.challenger_alias)
        decision = promote_version(mlc, cfg, reg.model_name, version, force=args.force, serve=serve)
    applied = serve and (decision.promoted or decision.reason == ALREADY)
    print(f"{reg.model_name} v{decision.challenger}: {'promoted' if decision.promoted else 'not promoted'}"
          f" ({decision.reason}); champion: v{decision.champion_after}"
          + (f"; InferenceService applied in namespace {reg.serving_namespace}" if applied else ""))  # fmt: skip
    if args.manifests_dir and decision.champion_after:
        render_champion_manifests(mlc, reg, args.manifests_dir)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """DAPO-Math-17K -> verl-schema train/val parquet; summary printed and logged to MLflow. Prompts longer than
    data.max_prompt_length tokens of the run's model (model.path, else the tiny model) are dropped and counted."""
    cfg = config_from_args(args)
    out = args.out or storage.join(cfg.storage.root, "data", "dapo")
    try:
        summary, run_id = prepare_dapo_tracked(cfg, args.source, out, template=args.template, max_bad_rows=args.max_bad_rows,
                                       track=not args.no_track)  # fmt: skip
    except DapoSchemaError as exc:
        raise UserError(str(exc)) from None
    print(summary.table())
    print(f"train: {summary.train_path}\nval:   {summary.val_path}")
    if run_id:
        print(f"mlflow run: {run_id}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """avg@k + greedy pass@1 per benchmark with the vLLM engine; results JSON/markdown + MLflow."""
    cfg = config_from_args(args)
    model = args.model or cfg.model.path
    if not model:
        raise UserError("no model: pass --model DIR or set model.path")
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    out = args.out or storage.join(cfg.storage.root, "eval")
    kw = dict(benchmarks=names, benchmark_dir=args.benchmark_dir, progress=not args.no_progress)
    try:
        _check_evaluate_inputs(cfg, model, out, names, args.benchmark_dir)  # before the MLflow run: none left FAILED
        report, run_id = evaluate_tracked(cfg, model, out, track=not args.no_track, **kw)
    except BenchmarkError as exc:
        raise UserError(str(exc)) from None
    if run_id:
        print(f"mlflow run: {run_id}")
    print(report.markdown(), end="")
    print(f"results: {storage.join(out, 'results.json')}")
    return 0


def _check_evaluate_inputs(cfg: RunConfig, model: str, out: str, names: list[str] | None, benchmark_dir) -> None:
    """The model exists (a path or s3://; a Hub id is fetched later), the benchmarks load, ``--out`` is writable."""
    endpoint = cfg.storage.s3_endpoint_url
    if storage.is_s3(model) or Path(model).exists() or parse_hf_id(model) is None:
        check_exists(model, "--model", endpoint)
    load_benchmarks(cfg, names or cfg.eval.benchmarks, benchmark_dir)
    check_writable(out, "--out", endpoint, keep_created=False)


def cmd_train(args: argparse.Namespace) -> int:
    """Train with the built-in single-machine loop (vLLM rollouts, HF updates, MLflow)."""
    if args.method:  # through the config, so a bad name fails like any other field
        args.overrides = [*args.overrides, f"method.name={args.method}"]
    cfg = config_from_args(args)
    if cfg.train.backend == "verl":
        raise UserError(
            f"train.backend=verl (preset {cfg.preset}): `dcgrpo train` is the single-machine loop; train on verl "
            "with `dcgrpo train-verl` or the pipeline, or add --set train.backend=local to run this loop anyway"
        )
    res = train_job(cfg, out_dir=args.out, resume=args.resume)
    print(f"step {res.step}  lambda {res.lam:.4g}  checkpoint {res.checkpoint}  MLflow run {res.run_id}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline through kfp.local: data, warm start, rounds per method, FP8 export,
    evaluation, registration, promotion; then a summary table."""
    from dcgrpo.demo import demo  # rich: `dcgrpo submit` runs without it

    if args.config:
        raise UserError("demo takes --preset and --set overrides (the pipeline's parameters), not --config")
    methods = [m for m in args.methods.split(",") if m]
    rows = demo(args.preset or DEFAULT_PRESET, args.overrides, methods, args.rounds, args.data_uri, args.keep_server,
                verbose=args.verbose)  # fmt: skip
    return 0 if rows else 1


# name -> (handler, help, extra-argument adder from dcgrpo.cli_args); each handler is a few lines around one library
# call.
COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None] | None]
] = {
    "config": (cmd_config, "print the resolved run config", None),
    "train": (cmd_train, "train with the built-in loop (vLLM + HF + MLflow)", cli_args.add_train_args),
    "demo": (
        cmd_demo,
        f"the whole pipeline on this machine (kfp.local, vLLM CPU, a local MLflow), {DEFAULT_PRESET} preset",
        cli_args.add_demo_args,
    ),
    "prepare": (cmd_prepare, "prepare DAPO-Math-17K as verl-schema parquet", cli_args.add_prepare_args),
    "evaluate": (cmd_evaluate, "avg@k on math benchmarks with vLLM", cli_args.add_evaluate_args),
    "train-verl": (verl_cli.run, "train on verl: KubeRay RayJob or verl in this pod", verl_cli.add_args),
    "compile": (cmd_compile, "compile the Kubeflow pipeline to YAML", cli_args.add_compile_args),
    "submit": (cmd_submit, "submit one pipeline run to Kubeflow", cli_args.add_submit_args),
    "schedule": (cmd_schedule, "schedule recurring retraining on Kubeflow", cli_args.add_schedule_args),
    "export": (cmd_export, "export a checkpoint to FP8 (compressed-tensors)", cli_args.add_export_args),
    "register": (cmd_register, "register a model version (alias challenger)", cli_args.add_register_args),
    "promote": (cmd_promote, "gate the challenger against the champion and promote", cli_args.add_promote_args),
}


VERBOSE_HELP = "debug logging, tracebacks of errors, and (demo) every pipeline task's executor input"


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="dcgrpo", description=" ".join(doc[0].split()),
                                     epilog="`dcgrpo <command> --help` describes a command's options.")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (handler, help_text, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # also after the command (`dcgrpo demo -v`); SUPPRESS keeps a `dcgrpo -v demo` from being reset to False
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        cli_args.add_config_args(p)
        if add_args is not None:
            add_args(p)
        p.set_defaults(handler=handler)
    return parser


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (which keeps its traceback).

    Ours derive from ``DcgrpoError``; the third-party ones here mean a file, a
    server or a credential is wrong, never our code.
    """
    if isinstance(exc, DcgrpoError | FileNotFoundError | IsADirectoryError | PermissionError):
        return str(exc)
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    text = " ".join(str(getattr(exc, "message", exc)).split())[:1000]  # library messages can span pages
    if isinstance(exc, ConnectionError) or kind.startswith(("requests.exceptions.", "urllib3.exceptions.")):
        return f"server unreachable: {text}"
    if kind.startswith("botocore.exceptions."):
        return f"S3: {text}"
    if kind == "mlflow.exceptions.MlflowException" or kind.startswith("mlflow.exceptions."):
        return f"MLflow: {text}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shutdown.install()  # SIGTERM unwinds (runs marked, servers stopped) instead of killing at once
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.handler(args)
    except Exception as exc:  # the one error boundary: user-fixable errors -> one line, exit 2
        message = user_error_message(exc)
        if message is None:
            raise
        if args.verbose:
            log.exception("dcgrpo %s failed", args.command)
        stopped = isinstance(exc, shutdown.Terminated)
        code = shutdown.EXIT_CODE if stopped else 2
        print(f"dcgrpo {args.command}: {'stopped' if stopped else 'error'}: {message}", file=sys.stderr)
        # The console script: exit now, so a native thread torn down at exit cannot turn the code into SIGABRT.
        if argv is None:
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(code)
        return code


if __name__ == "__main__":
    sys.exit(main())
