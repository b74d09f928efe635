"""The run config's ``verl`` section: where and how verl runs (multi-node training with the DC-GRPO plugin).

Its own module to keep ``dcgrpo.config`` a readable table; ``dcgrpo.config`` imports it (and re-exports it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dcgrpo.config_presets import Section


class VerlConfig(Section):
    """Multi-node training on verl (Ray) with the DC-GRPO plugin, and its KubeRay launch.

    The training hyperparameters come from ``train``/``method``/``rollout``;
    this section only says where and how verl runs. Rendered into verl Hydra
    overrides by ``dcgrpo.verl_plugin.config`` and into a RayJob by
    ``dcgrpo.verl_plugin.rayjob``.
    """

    trainer_mode: Literal["dc_grpo", "sync"] = "dc_grpo"
    """verl v1 trainer: ``dc_grpo`` (our plugin; runs every method.name) or verl's own ``sync`` (GRPO only)."""
    strategy: Literal["fsdp", "fsdp2", "megatron"] = "fsdp"
    """Training engine of the actor and ref (``megatron`` renders verl's ``model_engine=megatron``)."""
    megatron_tp: int = Field(1, gt=0)
    """Megatron tensor parallel size (strategy=megatron only, as are all megatron_* fields)."""
    megatron_pp: int = Field(1, gt=0)
    """Megatron pipeline parallel size."""
    megatron_cp: int = Field(1, gt=0)
    """Megatron context parallel size (splits each sequence; for long responses)."""
    megatron_ep: int = Field(1, gt=0)
    """Megatron expert parallel size (MoE experts split over this many GPUs)."""
    megatron_etp: int | None = Field(None, gt=0)
    """Megatron expert tensor parallel size; None = megatron_tp (Megatron-core's default)."""
    megatron_sequence_parallel: bool = True
    """Megatron sequence parallelism (verl turns it off itself when megatron_tp is 1)."""
    megatron_param_offload: bool = False
    """Offload actor and ref parameters (and grad buffers) to CPU while the rollout runs."""
    megatron_optimizer_offload: bool = False
    """Offload the actor's optimizer state to CPU while it is not stepping."""
    nnodes: int = Field(1, gt=0)
    """Ray nodes (1 head + nnodes-1 GPU workers; the head also trains)."""
    gpus_per_node: int = Field(8, gt=0)
    rollout_tp: int = Field(1, gt=0)
    """vLLM tensor parallel size per rollout replica."""
    micro_batch_per_gpu: int = Field(4, gt=0)
    """Responses per GPU per forward/backward (memory knob; does not change the maths)."""
    checkpoint_dir: str = "/checkpoints"
    """verl's trainer.default_local_dir: must be shared by every round (a PVC on the cluster)."""
    save_freq: int | None = Field(None, gt=0)
    """Steps between verl checkpoints; None = train.steps_per_round (one per pipeline round)."""
    extra_overrides: list[str] = Field(default_factory=list)
    """Raw Hydra overrides appended last (escape hatch; prefer a typed field)."""
    ray_version: str = "2.60.0"
    """Ray version of the image, for KubeRay (images, pools, PVCs: the deployment contract's)."""
    cpu_per_node: int = Field(16, gt=0)
    memory_gib_per_node: int = Field(128, gt=0)
    shm_gib: int = Field(64, gt=0)
    """/dev/shm size (Ray object store, NCCL, vLLM): the 64 MiB container default is far too small."""
    timeout_s: int = Field(86_400, gt=0)
    """RayJob activeDeadlineSeconds and the follow loop's limit."""
    poll_s: float = Field(10.0, gt=0)
    """Seconds between RayJob status polls."""
    launch: Literal["rayjob", "single-node"] = "rayjob"
    """``rayjob``: a KubeRay RayJob on the GPU pool; ``single-node``: verl inside the step's pod."""

    @model_validator(mode="after")
    def _megatron_layout(self) -> VerlConfig:
        if self.strategy != "megatron":
            return self
        gpus = self.nnodes * self.gpus_per_node
        where = f"verl.nnodes x verl.gpus_per_node = {self.nnodes} x {self.gpus_per_node} = {gpus} GPUs"
        dense = self.megatron_tp * self.megatron_pp * self.megatron_cp
        if gpus % dense:
            raise ValueError(
                f"verl.megatron_tp x verl.megatron_pp x verl.megatron_cp = {self.megatron_tp} x {self.megatron_pp} "
                f"x {self.megatron_cp} = {dense} must divide {where}"
            )
        etp = self.megatron_etp or self.megatron_tp
        experts = self.megatron_ep * etp * self.megatron_pp
        if gpus % experts:
            raise ValueError(
                f"verl.megatron_ep x verl.megatron_etp (None = megatron_tp) x verl.megatron_pp = {self.megatron_ep} "
                f"x {etp} x {self.megatron_pp} = {experts} must divide {where}"
            )
        return self
