"""The ``dcgrpo`` subcommands' options: one ``add_<command>_args(parser)`` per subcommand (``dcgrpo.cli`` wires
them to their handlers), and the options several share (the run config, the pipeline's parameters, the cluster)."""

from __future__ import annotations

import argparse
import os

from dcgrpo.algorithm.methods import METHODS  # torch-free: the registry's names, not a copy of them
from dcgrpo.config import DEFAULT_PRESET
from dcgrpo.data.dapo import PROMPT_TEMPLATES
from dcgrpo.deploy import DeploymentContract


def add_config_args(p: argparse.ArgumentParser) -> None:
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


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="grpo,dc-grpo", help="comma-separated methods to run side by side")
    p.add_argument("--rounds", type=int, help="training rounds (default: the config's train.rounds)")
    p.add_argument("--data-uri", default="", help="prepared/raw DAPO parquet (local or s3://); empty = synthetic")
    p.add_argument("--model-uri", default="", help="HF-format base model (local or s3://); empty = tiny + SFT")
    p.add_argument("--mlflow-uri", default="", help="MLflow tracking URI seen from the pipeline pods")
    p.add_argument("--model-name", help="MLflow registered model name (default: registry.model_name)")
    p.add_argument("--force-promotion", action="store_true", help="promote even when the gate fails")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
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
    add_pipeline_args(p)


def add_submit_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--wait", action="store_true", help="follow the run to its end; exit 1 unless it succeeds")
    p.add_argument("--wait-timeout", type=float, default=6 * 3600.0, metavar="SECONDS",
                   help="how long --wait follows the run (default: 6 hours)")  # fmt: skip


def add_compile_args(p: argparse.ArgumentParser) -> None:
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


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    add_cluster_args(p)
    p.add_argument("--cron", required=True, help="6-field cron, seconds first: '0 0 3 * * 0' = Sundays 03:00")
    p.add_argument("--job-name", default="dcgrpo-retrain", help="recurring run name")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="HF-format model directory, local or s3://")
    p.add_argument("--dest", required=True, help="output directory, local or s3://")


def add_register_args(p: argparse.ArgumentParser) -> None:
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


def add_promote_args(p: argparse.ArgumentParser) -> None:
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


def non_negative_int(text: str) -> int:
    """argparse type: a count >= 0, so a bad value exits 2 with usage instead of failing mid-run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="hub", help="hub (BytedTsinghua-SIA/DAPO-Math-17k), a local path or s3:// URI")
    p.add_argument("--out", help="output directory, local or s3:// (default: <storage.root>/data/dapo)")
    p.add_argument(
        "--template", choices=sorted(PROMPT_TEMPLATES), help="prompt template (default: data.prompt_template)"
    )
    p.add_argument("--max-bad-rows", type=non_negative_int, default=None, metavar="N",
                   help="fail if more than N rows are bad (N >= 0; default: no limit)")  # fmt: skip
    p.add_argument("--no-track", action="store_true", help="do not log the summary to MLflow")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory, local or s3:// (default: model.path)")
    p.add_argument("--benchmarks", help="comma list, e.g. aime24,math500 (default: eval.benchmarks)")
    p.add_argument(
        "--benchmark-dir",
        help="samples, hub, or a directory (local or s3://) of <name>.jsonl files (default: eval.benchmark_dir)",
    )
    p.add_argument("--out", help="output directory, local or s3:// (default: <storage.root>/eval)")
    p.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", help=f"one of {', '.join(METHODS)} (default: method.name)")
    p.add_argument("--resume", metavar="CHECKPOINT|auto",
                   help="a checkpoint (or checkpoints/ dir) to continue from; 'auto': continue <out>/checkpoints if "
                        "it holds one, else start (one command for a pod that may be restarted)")  # fmt: skip
    p.add_argument("--out", help="output dir or s3:// prefix (default: <storage.root>/runs/<run name>)")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="grpo,dc-grpo", help="comma-separated methods to run side by side")
    p.add_argument("--rounds", type=int, help="training rounds (default: the config's train.rounds)")
    p.add_argument("--data-uri", default="", help="DAPO parquet to prepare (default: the synthetic task)")
    p.add_argument("--keep-server", action="store_true",
                   help="leave the demo's local MLflow server running after it ends (its links stay valid)")  # fmt: skip
