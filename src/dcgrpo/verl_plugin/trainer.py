"""The ``dc_grpo`` verl trainer: DC-GRPO as a plugin to verl's sync PPO trainer.

A registered advantage estimator never sees log-probs, so DC-GRPO enters verl
as a trainer (``trainer.v1.trainer_mode=dc_grpo``) that subclasses verl's
``PPOTrainerSync`` and changes three things:

- ``_compute_advantage``: the token advantages come from ``dcgrpo.algorithm``
  (the functions the single-machine loop uses), dispatched through the method
  registry: d_t from verl's rollout log-probs (vLLM, ``rollout_log_probs``) and
  recomputed log-probs (FSDP/Megatron, ``old_log_probs``); GRPO advantage per
  prompt group; then ``shape_advantages`` (Eq. 8-10 penalty, or a baseline's
  IS weights / mask, which verl's actor loss reads as ``rollout_is_weights``).
- ``on_step_end``: after verl syncs the weights to the rollout engine (super),
  one projected dual-ascent step on lambda (Eq. 11).
- checkpoints: lambda's state is written into verl's ``global_step_N`` folder
  (``dc_grpo.json``) before verl writes its "latest" tracker, and read back on
  resume.

Metrics go into verl's step dict (logged by verl's ``Tracking``: console,
MLflow) under the project's names: ``dc/lambda``, ``dc/discrepancy_{mean,max,
p99,std}``, ``dc/violation``, ``dc/penalty_mean`` and ``dc/lambda_next``; the
same values, one JSON line a step, go into ``dc_metrics.jsonl`` beside the
checkpoints (``launch.DC_METRICS_FILE``): what the pipeline's train step reads.

The shaping itself is ``shape_batch``: a pure function of a padded verl
``DataProto``, tested without Ray.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pydantic import ValidationError

from dcgrpo.algorithm.dual import LagrangeMultiplier
from dcgrpo.algorithm.methods import get_method
from dcgrpo.algorithm.step import dual_step, make_multiplier, shape_step
from dcgrpo.config import ConfigError, MethodConfig
from dcgrpo.verl_plugin import CONFIG_KEY, TRAINER_NAME
from dcgrpo.verl_plugin.launch import append_dc_metrics, read_stop_step

log = logging.getLogger(__name__)

try:
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.protocol import DataProto
    from verl.trainer.ppo.v1.trainer_base import register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.workers.utils.padding import response_to_nested
except ImportError as exc:  # verl swallows plugin import errors at DEBUG level: say it louder
    log.warning("dcgrpo: cannot register verl trainer %r: %s", TRAINER_NAME, exc)
    raise

Tensor = torch.Tensor

CHECKPOINT_FILE = "dc_grpo.json"
"""Lambda's state inside verl's ``global_step_N`` checkpoint folder."""


def method_config_from_verl(algorithm: DictConfig | dict | None) -> MethodConfig:
    """Our ``MethodConfig`` from verl's ``algorithm.dc_grpo`` node.

    Missing keys take ``dcgrpo.config``'s defaults (the only place defaults
    live); unknown or invalid keys fail naming the ``+algorithm.dc_grpo`` key.
    """
    node = (algorithm or {}).get(CONFIG_KEY) or {}
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    try:
        return MethodConfig.model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(f"algorithm.{CONFIG_KEY}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid verl config for the {TRAINER_NAME} trainer: {errors}") from None


def shape_batch(
    data: DataProto, cfg: MethodConfig, lam: float, norm_by_std: bool = True
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Advantages for one verl batch, from ``dcgrpo.algorithm`` only.

    Args:
        data: padded verl batch with ``response_mask``, ``old_log_probs``
            (training engine), ``rollout_log_probs`` (inference engine),
            ``token_level_rewards`` (all (B, T)) and ``non_tensor_batch["uid"]``
            (B,) prompt ids (the GRPO groups).
        cfg: the method (``algorithm.dc_grpo``).
        lam: current Lagrange multiplier (used by penalised methods).
        norm_by_std: GRPO std normalisation (verl's ``norm_adv_by_std_in_grpo``).

    Returns:
        (fields, stats). fields: ``advantages`` and ``returns`` (B, T) (as
        verl's GRPO, returns = advantages), plus ``response_mask`` when the
        method drops sequences and ``rollout_is_weights`` when it weights
        tokens. stats: 0-d tensors under ``dcgrpo.algorithm.step.SHAPING_KEYS`` (``dc/discrepancy_*``,
        ``dc/penalty_mean``, ``dc/lambda``): the kernel the built-in loop calls too.
    """
    for key in ("response_mask", "old_log_probs", "rollout_log_probs", "token_level_rewards"):
        if key not in data.batch.keys():
            hint = " (set actor_rollout_ref.rollout.calculate_log_probs=True)" if key == "rollout_log_probs" else ""
            raise KeyError(f"{TRAINER_NAME}: the batch has no {key!r}{hint}")
    mask = data.batch["response_mask"].to(torch.float32)  # (B, T)
    logp_train = data.batch["old_log_probs"].to(torch.float32)  # (B, T) FSDP/Megatron recompute
    logp_infer = data.batch["rollout_log_probs"].to(torch.float32)  # (B, T) vLLM at sampling time
    rewards = data.batch["token_level_rewards"].sum(-1)  # (B,) outcome reward sits on the last token
    out = shape_step(rewards, list(data.non_tensor_batch["uid"]), logp_train, logp_infer, mask, cfg, lam, norm_by_std)
    shaped = out.shaped
    fields = {"advantages": shaped.advantages, "returns": shaped.advantages}
    if not torch.equal(shaped.mask, mask):  # a method dropped sequences, or NaN/inf tokens left the mask
        fields["response_mask"] = shaped.mask.to(data.batch["response_mask"].dtype)
    if shaped.is_weights is not None:
        fields["rollout_is_weights"] = shaped.is_weights
    return fields, out.metrics


@register_trainer(TRAINER_NAME)
class DCGRPOTrainer(PPOTrainerSync):
    """verl's sync PPO trainer with DC-GRPO advantages and the dual step on lambda."""

    def __init__(self, config: DictConfig) -> None:
        super().__init__(config)
        self.dc_method = method_config_from_verl(config.algorithm)
        self._check_verl_config(config)
        m = self.dc_method
        self.multiplier = make_multiplier(m, get_method(m.name).dual_ascent)
        self._step_discrepancy: float | None = None  # this step's batch-mean d, for the dual step
        self._step_metrics: dict[str, float] = {}  # this step's shaping dc/* values, for DC_METRICS_FILE

    # verl's base class branches on the literal "sync" (replay buffer, TransferQueue
    # checkpoints, in-flight re-issue); this trainer *is* the sync loop under another name.
    @property
    def trainer_mode(self) -> str:
        return "sync"

    @trainer_mode.setter
    def trainer_mode(self, value: str) -> None:
        self.registered_mode = value

    @staticmethod
    def _check_verl_config(config: DictConfig) -> None:
        algo = config.algorithm
        problems = []
        if algo.adv_estimator != "grpo":
            problems.append(
                f"algorithm.adv_estimator must be grpo (got {algo.adv_estimator}); it also decides the critic"
            )
        if algo.use_kl_in_reward:
            problems.append("algorithm.use_kl_in_reward must be False (use actor kl loss instead)")
        corr = algo.get("rollout_correction") or {}
        if corr.get("rollout_is") or corr.get("rollout_rs") or corr.get("bypass_mode"):
            problems.append(
                "algorithm.rollout_correction must be off: TIS/MIS/IcePop are algorithm.dc_grpo.name=tis|mis|icepop"
            )
        if not config.actor_rollout_ref.rollout.calculate_log_probs:
            problems.append("actor_rollout_ref.rollout.calculate_log_probs must be True (d needs rollout log-probs)")
        if problems:
            raise ConfigError(f"verl config unusable with the {TRAINER_NAME} trainer:\n  " + "\n  ".join(problems))

    # ---- advantage: the one phase DC-GRPO changes ---------------------------------------
    def _compute_advantage(self, batch, metrics: dict) -> Any:
        fields = ["uid", "response_mask", "rm_scores", "rollout_log_probs", "old_log_probs"]
        nested = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        self._check_single_turn(batch.keys)
        response_mask = nested["response_mask"]  # nested (B, j) ragged
        data = DataProto(batch=nested.to_padded_tensor())  # (B, T) padded
        data.batch["token_level_rewards"] = data.batch["rm_scores"]
        data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)

        lam = self.multiplier.value
        out, stats = shape_batch(data, self.dc_method, lam, self.config.algorithm.get("norm_adv_by_std_in_grpo", True))

        # metrics: floats once per step (host sync); dc/violation and dc/lambda_next come with the dual step
        metrics.update({k: float(v) for k, v in stats.items()})
        self._step_discrepancy = metrics["dc/discrepancy_mean"]
        self._step_metrics = {k: metrics[k] for k in stats}

        nested_out = {k: response_to_nested(v, response_mask) for k, v in out.items()}
        return tq.kv_batch_put(
            keys=batch.keys, partition_id=batch.partition_id, fields=TensorDict(nested_out, batch_size=len(batch))
        )

    @staticmethod
    def _check_single_turn(keys: list[str]) -> None:
        # verl keys are "{uid}_{session}_{turn}"; multi-output agent sessions need verl's
        # final-output broadcast, which this trainer does not implement.
        sessions = {k.rsplit("_", 1)[0] for k in keys}
        if len(sessions) != len(keys):
            raise NotImplementedError(f"{TRAINER_NAME}: multi-output agent sessions are not supported")

    # ---- dual step: once per training step, after the weight sync -----------------------
    def on_step_end(self) -> None:
        super().on_step_end()  # syncs the new weights to the rollout replicas
        dual = self.dual_step()
        # verl merges these into this step's metrics right after on_step_end
        pending = getattr(self, "_pending_sync_metrics", None) or {}
        self._pending_sync_metrics = {**pending, **dual}
        # every dc/* value of the step, for the pipeline's train step: right after the step's checkpoint, not
        # after verl's validation and logging (a retried round whose checkpoint exists is not relaunched)
        append_dc_metrics(self.config.trainer.default_local_dir, self.global_steps, {**self._step_metrics, **dual})
        self._step_metrics = {}

    def dual_step(self) -> dict[str, float]:
        """One projected dual-ascent step on this step's mean d (Eq. 11, ``dcgrpo.algorithm.step.dual_step``):
        ``dc/violation`` and ``dc/lambda_next``. Once per step: a second call only reports lambda."""
        if self._step_discrepancy is None:
            return {"dc/lambda_next": self.multiplier.value}
        out = dual_step(self.multiplier, self.dc_method.name, self._step_discrepancy)
        self._step_discrepancy = None
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    def multiplier_after_step(self) -> LagrangeMultiplier:
        """Lambda as ``on_step_end`` will leave it (verl saves before ``on_step_end``)."""
        after = copy.deepcopy(self.multiplier)
        if self._step_discrepancy is not None and get_method(self.dc_method.name).dual_ascent:
            after.update(self._step_discrepancy)
        return after

    def save_dc_state(self, folder: str) -> str:
        """Write lambda's post-step state into ``folder``; atomic (tmp + rename)."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CHECKPOINT_FILE)
        state = {"method": self.dc_method.name, "multiplier": self.multiplier_after_step().state_dict()}
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)
        return path

    def load_dc_state(self, folder: str) -> bool:
        """Restore lambda from ``folder``; False (lambda_init kept) if the checkpoint has none."""
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            log.warning("%s: no %s in %s; lambda starts at %s", TRAINER_NAME, CHECKPOINT_FILE, folder, self.multiplier)
            return False
        with open(path) as f:
            state = json.load(f)
        self.multiplier.load_state_dict(state["multiplier"])
        log.info("%s: restored %s from %s", TRAINER_NAME, self.multiplier, path)
        return True

    def _save_folder(self) -> str:
        # where verl's _save_checkpoint writes this step
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    def _resume_folder(self) -> str:
        # where verl's _load_checkpoint resumed from (it parsed global_steps from this name)
        trainer = self.config.trainer
        if trainer.resume_mode == "resume_path":
            return os.path.abspath(trainer.resume_from_path)
        return os.path.join(os.path.abspath(trainer.default_local_dir), f"global_step_{self.global_steps}")

    # ---- one launch = one pipeline round ----------------------------------------------
    def fit(self, *args: Any, **kwargs: Any) -> Any:
        """verl's loop, ended after the step the launcher recorded (``ROUND_FILE``), with a checkpoint.

        Only the loop's bound moves: ``trainer.total_training_steps`` (the LR
        schedule's horizon and the value verl logs to MLflow) stays the whole run's.
        """
        stop = read_stop_step(self.config.trainer.default_local_dir)
        if stop is not None and stop < self.total_training_steps:
            log.info("%s: this launch stops after step %d of %d", TRAINER_NAME, stop, self.total_training_steps)
            self.total_training_steps = stop  # the loop's is_last_step: checkpoint, then return
        return super().fit(*args, **kwargs)

    def _save_checkpoint(self) -> None:
        self.save_dc_state(self._save_folder())  # before verl writes its "latest" tracker
        super()._save_checkpoint()

    def _load_checkpoint(self) -> None:
        super()._load_checkpoint()  # sets global_steps (0: fresh start)
        if self.global_steps > 0:
            self.load_dc_state(self._resume_folder())
