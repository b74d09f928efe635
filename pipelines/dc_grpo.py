"""The `dc_grpo` pipeline: the paper's Algorithm 1 as KFP v2 tasks, inside an exit handler.

    prepare_data -> warm_start -> for each method, side by side (ParallelFor):
        train (all rounds) -> export_fp8 -> evaluate
    -> select_best -> register_model -> promote (only when the gate passes)

One train task per method runs every round: a round stays the unit of checkpointing and of per-round metrics, and a
retried, evicted or preempted train task resumes from the newest complete round on the checkpoint volume (a SIGTERM
writes one at the current step) without logging a point twice; the built-in loop starts one vLLM engine per method.
``rounds`` is a run-time parameter with no compiled-in maximum (0 = the preset's ``train.rounds``); the train tasks
take the pipeline's own parameter, since kfp.local hands a loop's tasks the loop item in place of any task output.

The backend decides only how the train task runs, chosen at compile time: ``dc_grpo.yaml`` has a GPU train task (the
built-in loop, verl single-node), ``dc_grpo_rayjob.yaml`` a light launcher that submits and follows one RayJob per
method (verl on a RayJob holds the GPUs; a retried launcher re-attaches to it). Pod sizes are compile-time in KFP, so a
run-time choice would need an If/Else with ``dsl.OneOf`` around every train task: a skipped twin beside each train
task in the UI and a fourth level of nesting, for a choice a preset makes once. ``prepare_data`` refuses a run whose
preset needs the other package, and ``dcgrpo submit``/``schedule`` pick the package from the preset by themselves.

Cluster names (images, GPU pool, secrets, PVCs) come from the deployment contract (``dcgrpo.deploy``), applied
through kfp-kubernetes (ignored by kfp.local); the contract also travels to the train tasks as ``$DCGRPO_DEPLOYMENT``
so the RayJobs they start use the same names.
"""

# No `from __future__ import annotations` here: KFP reads the pipeline signature at runtime.

from dataclasses import dataclass, field

from dcgrpo.components import build_components
from kfp import compiler, dsl, kubernetes

from dcgrpo.config import DEFAULT_PRESET
from dcgrpo.deploy import ENV_VAR, DeploymentContract
from dcgrpo.model_refs import MODEL_CACHE_ENV, MODEL_STORE_ENV

PIPELINE_NAME = "dc-grpo"


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time settings: the deployment contract plus sizes and retries (what the compiled YAML carries)."""

    contract: DeploymentContract = field(default_factory=DeploymentContract)
    train_pod: str = "gpu"
    """``gpu``: the train task holds a GPU (built-in loop, verl single-node); ``launcher``: it follows a RayJob."""
    accelerator_limit: int = 1
    # Requests are what the scheduler reserves; the light steps move metadata and references, never weights.
    light_cpu_request: str = "250m"
    light_memory_request: str = "512M"
    light_cpu_limit: str = "2"
    light_memory_limit: str = "4G"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "64G"
    gpu_cpu_limit: str = "16"
    gpu_memory_limit: str = "128G"
    retries: int = 2
    containerized: bool = True
    """Components run from the images (``components.build_components``); kfp.local needs False."""


def _secrets(task: dsl.PipelineTask, c: DeploymentContract, loads_models: bool = False) -> dsl.PipelineTask:
    # Optional: a cluster with IRSA/workload identity, an open MLflow or public base models needs none of them.
    env = c.secret_env() if loads_models else c.light_secret_env()
    for secret in dict.fromkeys(s for s, _ in env.values()):
        keys = {key: var for var, (s, key) in env.items() if s == secret}
        kubernetes.use_secret_as_env(task, secret, keys, optional=True)
    return task


def _gpu(task: dsl.PipelineTask, s: ClusterSettings, retry: bool = True) -> dsl.PipelineTask:
    c = s.contract
    task.set_accelerator_type(c.gpu_resource).set_accelerator_limit(s.accelerator_limit)
    task.set_cpu_request(s.gpu_cpu_request).set_memory_request(s.gpu_memory_request)
    task.set_cpu_limit(s.gpu_cpu_limit).set_memory_limit(s.gpu_memory_limit)
    for key, value in c.gpu_node_selector.items():
        kubernetes.add_node_selector(task, key, value)
    for tol in c.gpu_tolerations:
        kubernetes.add_toleration(task, key=tol["key"], operator=tol["operator"], effect=tol.get("effect"))
    kubernetes.mount_pvc(task, c.model_cache_pvc, c.model_cache_mount)
    task.set_env_variable(MODEL_CACHE_ENV, c.model_cache_mount)
    _checkpoint_volume(task, c)
    if retry and s.retries > 0:
        task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    return _secrets(task, c, loads_models=True)


def _checkpoint_volume(task: dsl.PipelineTask, c: DeploymentContract) -> dsl.PipelineTask:
    """The checkpoint volume, where weights stay between tasks (``dcgrpo.model_refs.model_store``): each task's Model
    artifact references them, so the KFP artifact store never carries a checkpoint (FP8 exports excepted: serving
    reads those from S3). KFP has no ephemeral-storage request: the big writes go here, not to the pod's disk."""
    if c.checkpoint_pvc:
        kubernetes.mount_pvc(task, c.checkpoint_pvc, c.checkpoint_mount)
        task.set_env_variable(MODEL_STORE_ENV, c.checkpoint_mount)
    return task


def _light(task: dsl.PipelineTask, s: ClusterSettings, cache: bool = True) -> dsl.PipelineTask:
    task.set_cpu_request(s.light_cpu_request).set_memory_request(s.light_memory_request)
    task.set_cpu_limit(s.light_cpu_limit).set_memory_limit(s.light_memory_limit)
    if not cache:  # a side effect (registry, alias, run state) must happen on every run
        task.set_caching_options(False)
    return _secrets(task, s.contract)


def _train_task(c, s: ClusterSettings, **inputs) -> dsl.PipelineTask:
    """All rounds of one method: on a GPU pod (built-in loop, single-node verl), or on a light pod that only launches
    and follows the verl RayJob (the RayJob holds the GPUs: a GPU here would sit idle for the whole training)."""
    if s.train_pod == "gpu":
        step = _gpu(c.train(**inputs), s)
    else:
        step = _checkpoint_volume(_light(c.train_launcher(**inputs), s), s.contract)  # the RayJob's volume
        if s.retries > 0:  # a lost launcher pod re-attaches to its RayJob
            step.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    step.set_env_variable(ENV_VAR, s.contract.to_env())  # the RayJob a verl training starts uses these names
    return step.set_display_name("train")


def _per_method(c, s: ClusterSettings, p: dict, data, base):
    """Train, export and evaluate each method side by side; returns the evaluate task (collected after the loop)."""
    dataset = data.outputs["dataset"]
    with dsl.ParallelFor(p["methods"], name="methods") as method:
        trained = _train_task(
            c, s, preset=p["preset"], overrides=p["overrides"], method=method, rounds=p["rounds"],
            mlflow_uri=p["mlflow_uri"], kfp_run_id=p["run_id"], dataset=dataset, base_model=base.outputs["model"],
        )  # fmt: skip
        model = trained.outputs["model"]
        fp8 = _gpu(c.export_fp8(preset=p["preset"], overrides=p["overrides"], model=model), s)
        evaluation = _gpu(
            c.evaluate(
                preset=p["preset"], overrides=p["overrides"], mlflow_uri=p["mlflow_uri"], dataset=dataset,
                model=model, fp8_model=fp8.outputs["fp8_model"],
            ),
            s,
        )  # fmt: skip
    return evaluation


def _select_register_promote(c, s: ClusterSettings, p: dict, evaluation, model_name) -> None:
    """The best method by the gate metric is registered; promoted only when the gate passes (or it is forced)."""
    best = _light(
        c.select_best(
            preset=p["preset"], overrides=p["overrides"], methods=p["methods"],
            gate_values=dsl.Collected(evaluation.outputs["Output"]),
            references=dsl.Collected(evaluation.outputs["reference"]),  # URIs: no weights through light steps
        ),
        s,
    )  # fmt: skip
    registered = _light(
        c.register_model(
            preset=p["preset"], overrides=p["overrides"], mlflow_uri=p["mlflow_uri"], model_name=model_name,
            reference=best.outputs["reference"], force_promotion=p["force_promotion"],
        ),
        s,
        cache=False,
    )  # fmt: skip
    with dsl.If(registered.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
        _light(
            c.promote(
                preset=p["preset"], overrides=p["overrides"], mlflow_uri=p["mlflow_uri"], model_name=model_name,
                version=registered.outputs["version"], force=p["force_promotion"],
            ),
            s,
            cache=False,
        )  # fmt: skip


def _graph(c, s: ClusterSettings, p: dict) -> None:
    """The tasks inside the exit handler, in Algorithm 1's order."""
    data = _light(
        c.prepare_data(
            preset=p["preset"], overrides=p["overrides"], data_uri=p["data_uri"], model_uri=p["model_uri"],
            mlflow_uri=p["mlflow_uri"], kfp_run_id=p["run_id"], rounds=p["rounds"], model_name=p["model_name"],
            train_pod=s.train_pod,
        ),
        s,
        cache=False,  # resolves and checks the run's parameters: never reuse another run's answer
    )  # fmt: skip
    base = _gpu(
        c.warm_start(
            preset=p["preset"], overrides=p["overrides"], model_uri=p["model_uri"], dataset=data.outputs["dataset"],
            kfp_run_id=p["run_id"],
        ),
        s,
    )  # fmt: skip
    evaluation = _per_method(c, s, p, data, base)
    _select_register_promote(c, s, p, evaluation, data.outputs["model_name"])


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function for ``settings`` (contract, train pod, sizes)."""
    s = settings or ClusterSettings()
    c = build_components(s.contract.light_image, s.contract.gpu_image, s.containerized)
    on = "one RayJob per method" if s.train_pod == "launcher" else "a GPU pod per method"

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"DC-GRPO post-training: data prep, warm start, training ({on}, all rounds), FP8 export, vLLM "
        "evaluation, MLflow registration and gated promotion.",
    )
    def dc_grpo(
        preset: str = DEFAULT_PRESET,
        overrides: list = [],  # noqa: B006  (KFP pipeline defaults are data, not mutable state)
        data_uri: str = "",
        model_uri: str = "",
        methods: list = ["grpo", "dc-grpo"],  # noqa: B006
        rounds: int = 0,
        mlflow_uri: str = "",
        model_name: str = "",
        force_promotion: bool = False,
    ):
        """DC-GRPO post-training of one preset, compared across methods, FP8 export, gated promotion.

        Args:
            preset: Run config preset: tiny-cpu, qwen3-8b or qwen3-30b-a3b. Every empty or 0 parameter below takes this preset's value.
            overrides: Config overrides on top of the preset, e.g. ["train.lr=1e-6", "eval.max_problems=64"].
            data_uri: DAPO-Math-17K parquet (raw or prepared), s3:// or a path in the image; empty = the synthetic arithmetic task.
            model_uri: HF-format base model (s3:// or a path); empty = the preset's model.path (tiny-cpu: a tiny model with an SFT warm start).
            methods: Methods trained side by side; the best by the gate metric is registered (grpo, dual-grpo, dc-grpo, tis, mis, icepop).
            rounds: Training rounds per method, all in one train task (a checkpoint and held-out accuracy after each); 0 = the preset's train.rounds.
            mlflow_uri: MLflow tracking URI as seen from the pipeline pods, e.g. http://mlflow:5000; empty = the preset's tracking.mlflow_uri, else $MLFLOW_TRACKING_URI.
            model_name: Registered model name in MLflow; empty = the preset's registry.model_name (the champion it is gated against).
            force_promotion: Promote even when the gate refuses (recorded as forced on the model version).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        exit_task = _light(c.mark_failed(mlflow_uri=mlflow_uri, kfp_run_id=run_id), s, cache=False)
        with dsl.ExitHandler(exit_task, name="dc-grpo-run"):
            _graph(c, s, {"preset": preset, "overrides": overrides, "data_uri": data_uri, "model_uri": model_uri,
                          "methods": methods, "rounds": rounds, "mlflow_uri": mlflow_uri, "model_name": model_name,
                          "run_id": run_id, "force_promotion": force_promotion})  # fmt: skip

    return dc_grpo


def compile_pipeline(out_path: str, settings: ClusterSettings | None = None) -> str:
    compiler.Compiler().compile(build_pipeline(settings), package_path=out_path)
    return out_path
