"""verl Hydra overrides rendered from the project's one ``RunConfig``.

Users never write verl YAML: ``render_overrides`` maps each field of ours onto
verl's ``ppo_trainer`` config (``python -m verl.trainer.main_ppo <overrides>``)
and ``render_env`` gives the process environment verl reads itself (MLflow).
Imports nothing from verl.

Batch arithmetic (verl counts prompts in ``data.train_batch_size`` and in
``actor.ppo_mini_batch_size``, and multiplies both by ``rollout.n``):

    train.prompts_per_batch -> data.train_batch_size            (prompts per step)
    train.group_size        -> actor_rollout_ref.rollout.n      (responses per prompt)
    train.ppo_mini_batch    -> actor.ppo_mini_batch_size        (prompts per optimiser step)
    responses per optimiser step = ppo_mini_batch x group_size, split over nnodes x gpus_per_node GPUs
"""

from __future__ import annotations

import re
from typing import Any

from dcgrpo.config import ConfigError, RunConfig
from dcgrpo.verl_plugin import CONFIG_KEY, TRAINER_NAME
from dcgrpo.verl_plugin.launch import TRAIN_MAIN as TRAIN_MAIN  # re-exported: verl's module

LAUNCH_MAIN = "dcgrpo.verl_plugin.launch"
"""What a launch runs: records the round's last step, then runs verl's ``TRAIN_MAIN`` (``launch`` module)."""

REWARD_MODULE = "pkg://dcgrpo.verl_plugin.reward"
REWARD_FUNCTION = "compute_score"
"""verl's custom reward function: ``dcgrpo.verl_plugin.reward.compute_score`` (math-verify)."""
ROLLOUT_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "bfloat16"}
"""vLLM dtype per rollout precision; fp8 adds ``quantization=fp8`` on top of bf16 activations."""

_BARE = re.compile(r"^[A-Za-z0-9_./:~+-]*[A-Za-z0-9_/~]$|^[A-Za-z0-9]$")


def hydra_value(value: Any) -> str:
    """A Python value as a Hydra override value (quoted when the grammar needs it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    if _BARE.match(text) and text.lower() not in {"null", "true", "false"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_batches(cfg: RunConfig) -> None:
    t, v = cfg.train, cfg.verl
    gpus = v.nnodes * v.gpus_per_node
    per_update = t.ppo_mini_batch * t.group_size
    if per_update % gpus:
        raise ConfigError(
            f"train.ppo_mini_batch x train.group_size = {t.ppo_mini_batch} x {t.group_size} = {per_update} responses "
            f"per optimiser step must divide over verl.nnodes x verl.gpus_per_node = {gpus} GPUs"
        )
    if (per_update // gpus) % v.micro_batch_per_gpu and per_update // gpus > v.micro_batch_per_gpu:
        raise ConfigError(
            f"verl.micro_batch_per_gpu ({v.micro_batch_per_gpu}) must divide the {per_update // gpus} responses "
            "each GPU gets per optimiser step"
        )
    if v.rollout_tp > v.gpus_per_node or v.gpus_per_node % v.rollout_tp:
        raise ConfigError(f"verl.rollout_tp ({v.rollout_tp}) must divide verl.gpus_per_node ({v.gpus_per_node})")
    if cfg.rollout.weight_grid != "none":  # verl's vLLM rollout serves the checkpoint as it is
        raise ConfigError(
            f"rollout.weight_grid={cfg.rollout.weight_grid} is simulated by the built-in loop only; verl's rollout "
            "cannot round its weights onto it"
        )


def _megatron_overrides(cfg: RunConfig) -> dict[str, Any]:
    """verl's Megatron engine for actor and ref (verl.strategy=megatron); {} for FSDP.

    ``model_engine=megatron`` is the Hydra choice that swaps actor, ref and
    critic to verl's ``megatron_*`` configs (what the deprecated
    ``--config-name ppo_megatron_trainer`` does). verl's ref would follow the
    actor's parallel sizes by itself; they are set explicitly so the two cannot drift.
    """
    v, t = cfg.verl, cfg.train
    if v.strategy != "megatron":
        return {}
    # verl's own check: responses per step over Megatron data-parallel ranks x micro-batch
    dp = v.nnodes * v.gpus_per_node // (v.megatron_tp * v.megatron_pp * v.megatron_cp)
    if t.responses_per_batch % (dp * v.micro_batch_per_gpu):
        raise ConfigError(
            f"train.prompts_per_batch x train.group_size = {t.responses_per_batch} responses per step must divide "
            f"over {dp} Megatron data-parallel ranks x verl.micro_batch_per_gpu ({v.micro_batch_per_gpu})"
        )
    sizes = {
        "tensor_model_parallel_size": v.megatron_tp,
        "pipeline_model_parallel_size": v.megatron_pp,
        "context_parallel_size": v.megatron_cp,
        "expert_model_parallel_size": v.megatron_ep,
        "expert_tensor_parallel_size": v.megatron_etp,
        "sequence_parallel": v.megatron_sequence_parallel,
        "param_offload": v.megatron_param_offload,
    }
    o: dict[str, Any] = {"model_engine": "megatron"}
    for role in ("actor", "ref"):
        o.update({f"actor_rollout_ref.{role}.megatron.{k}": val for k, val in sizes.items()})
    o["actor_rollout_ref.actor.megatron.optimizer_offload"] = v.megatron_optimizer_offload
    return o


def render_overrides(
    cfg: RunConfig,
    *,
    train_files: str,
    val_files: str | None = None,
    model_path: str | None = None,
    total_steps: int | None = None,
    experiment_name: str | None = None,
    local_dir: str | None = None,
) -> list[str]:
    """verl Hydra overrides for one training run (all its rounds: one launch, or a retried one, renders the same).

    Args:
        cfg: the run config.
        train_files / val_files: prepared parquet (verl schema) from the prep step.
        model_path: HF model directory; default ``cfg.model.path``.
        total_steps: verl's ``trainer.total_training_steps`` (the LR schedule's
            horizon); default the whole run, rounds x steps_per_round (the
            launcher's ``--stop-at-step`` ends the launch there).
        experiment_name: verl's experiment (the MLflow run name when no run id
            is attached); default ``tracking.run_name`` or the config hash.
        local_dir: verl's checkpoint directory for this run (its rounds and
            retried launches share it); default ``verl.checkpoint_dir``.
    """
    model = model_path or cfg.model.path
    _check_render_inputs(cfg, model, train_files, val_files)
    steps = total_steps or cfg.train.rounds * cfg.train.steps_per_round
    o: dict[str, Any] = {
        **_trainer_overrides(cfg, steps, experiment_name, local_dir),
        **_data_overrides(cfg, train_files, val_files),
        "actor_rollout_ref.model.path": model,
        **_actor_overrides(cfg),
        **_rollout_overrides(cfg),
        # algorithm: GRPO outcome advantage; the method itself is ours, below
        "algorithm.adv_estimator": "grpo",
        "algorithm.norm_adv_by_std_in_grpo": cfg.train.norm_adv_by_std,
        "algorithm.use_kl_in_reward": False,
        # reward: our math-verify scorer (same as the single-machine loop), for every data_source
        "reward.custom_reward_function.path": REWARD_MODULE,
        "reward.custom_reward_function.name": REWARD_FUNCTION,
        **{f"+reward.custom_reward_function.reward_kwargs.{k}": val for k, val in cfg.reward.model_dump().items()},
    }
    o.update(_megatron_overrides(cfg))
    out = [f"{k}={hydra_value(val)}" for k, val in o.items()]
    v, m = cfg.verl, cfg.method
    if v.trainer_mode == TRAINER_NAME:
        # new keys need '+': every MethodConfig field, so the trainer validates them with our own model
        out += [f"+algorithm.{CONFIG_KEY}.{k}={hydra_value(val)}" for k, val in m.model_dump(mode="json").items()]
    elif m.name != "grpo":
        raise ConfigError(f"verl.trainer_mode=sync runs plain GRPO only; method.name={m.name!r} needs dc_grpo")
    return out + list(v.extra_overrides)


def _check_render_inputs(cfg: RunConfig, model: str | None, train_files: str, val_files: str | None) -> None:
    if not model:
        raise ConfigError("model.path: verl trains an existing HF model directory; build or export one first")
    _check_batches(cfg)
    for what, path in (("train files", train_files), ("val files", val_files), ("model.path", model)):
        if path and str(path).startswith("s3://"):
            raise ConfigError(
                f"{what} {path}: verl reads local paths (or hdfs://) on every node, not s3://; put it on the "
                "checkpoint volume (the pipeline's verl backend stages the dataset and model there itself)"
            )


def _trainer_overrides(cfg: RunConfig, steps: int, experiment_name: str | None, local_dir: str | None) -> dict:
    """verl v1 with our registered trainer (or verl's sync for a plain-GRPO reference run); checkpoints each round."""
    t, v = cfg.train, cfg.verl
    return {
        "trainer.use_v1": True,
        "trainer.v1.trainer_mode": v.trainer_mode,
        "trainer.nnodes": v.nnodes,
        "trainer.n_gpus_per_node": v.gpus_per_node,
        "trainer.total_training_steps": steps,
        "trainer.total_epochs": 1_000_000,  # steps decide; epochs never cut a run short
        "trainer.save_freq": v.save_freq or t.steps_per_round,
        "trainer.default_local_dir": local_dir or v.checkpoint_dir,
        "trainer.resume_mode": "auto",
        "trainer.val_before_train": False,
        "trainer.test_freq": -1,  # evaluation is the pipeline's own step (vLLM avg@k)
        "trainer.logger": ["console", "mlflow"],
        "trainer.project_name": cfg.tracking.experiment,  # MLflow experiment
        "trainer.experiment_name": experiment_name or cfg.tracking.run_name or f"verl-{cfg.config_hash()}",
    }


def _data_overrides(cfg: RunConfig, train_files: str, val_files: str | None) -> dict:
    """The prep step's parquet; the batch counts prompts."""
    return {
        "data.train_files": train_files,
        "data.val_files": val_files or train_files,
        "data.train_batch_size": cfg.train.prompts_per_batch,
        "data.max_prompt_length": cfg.data.max_prompt_length,
        "data.max_response_length": cfg.rollout.max_response_length,
        "data.filter_overlong_prompts": True,
        "data.truncation": "error",
        "data.seed": cfg.data.seed,
    }


def _actor_overrides(cfg: RunConfig) -> dict:
    """The actor (training engine); ``ppo_mini_batch_size`` counts prompts."""
    t, v, actor = cfg.train, cfg.verl, "actor_rollout_ref.actor"
    return {
        f"{actor}.strategy": v.strategy,
        f"{actor}.optim.lr": t.lr,
        f"{actor}.optim.weight_decay": t.weight_decay,
        f"{actor}.optim.betas": list(t.betas),
        f"{actor}.optim.clip_grad": t.grad_clip,
        f"{actor}.ppo_mini_batch_size": t.ppo_mini_batch,
        f"{actor}.ppo_micro_batch_size_per_gpu": v.micro_batch_per_gpu,
        f"{actor}.ppo_epochs": t.ppo_epochs,
        f"{actor}.clip_ratio_low": t.clip_low,
        f"{actor}.clip_ratio_high": t.clip_high,
        f"{actor}.clip_ratio_c": t.clip_ratio_c,
        f"{actor}.loss_agg_mode": t.loss_agg,
        f"{actor}.use_kl_loss": t.kl_loss_coef > 0,
        f"{actor}.kl_loss_coef": t.kl_loss_coef,
        f"{actor}.entropy_coeff": t.entropy_coef,
        f"{actor}.data_loader_seed": t.seed,
        # full HF weights beside the FSDP shards: the pipeline's export and eval read them directly
        f"{actor}.checkpoint.save_contents": ["model", "optimizer", "extra", "hf_model"],
        f"{actor}.checkpoint.load_contents": ["model", "optimizer", "extra"],
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": v.micro_batch_per_gpu,
    }


def _rollout_overrides(cfg: RunConfig) -> dict:
    """The rollout (inference engine): its log-probs at sampling time are half of d."""
    r, v, rollout = cfg.rollout, cfg.verl, "actor_rollout_ref.rollout"
    return {
        f"{rollout}.name": r.engine,
        f"{rollout}.n": cfg.train.group_size,
        f"{rollout}.temperature": r.temperature,
        f"{rollout}.top_p": r.top_p,
        f"{rollout}.dtype": ROLLOUT_DTYPE[r.precision],
        f"{rollout}.quantization": "fp8" if r.precision == "fp8" else None,
        f"{rollout}.calculate_log_probs": True,
        f"{rollout}.gpu_memory_utilization": r.gpu_memory_utilization,
        f"{rollout}.tensor_model_parallel_size": v.rollout_tp,
        f"{rollout}.log_prob_micro_batch_size_per_gpu": v.micro_batch_per_gpu,
        f"{rollout}.seed": r.seed,
    }


def render_env(cfg: RunConfig, mlflow_uri: str | None = None, mlflow_run_id: str | None = None) -> dict[str, str]:
    """Environment verl reads itself: its MLflow logger takes ``MLFLOW_TRACKING_URI``
    and attaches to ``MLFLOW_RUN_ID`` when set (so the pipeline's run gets the curves)."""
    env: dict[str, str] = {}
    uri = mlflow_uri or cfg.tracking.mlflow_uri
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    if mlflow_run_id:
        env["MLFLOW_RUN_ID"] = mlflow_run_id
    return env


def ray_env_overrides(env: dict[str, str]) -> list[str]:
    """Forward ``env`` to every Ray actor through verl's ``ray_init.runtime_env``
    (the TaskRunner that owns the MLflow logger may land on any node)."""
    return [f"+ray_kwargs.ray_init.runtime_env.env_vars.{k}={hydra_value(val)}" for k, val in sorted(env.items())]


def train_command(overrides: list[str], python: str = "python", stop_at_step: int | None = None) -> list[str]:
    """argv that runs verl with these overrides, stopping after ``stop_at_step`` (one round) if given."""
    stop = ["--stop-at-step", str(stop_at_step)] if stop_at_step is not None else []
    return [python, "-m", LAUNCH_MAIN, *stop, *overrides]
