"""verl.strategy=megatron, in the verl environment (.venv-verl).

- the rendered overrides compose with verl's Hydra config (`main_ppo --cfg job`)
  and put our parallel sizes on the Megatron engine of actor and ref;
- verl's own `validate_config` accepts the composed config (no megatron-core
  needed: it builds verl's config dataclasses only);
- bad layouts fail in our config, naming the fields.
No GPU and no megatron-core here: nothing builds a Megatron model.
"""

import os
import subprocess
import sys

import pytest
import yaml

from dcgrpo.config import ConfigError, load_config
from dcgrpo.verl_plugin.config import render_overrides, train_command
from tests.verl.conftest import require_verl

pytestmark = pytest.mark.verl
require_verl()

from hydra import compose, initialize_config_dir  # noqa: E402  (verl dependency)
from verl.trainer.ppo.utils import need_critic, need_reference_policy  # noqa: E402
from verl.utils.config import validate_config  # noqa: E402

import verl  # noqa: E402

VERL_MAIN = "verl.trainer.main_ppo"

LAYOUT = {
    "verl.strategy": "megatron",
    "verl.nnodes": 2,
    "verl.gpus_per_node": 8,
    "verl.megatron_tp": 4,
    "verl.megatron_pp": 2,
    "verl.megatron_cp": 1,
    "verl.megatron_ep": 8,
    "verl.megatron_etp": 1,
    "verl.megatron_param_offload": True,
    "verl.megatron_optimizer_offload": True,
}
PARALLEL = {
    "tensor_model_parallel_size": 4,
    "pipeline_model_parallel_size": 2,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 8,
    "expert_tensor_parallel_size": 1,
    "sequence_parallel": True,
    "param_offload": True,
}


def _cfg(**sets):
    base = {
        "model.path": "/models/qwen3-moe",
        "verl.checkpoint_dir": "ck",
        "train.group_size": 4,
        "train.prompts_per_batch": 16,
        "train.ppo_mini_batch": 4,
        "train.kl_loss_coef": 0.001,  # turns the ref model on, so its engine config is checked too
        **LAYOUT,
    }
    base.update(sets)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def test_megatron_overrides_compose_with_verl_cfg_job():
    cfg = _cfg()
    overrides = render_overrides(cfg, train_files="/checkpoints/data/train.parquet", total_steps=6)
    assert "model_engine=megatron" in overrides
    assert not [a for a in train_command(overrides) if "config-name" in a]  # verl's default top-level config
    out = subprocess.run(
        [sys.executable, "-m", VERL_MAIN, *overrides, "--cfg", "job"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = yaml.safe_load(out.stdout)
    assert job["model_engine"] == "megatron"
    arr = job["actor_rollout_ref"]
    for role in ("actor", "ref"):
        assert arr[role]["strategy"] == "megatron"
        assert arr[role]["_target_"] == "verl.workers.config.McoreActorConfig"
        assert {k: arr[role]["megatron"][k] for k in PARALLEL} == PARALLEL, role
    assert arr["actor"]["megatron"]["optimizer_offload"] is True
    assert arr["ref"]["megatron"]["forward_only"] is True
    assert arr["actor"]["optim"]["_target_"] == "verl.workers.config.McoreOptimizerConfig"
    assert arr["actor"]["optim"]["lr"] == cfg.train.lr and arr["actor"]["ppo_mini_batch_size"] == 4
    assert job["trainer"]["nnodes"] == 2 and job["trainer"]["n_gpus_per_node"] == 8


@pytest.mark.parametrize("preset", [None, "qwen3-30b-a3b"])
def test_verl_validate_config_accepts_the_megatron_config(preset):
    cfg = _cfg() if preset is None else load_config(preset=preset, overrides=["train.kl_loss_coef=0.001"])
    with initialize_config_dir(os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None):
        config = compose("ppo_trainer", overrides=render_overrides(cfg, train_files="/data/train.parquet"))
    assert config.actor_rollout_ref.actor.strategy == config.actor_rollout_ref.ref.strategy == "megatron"
    assert need_reference_policy(config) and not need_critic(config)
    validate_config(config, use_reference_policy=True, use_critic=False)  # raises on a bad layout or batch


def test_fsdp_renders_no_megatron_keys():
    overrides = render_overrides(_cfg(**{"verl.strategy": "fsdp"}), train_files="/data/train.parquet")
    assert not [o for o in overrides if "megatron" in o]


@pytest.mark.parametrize(
    "sets, fields",
    [
        ({"verl.megatron_tp": 3}, "verl.megatron_tp x verl.megatron_pp x verl.megatron_cp = 3 x 2 x 1 = 6"),
        ({"verl.megatron_cp": 3}, "verl.megatron_tp x verl.megatron_pp x verl.megatron_cp = 4 x 2 x 3 = 24"),
        ({"verl.megatron_ep": 16}, "verl.megatron_ep x verl.megatron_etp (None = megatron_tp) x verl.megatron_pp"),
        ({"verl.megatron_etp": "null", "verl.megatron_ep": 4}, "= 4 x 4 x 2 = 32"),
    ],
)
def test_parallel_sizes_must_divide_the_gpus(sets, fields):
    with pytest.raises(ConfigError) as err:
        _cfg(**sets)
    assert fields in str(err.value)
    assert "must divide verl.nnodes x verl.gpus_per_node = 2 x 8 = 16 GPUs" in str(err.value)


def test_megatron_fields_are_ignored_by_fsdp():
    assert _cfg(**{"verl.strategy": "fsdp", "verl.megatron_tp": 3}).verl.megatron_tp == 3


def test_batch_must_divide_over_megatron_data_parallel_ranks():
    # 16 GPUs / (tp 1 x pp 1 x cp 1) = 16 ranks x 4 responses per micro-batch = 64 > 8 x 4 = 32 responses per step;
    # FSDP would take it (verl checks only the GPU count there), so _check_batches lets it through
    sets = {"verl.megatron_tp": 1, "verl.megatron_pp": 1, "verl.megatron_ep": 1, "train.prompts_per_batch": 8}
    sets.update({"train.group_size": 4, "train.ppo_mini_batch": 8, "verl.micro_batch_per_gpu": 4})
    with pytest.raises(ConfigError, match="over 16 Megatron data-parallel ranks x verl.micro_batch_per_gpu"):
        render_overrides(_cfg(**sets), train_files="/data/train.parquet")
