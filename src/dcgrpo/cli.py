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

from dcgrpo.config import DEFAULT_PRESET, RunConfig, load_config
from dcgrpo.errors import DcgrpoError
from dcgrpo.verl_plugin import cli as verl_cli

log = logging.getLogger("dcgrpo")


class UserError(DcgrpoError):
    """A failure caused by the command's arguments, reported without a traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML run config (sections as in dcgrpo.config)")
    p.add_argument("--preset", help=f"{DEFAULT_PRESET} (default), qwen3-8b or qwen3-30b-a3b")
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
    import os

    from dcgrpo.deploy import DeploymentContract

    p.add_argument("--host", default=os.environ.get("KFP_HOST") or None,
                   help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline (default: $KFP_HOST; one of "
                   "them is needed); a bearer token comes from $KFP_TOKEN")  # fmt: skip
    p.add_argument("--experiment", default="dcgrpo", help="KFP experiment name")
    p.add_argument("--namespace", help="Kubeflow profile namespace of the run (multi-user Kubeflow needs it)")
    p.add_argument("--service-account", default=DeploymentContract().service_account,
                   help="service account of the run's pods (default: Kubeflow's run account, pipeline-runner or "
                        "default-editor, which manifests/rbac lets create RayJobs; yours needs what KFP runs need too)")  # fmt: skip
    p.add_argument("--package", default=None, help="compiled pipeline YAML (default: the one shipped for the preset: dc_grpo.yaml, or "
                   "dc_grpo_rayjob.yaml when it trains verl on a RayJob)")  # fmt: skip
    _pipeline_args(p)


def _submit_args(p: argparse.ArgumentParser) -> None:
    _cluster_args(p)
    p.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 unless it succeeds")
    p.add_argument("--wait-timeout", type=float, default=6 * 3600.0, metavar="SECONDS",
                   help="how long --wait follows the run (default: 6 hours)")  # fmt: skip


def _arguments(args: argparse.Namespace) -> dict:
    from dcgrpo.pipeline import pipeline_arguments

    return pipeline_arguments(
        args.preset or DEFAULT_PRESET, args.overrides, [m for m in args.methods.split(",") if m], args.rounds,
        args.data_uri, args.model_uri, args.mlflow_uri, args.model_name, args.force_promotion,
    )  # fmt: skip


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        default=None,
        help="where to write the YAML (default: both packages, dc_grpo.yaml and dc_grpo_rayjob.yaml, into "
        "pipelines/compiled/ in a checkout, else into .)",
    )
    p.add_argument("--train-pod", choices=["gpu", "launcher"],
                   help="with --output: the train task of that package, a GPU pod (built-in loop, verl single-node) "
                        "or a light launcher of a verl RayJob (default: gpu)")  # fmt: skip
    p.add_argument("--image", help="image of the light steps (default: the deployment contract's light_image)")
    p.add_argument("--trainer-image", help="image of the GPU steps (default: the contract's gpu_image)")
    p.add_argument("--verl-image", help="image of the RayJobs' Ray nodes (default: the contract's verl_image)")
    p.add_argument("--gpu-pool", help="GPU pool node selector KEY=VALUE (default: the deployment contract's)")
    p.add_argument("--accelerator-limit", type=int, default=1,
                   help="GPUs per GPU step (verl.launch=single-node trains on these: set verl.gpus_per_node)")  # fmt: skip
    p.add_argument("--checkpoint-pvc",
                   help="PVC for verl's checkpoints, mounted on the train rounds ('' = none; train.backend=verl)")  # fmt: skip
    p.add_argument("--checkpoint-mount", help="its mount path (= verl.checkpoint_dir)")


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the pipeline to YAML for upload in the Kubeflow UI."""
    if args.config or args.preset or args.overrides:
        raise UserError(
            "compile takes no run config: preset and overrides are pipeline parameters, given at "
            "submit/schedule time or in the Kubeflow UI"
        )
    from dcgrpo.deploy import DeploymentContract
    from dcgrpo.pipeline import compile_yaml, default_compile_output

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
    from dcgrpo.pipeline import submit

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
    from dcgrpo.pipeline import schedule

    _need_host(args)
    try:
        job_id = schedule(args.host, args.cron, _arguments(args), args.experiment, args.job_name,
                          Path(args.package) if args.package else None, args.namespace,
                          args.service_account)  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    print(job_id)
    return 0


def _schedule_args(p: argparse.ArgumentParser) -> None:
    _cluster_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first: '0 0 3 * * 0' = Sundays 03:00")
    p.add_argument("--job-name", default="dcgrpo-retrain", help="recurring run name")


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


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="HF-format model directory, local or s3://")
    p.add_argument("--dest", required=True, help="output directory, local or s3://")


def _tracking_client(cfg: RunConfig, uri: str | None):
    from dcgrpo.registry import client
    from dcgrpo.tracking import tracking_uri

    return client(tracking_uri(cfg, uri))  # the pipeline steps' rule: one MLflow for both paths


def cmd_register(args: argparse.Namespace) -> int:
    """Register a model directory as a new version (alias challenger) with its gate tags, and gate it against the
    champion as the pipeline does (``stages.registration.register_and_gate``: a refused version records the rejection).

    Registering the same run, directory and quantization again prints the existing version.
    """
    from dcgrpo.registry import load_metrics
    from dcgrpo.stages.registration import register_and_gate

    cfg = config_from_args(args)
    metrics = load_metrics(args.metrics, "--metrics")  # before any server call: a typo fails fast
    registered = register_and_gate(
        _tracking_client(cfg, args.tracking_uri), cfg, args.model_name or cfg.registry.model_name, args.run_id,
        args.model_dir, metrics=metrics, final_lambda=args.final_lambda, discrepancy=args.discrepancy,
        quantization=args.quantization,
    )  # fmt: skip
    print(f"{registered.model_name} version {registered.version}")
    return 0


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", help="registered model (default: registry.model_name)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: tracking.mlflow_uri, else $MLFLOW_TRACKING_URI)")
    p.add_argument("--run-id", required=True, help="MLflow run the model came from")
    p.add_argument("--model-dir", required=True, help="model directory, local or s3://")
    p.add_argument("--metrics", required=True, help="JSON object of eval metrics, or a file holding one")
    p.add_argument("--final-lambda", type=float, required=True,
                   help="lambda after the run's last step (dc/lambda_next): the version's dc/lambda_final tag")  # fmt: skip
    p.add_argument("--discrepancy", type=float, required=True,
                   help="the run's mean d over its last round (dc/discrepancy_round_mean), what the gate compares")  # fmt: skip
    p.add_argument("--quantization", choices=["fp8", "bf16"], default="fp8",
                   help="the weights' format, a version tag (default: fp8)")  # fmt: skip


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a version (default: the challenger, resolved once) to champion if it passes the gate (or --force),
    or roll back to an earlier one; with --serve (or registry.serve_on_promote) apply its InferenceService first;
    render serving manifests."""
    from dcgrpo.registry import ALREADY, version_by_alias
    from dcgrpo.serving import render_champion_manifests
    from dcgrpo.stages.registration import promote_version, rollback_version

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


def _promote_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", help="registered model (default: registry.model_name)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: tracking.mlflow_uri, else $MLFLOW_TRACKING_URI)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="model version to gate (default: the version holding the challenger alias)")
    which.add_argument("--rollback-to", metavar="VERSION",
                       help="make VERSION the champion again without the gate (with --serve: and serve it)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="promote even if the gate says no (recorded as forced)")
    p.add_argument("--serve", action="store_true",
                   help="apply the champion's KServe InferenceService before moving the alias "
                        "(registry.serve_on_promote; Kubernetes credentials: in-cluster or kubeconfig)")  # fmt: skip
    p.add_argument("--manifests-dir", help="write the champion's KServe + vllm-serve manifests here (local or s3://)")


# name -> (handler, help, extra-argument adder). Later modules add their
# commands here; each handler is a few lines around one library call.
def cmd_prepare(args: argparse.Namespace) -> int:
    """DAPO-Math-17K -> verl-schema train/val parquet; summary printed and logged to MLflow. Prompts longer than
    data.max_prompt_length tokens of the run's model (model.path, else the tiny model) are dropped and counted."""
    from dcgrpo import storage
    from dcgrpo.data.dapo import DapoSchemaError
    from dcgrpo.stages.data import prepare_dapo_tracked

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


def _non_negative_int(text: str) -> int:
    """argparse type: a count >= 0, so a bad value exits 2 with usage instead of failing mid-run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _prepare_args(p: argparse.ArgumentParser) -> None:
    from dcgrpo.data.dapo import PROMPT_TEMPLATES

    p.add_argument("--source", default="hub", help="hub (BytedTsinghua-SIA/DAPO-Math-17k), a local path or s3:// URI")
    p.add_argument("--out", help="output directory, local or s3:// (default: <storage.root>/data/dapo)")
    p.add_argument(
        "--template", choices=sorted(PROMPT_TEMPLATES), help="prompt template (default: data.prompt_template)"
    )
    p.add_argument("--max-bad-rows", type=_non_negative_int, default=None, metavar="N",
                   help="fail if more than N rows are bad (N >= 0; default: no limit)")  # fmt: skip
    p.add_argument("--no-track", action="store_true", help="do not log the summary to MLflow")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """avg@k + greedy pass@1 per benchmark with the vLLM engine; results JSON/markdown + MLflow."""
    from dcgrpo import storage
    from dcgrpo.data.benchmarks import BenchmarkError
    from dcgrpo.stages.evaluate import evaluate_tracked

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
    from dcgrpo import storage
    from dcgrpo.evaluate import load_benchmarks
    from dcgrpo.models import parse_hf_id
    from dcgrpo.preflight import check_exists, check_writable

    endpoint = cfg.storage.s3_endpoint_url
    if storage.is_s3(model) or Path(model).exists() or parse_hf_id(model) is None:
        check_exists(model, "--model", endpoint)
    load_benchmarks(cfg, names or cfg.eval.benchmarks, benchmark_dir)
    check_writable(out, "--out", endpoint, keep_created=False)


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory, local or s3:// (default: model.path)")
    p.add_argument("--benchmarks", help="comma list, e.g. aime24,math500 (default: eval.benchmarks)")
    p.add_argument(
        "--benchmark-dir",
        help="samples, hub, or a directory (local or s3://) of <name>.jsonl files (default: eval.benchmark_dir)",
    )
    p.add_argument("--out", help="output directory, local or s3:// (default: <storage.root>/eval)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_train(args: argparse.Namespace) -> int:
    """Train with the built-in single-machine loop (vLLM rollouts, HF updates, MLflow)."""
    from dcgrpo.stages.train import train_job

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


def _train_args(p: argparse.ArgumentParser) -> None:
    from dcgrpo.algorithm.methods import METHODS  # torch-free: the registry's names, not a copy of them

    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default: method.name)")
    p.add_argument("--resume", metavar="CHECKPOINT|auto",
                   help="a checkpoint (or checkpoints/ dir) to continue from; 'auto': continue <out>/checkpoints if "
                        "it holds one, else start (one command for a pod that may be restarted)")  # fmt: skip
    p.add_argument("--out", help="output dir or s3:// prefix (default: <storage.root>/runs/<run name>)")


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


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="grpo,dc-grpo", help="comma-separated methods to run side by side")
    p.add_argument("--rounds", type=int, help="training rounds (default: the config's train.rounds)")
    p.add_argument("--data-uri", default="", help="DAPO parquet to prepare (default: the synthetic task)")
    p.add_argument("--keep-server", action="store_true",
                   help="leave the demo's local MLflow server running after it ends (its links stay valid)")  # fmt: skip


COMMANDS: dict[
    str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None] | None]
] = {
    "config": (cmd_config, "print the resolved run config", None),
    "train": (cmd_train, "train with the built-in loop (vLLM + HF + MLflow)", _train_args),
    "demo": (
        cmd_demo,
        f"the whole pipeline on this machine (kfp.local, vLLM CPU, a local MLflow), {DEFAULT_PRESET} preset",
        _demo_args,
    ),
    "prepare": (cmd_prepare, "prepare DAPO-Math-17K as verl-schema parquet", _prepare_args),
    "evaluate": (cmd_evaluate, "avg@k on math benchmarks with vLLM", _evaluate_args),
    "train-verl": (verl_cli.run, "train on verl: KubeRay RayJob or verl in this pod", verl_cli.add_args),
    "compile": (cmd_compile, "compile the Kubeflow pipeline to YAML", _compile_args),
    "submit": (cmd_submit, "submit one pipeline run to Kubeflow", _submit_args),
    "schedule": (cmd_schedule, "schedule recurring retraining on Kubeflow", _schedule_args),
    "export": (cmd_export, "export a checkpoint to FP8 (compressed-tensors)", _export_args),
    "register": (cmd_register, "register a model version (alias challenger)", _register_args),
    "promote": (cmd_promote, "gate the challenger against the champion and promote", _promote_args),
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
        _add_config_args(p)
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
    from dcgrpo import shutdown

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
