"""DC-GRPO inside verl: a registered trainer, its Hydra overrides, its KubeRay launch.

- ``trainer``: the ``dc_grpo`` verl v1 trainer (needs verl; imported by verl
  itself through the ``verl.plugins`` entry point on ``import verl``, in the
  driver and in every Ray worker).
- ``config``: verl Hydra overrides rendered from the project's ``RunConfig``.
- ``rayjob``: a KubeRay ``RayJob`` rendered from the same config, submitted and
  followed to completion; plus the single-node, in-pod variant.
- ``launch``: the process both run (``python -m dcgrpo.verl_plugin.launch``):
  records where this launch stops, then runs verl's ``main_ppo``.
- ``rounds``: one pipeline round on verl (stage inputs on the shared checkpoint
  volume, launch, read back the HF weights and lambda).
- ``reward``: the math-verify reward as verl's custom reward function.

This package's ``__init__`` imports nothing from verl, so ``config`` and
``rayjob`` work in environments without it (the main venv, the KFP step).
"""

TRAINER_NAME = "dc_grpo"
"""The name the trainer is registered under: ``trainer.v1.trainer_mode=dc_grpo``."""
CONFIG_KEY = "dc_grpo"
"""Our keys live under verl's ``algorithm.dc_grpo`` (``+algorithm.dc_grpo.*`` overrides)."""

ROUND_FILE = "dcgrpo_round.json"
"""``{"stop_at_step": N}`` in verl's checkpoint dir: the trainer ends this launch after step N (one pipeline
round) while ``trainer.total_training_steps`` stays the whole run's, so the LR schedule and the config verl
logs to MLflow are the same in every round (MLflow refuses a changed param value on a re-attached run)."""

__all__ = ["CONFIG_KEY", "ROUND_FILE", "TRAINER_NAME"]
