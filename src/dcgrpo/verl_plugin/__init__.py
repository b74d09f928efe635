"""DC-GRPO inside verl: a registered trainer, its Hydra overrides, its KubeRay launch.

- ``trainer``: the ``dc_grpo`` verl v1 trainer (needs verl; imported by verl
  itself through the ``verl.plugins`` entry point on ``import verl``, in the
  driver and in every Ray worker).
- ``config``: verl Hydra overrides rendered from the project's ``RunConfig``.
- ``rayjob``: a KubeRay ``RayJob`` rendered from the same config, submitted and
  followed to completion; plus the single-node, in-pod variant.

This package's ``__init__`` imports nothing from verl, so ``config`` and
``rayjob`` work in environments without it (the main venv, the KFP step).
"""

TRAINER_NAME = "dc_grpo"
"""The name the trainer is registered under: ``trainer.v1.trainer_mode=dc_grpo``."""
CONFIG_KEY = "dc_grpo"
"""Our keys live under verl's ``algorithm.dc_grpo`` (``+algorithm.dc_grpo.*`` overrides)."""

__all__ = ["CONFIG_KEY", "TRAINER_NAME"]
