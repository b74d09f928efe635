"""The `dc_grpo` pipeline: the data-flow diagram of DESIGN.md as KFP v2 tasks.

    prepare_data -> warm_start -> [per method, side by side:
        train round 1 .. N -> export_fp8 -> evaluate] -> select_best
        -> register_model -> (gate passes) promote

Each training round is its own task (a preempted GPU node loses at most one
round) with retries; methods run in a ParallelFor; the best method by the gate
metric is registered; promotion runs only under dsl.If; an exit handler marks
the MLflow runs failed when anything fails.

Cluster settings (through kfp-kubernetes, ignored by kfp.local): GPU
accelerator type and limit on train/eval/export/warm-start, node selector and
toleration for the GPU pool, a PVC for the model cache (and one for verl's
checkpoints on the training rounds, used when ``train.backend=verl``), S3 and MLflow
credentials from Kubernetes Secrets as env vars (only secret *names* are in
the YAML), CPU/memory limits on the light steps.
"""

# No `from __future__ import annotations` here: KFP reads the pipeline signature at runtime.

from dataclasses import dataclass, field

from components import DEFAULT_IMAGE, DEFAULT_TRAINER_IMAGE, build_components
from kfp import dsl, kubernetes

PIPELINE_NAME = "dc-grpo"


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time cluster settings (what the compiled YAML carries)."""

    image: str = DEFAULT_IMAGE
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    max_rounds: int = 4
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    gpu_node_selector: tuple[str, str] = ("cloud.google.com/gke-nodepool", "gpu-pool")
    gpu_toleration_key: str = "nvidia.com/gpu"
    model_cache_pvc: str = "dcgrpo-model-cache"
    model_cache_mount: str = "/cache"
    checkpoint_pvc: str = "dcgrpo-checkpoints"
    """verl's checkpoint volume (train.backend=verl), mounted on the train rounds; "" = none."""
    checkpoint_mount: str = "/checkpoints"
    """Where the train rounds see it: must equal verl.checkpoint_dir (its default)."""
    s3_secret: str = "dcgrpo-s3"
    s3_secret_keys: dict[str, str] = field(
        default_factory=lambda: {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
        }
    )
    mlflow_secret: str = "dcgrpo-mlflow"
    mlflow_secret_keys: dict[str, str] = field(
        default_factory=lambda: {
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        }
    )
    light_cpu_limit: str = "2"
    light_memory_limit: str = "4G"
    gpu_cpu_limit: str = "16"
    gpu_memory_limit: str = "128G"
    retries: int = 2


def _secrets(task: dsl.PipelineTask, s: ClusterSettings) -> dsl.PipelineTask:
    # Optional: a cluster with IRSA/workload identity or an open MLflow needs neither secret.
    kubernetes.use_secret_as_env(task, s.s3_secret, s.s3_secret_keys, optional=True)
    kubernetes.use_secret_as_env(task, s.mlflow_secret, s.mlflow_secret_keys, optional=True)
    return task


def _gpu(task: dsl.PipelineTask, s: ClusterSettings, retry: bool = True) -> dsl.PipelineTask:
    task.set_accelerator_type(s.accelerator_type).set_accelerator_limit(s.accelerator_limit)
    task.set_cpu_limit(s.gpu_cpu_limit).set_memory_limit(s.gpu_memory_limit)
    kubernetes.add_node_selector(task, *s.gpu_node_selector)
    kubernetes.add_toleration(task, key=s.gpu_toleration_key, operator="Exists", effect="NoSchedule")
    kubernetes.mount_pvc(task, s.model_cache_pvc, s.model_cache_mount)
    task.set_env_variable("DCGRPO_MODEL_CACHE", s.model_cache_mount)
    if retry and s.retries > 0:
        task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    return _secrets(task, s)


def _light(task: dsl.PipelineTask, s: ClusterSettings) -> dsl.PipelineTask:
    task.set_cpu_limit(s.light_cpu_limit).set_memory_limit(s.light_memory_limit)
    return _secrets(task, s)


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function for ``settings`` (images, GPU pool, secrets, max rounds)."""
    s = settings or ClusterSettings()
    c = build_components(s.image, s.trainer_image)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DC-GRPO post-training: data prep, warm start, training rounds per method, "
        "FP8 export, vLLM evaluation, MLflow registration and gated promotion.",
    )
    def dc_grpo(
        preset: str = "tiny-cpu",
        overrides: list = [],  # noqa: B006  (KFP pipeline defaults are data, not mutable state)
        data_uri: str = "",
        model_uri: str = "",
        methods: list = ["grpo", "dc-grpo"],  # noqa: B006
        rounds: int = 2,
        mlflow_uri: str = "",
        model_name: str = "dcgrpo-tiny",
        force_promotion: bool = False,
    ):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        exit_task = _light(c.mark_failed(mlflow_uri=mlflow_uri, kfp_run_id=run_id), s)
        with dsl.ExitHandler(exit_task, name="dc-grpo-run"):
            data = _light(
                c.prepare_data(
                    preset=preset, overrides=overrides, data_uri=data_uri, mlflow_uri=mlflow_uri, kfp_run_id=run_id
                ),
                s,
            )
            base = _gpu(
                c.warm_start(preset=preset, overrides=overrides, model_uri=model_uri, dataset=data.outputs["dataset"]),
                s,
            )
            with dsl.ParallelFor(methods, name="methods") as method:
                model = base.outputs["model"]
                for k in range(s.max_rounds):
                    step = _gpu(
                        c.train_round(
                            preset=preset, overrides=overrides, method=method, round_index=k, rounds=rounds,
                            mlflow_uri=mlflow_uri, kfp_run_id=run_id, dataset=data.outputs["dataset"],
                            model_in=model,
                        ),
                        s,
                    ).set_display_name(f"train-round-{k + 1}")  # fmt: skip
                    if s.checkpoint_pvc:  # verl backend: every round resumes from the same volume
                        kubernetes.mount_pvc(step, s.checkpoint_pvc, s.checkpoint_mount)
                    model = step.outputs["model"]
                fp8 = _gpu(c.export_fp8(preset=preset, overrides=overrides, model=model), s)
                evaluation = _gpu(
                    c.evaluate(
                        preset=preset, overrides=overrides, mlflow_uri=mlflow_uri, dataset=data.outputs["dataset"],
                        model=model, fp8_model=fp8.outputs["fp8_model"],
                    ),
                    s,
                )  # fmt: skip
            best = _light(
                c.select_best(
                    preset=preset,
                    overrides=overrides,
                    methods=methods,
                    gate_values=dsl.Collected(evaluation.outputs["Output"]),
                    models=dsl.Collected(model),
                    fp8_models=dsl.Collected(fp8.outputs["fp8_model"]),
                ),
                s,
            )
            registered = _light(
                c.register_model(
                    preset=preset, overrides=overrides, mlflow_uri=mlflow_uri, model_name=model_name,
                    model=best.outputs["best_model"], fp8_model=best.outputs["best_fp8_model"],
                ),
                s,
            )  # fmt: skip
            with dsl.If(registered.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
                _light(
                    c.promote(
                        preset=preset, overrides=overrides, mlflow_uri=mlflow_uri, model_name=model_name,
                        version=registered.outputs["version"], force=force_promotion,
                    ),
                    s,
                )  # fmt: skip

    return dc_grpo


def compile_pipeline(out_path: str, settings: ClusterSettings | None = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(settings), package_path=out_path)
    return out_path
