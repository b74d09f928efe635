"""The `dc_grpo` pipeline: the data-flow diagram of DESIGN.md as KFP v2 tasks.

    prepare_data -> warm_start -> [per method, side by side:
        train round 1 .. N -> export_fp8 -> evaluate] -> select_best
        -> register_model -> (gate passes) promote

Each training round is its own task (a preempted GPU node loses at most one
round) with retries; methods run in a ParallelFor; the best method by the gate
metric is registered; promotion runs only under dsl.If; an exit handler marks
the MLflow runs failed when anything fails.

Round count: ``prepare_data`` resolves the ``rounds`` parameter (0 = the
preset's ``train.rounds``) and refuses more than the ``max_rounds`` compiled
in, before any GPU pod starts. After the warm start the pipeline holds one
If/Elif/Else branch per possible count (``<n>-rounds``), each the rest of the
run with an unrolled chain of exactly n round tasks per method: only the chosen
branch is scheduled, so a run never starts a pod for a round it does not train.
(One branch per count rather than a single chain ending in ``dsl.OneOf``: the
branches need no output of each other, and kfp.local replaces any task-output
parameter fed into a ParallelFor with the loop item, so the count cannot enter
the method loop as a parameter; inside branch n it is the constant n.)

Cluster names (images, GPU pool, secrets, PVCs) come from the deployment
contract (``dcgrpo.deploy.DeploymentContract``), applied through
kfp-kubernetes (ignored by kfp.local); the contract also travels to the round
tasks as ``$DCGRPO_DEPLOYMENT`` so the RayJobs they start use the same names.
"""

# No `from __future__ import annotations` here: KFP reads the pipeline signature at runtime.

from contextlib import nullcontext
from dataclasses import dataclass, field

from dcgrpo.components import build_components
from kfp import dsl, kubernetes

from dcgrpo.deploy import ENV_VAR, DeploymentContract
from dcgrpo.steps import MODEL_STORE_ENV

PIPELINE_NAME = "dc-grpo"
ROUND_TASK = "train-round-{}"
"""Display name of round k (1-based): ``dcgrpo.pipeline.compiled_max_rounds`` counts them."""


def default_max_rounds() -> int:
    """Enough rounds for every preset (qwen3-8b and qwen3-30b-a3b ask for 10)."""
    from dcgrpo.config import PRESETS, load_config

    return max(load_config(preset=p).train.rounds for p in PRESETS)


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time settings: the deployment contract plus sizes and retries (what the compiled YAML carries)."""

    contract: DeploymentContract = field(default_factory=DeploymentContract)
    max_rounds: int = field(default_factory=default_max_rounds)
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
    task.set_env_variable("DCGRPO_MODEL_CACHE", c.model_cache_mount)
    _checkpoint_volume(task, c)
    if retry and s.retries > 0:
        task.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    return _secrets(task, c, loads_models=True)


def _checkpoint_volume(task: dsl.PipelineTask, c: DeploymentContract) -> dsl.PipelineTask:
    """The checkpoint volume, where weights stay between tasks (``dcgrpo.steps.model_store``): each task's Model
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


def _branch(n: int, rounds, max_rounds: int):
    """The If/Elif/Else group of the chain of ``n`` rounds (Else: the largest count; prepare_data bounds it)."""
    name = f"{n}-rounds"
    if n == max_rounds:
        return dsl.Else(name=name)
    return dsl.If(rounds == n, name=name) if n == 1 else dsl.Elif(rounds == n, name=name)


def _round_task(c, s: ClusterSettings, on_launcher: bool, **inputs) -> dsl.PipelineTask:
    """One round task: on a GPU pod (built-in loop, single-node verl), or on a light pod that only launches and
    follows the verl RayJob (the RayJob holds the GPUs: a GPU here would sit idle for the whole round)."""
    if not on_launcher:
        return _gpu(c.train_round(**inputs), s)
    step = _checkpoint_volume(_light(c.train_round_launcher(**inputs), s), s.contract)  # the RayJob's volume
    if s.retries > 0:  # a lost launcher pod re-attaches to the RayJob of its round
        step.set_retry(num_retries=s.retries, backoff_duration="60s", backoff_factor=2.0)
    return step


def _train_chain(c, s: ClusterSettings, n: int, p: dict, method, dataset, base_model, on_launcher: bool):
    """Rounds 1..n of one method, one task each, each resuming the previous one's model; returns the last model."""
    model = base_model
    for k in range(n):
        step = _round_task(
            c, s, on_launcher, preset=p["preset"], overrides=p["overrides"], method=method, round_index=k,
            rounds=n, mlflow_uri=p["mlflow_uri"], kfp_run_id=p["run_id"], dataset=dataset, model_in=model,
        ).set_display_name(ROUND_TASK.format(k + 1))  # fmt: skip
        step.set_env_variable(ENV_VAR, s.contract.to_env())  # the RayJob a verl round starts uses these names
        model = step.outputs["model"]
    return model


def _train_select_promote(c, s: ClusterSettings, n: int, p: dict, data, base, model_name, on_launcher: bool) -> None:
    """Everything after the warm start for a run of ``n`` rounds: per method (side by side) the rounds, FP8 export
    and evaluation; then the best method is registered and, if the gate passes, promoted."""
    dataset = data.outputs["dataset"]
    tag = f"{n}-rounds{'-rayjob' if on_launcher else ''}"
    with dsl.ParallelFor(p["methods"], name=f"methods-{tag}") as method:
        model = _train_chain(c, s, n, p, method, dataset, base.outputs["model"], on_launcher)
        fp8 = _gpu(c.export_fp8(preset=p["preset"], overrides=p["overrides"], model=model), s)
        evaluation = _gpu(
            c.evaluate(
                preset=p["preset"], overrides=p["overrides"], mlflow_uri=p["mlflow_uri"], dataset=dataset,
                model=model, fp8_model=fp8.outputs["fp8_model"],
            ),
            s,
        )  # fmt: skip
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
    with dsl.If(registered.outputs["Output"] == True, name=f"gate-passed-{tag}"):  # noqa: E712 (KFP condition)
        _light(
            c.promote(
                preset=p["preset"], overrides=p["overrides"], mlflow_uri=p["mlflow_uri"], model_name=model_name,
                version=registered.outputs["version"], force=p["force_promotion"],
            ),
            s,
            cache=False,
        )  # fmt: skip


def _rounds_on(c, s: ClusterSettings, n: int, p: dict, data, base, model_name) -> None:
    """The rest of an ``n``-round run twice, under If/Else on prepare_data's ``round_pod``: with verl on a RayJob
    the round tasks are light launcher pods, otherwise GPU pods. The backend is a run-time config value (the
    qwen presets use verl, tiny-cpu the built-in loop) and pod sizes are fixed at compile time, so one YAML holds
    both and the run's config picks; only the chosen branch is scheduled. (Split above the method loop: a
    per-round If/Else would need ``dsl.OneOf`` inside the ParallelFor to feed ``dsl.Collected``.)"""
    rounds_pod = data.outputs["round_pod"]
    with dsl.If(rounds_pod == "launcher", name=f"rayjob-{n}-rounds"):
        _train_select_promote(c, s, n, p, data, base, model_name, on_launcher=True)
    with dsl.Else(name=f"gpu-{n}-rounds"):
        _train_select_promote(c, s, n, p, data, base, model_name, on_launcher=False)


def build_pipeline(settings: ClusterSettings | None = None):
    """The pipeline function for ``settings`` (contract, max rounds, sizes)."""
    s = settings or ClusterSettings()
    c = build_components(s.contract.light_image, s.contract.gpu_image, s.containerized)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DC-GRPO post-training: data prep, warm start, training rounds per method, "
        f"FP8 export, vLLM evaluation, MLflow registration and gated promotion (1 to {s.max_rounds} rounds).",
    )
    def dc_grpo(
        preset: str = "tiny-cpu",
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
            rounds: Training rounds per method (each its own task); 0 = the preset's train.rounds. At most the count compiled in (dcgrpo compile --max-rounds).
            mlflow_uri: MLflow tracking URI as seen from the pipeline pods, e.g. http://mlflow:5000; empty = the preset's tracking.mlflow_uri, else $MLFLOW_TRACKING_URI.
            model_name: Registered model name in MLflow; empty = the preset's registry.model_name (the champion it is gated against).
            force_promotion: Promote even when the gate refuses (recorded as forced on the model version).
        """
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        exit_task = _light(c.mark_failed(mlflow_uri=mlflow_uri, kfp_run_id=run_id), s, cache=False)
        with dsl.ExitHandler(exit_task, name="dc-grpo-run"):
            data = _light(
                c.prepare_data(
                    preset=preset, overrides=overrides, data_uri=data_uri, model_uri=model_uri, mlflow_uri=mlflow_uri,
                    kfp_run_id=run_id,
                    rounds=rounds, model_name=model_name, max_rounds=s.max_rounds,
                ),
                s,
                cache=False,  # resolves and checks the run's parameters: never reuse another run's answer
            )  # fmt: skip
            n_rounds, registered_name = data.outputs["rounds"], data.outputs["model_name"]
            base = _gpu(
                c.warm_start(
                    preset=preset,
                    overrides=overrides,
                    model_uri=model_uri,
                    dataset=data.outputs["dataset"],
                    kfp_run_id=run_id,
                ),  # fmt: skip
                s,
            )
            p = {"preset": preset, "overrides": overrides, "methods": methods, "mlflow_uri": mlflow_uri,
                 "run_id": run_id, "force_promotion": force_promotion}  # fmt: skip
            for n in range(1, s.max_rounds + 1):
                with _branch(n, n_rounds, s.max_rounds) if s.max_rounds > 1 else nullcontext():
                    _rounds_on(c, s, n, p, data, base, registered_name)

    return dc_grpo


def compile_pipeline(out_path: str, settings: ClusterSettings | None = None) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(settings), package_path=out_path)
    return out_path
