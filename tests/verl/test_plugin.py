"""The dc_grpo verl plugin, in the verl environment (.venv-verl).

- the `verl.plugins` entry point registers the trainer on a bare `import verl`;
- `shape_batch` on verl's own DataProto equals dcgrpo.algorithm, for every method;
- the trainer, built from verl's composed Hydra config with our rendered
  overrides, runs its real `_compute_advantage` through a real TransferQueue
  (local Ray), takes the dual step and round-trips lambda through a checkpoint;
- the rendered overrides compose with verl's config (`main_ppo --cfg job`).
No mocks: real verl, real Ray, real TransferQueue.
"""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
import yaml

from dcgrpo.algorithm import advantage, discrepancy, methods
from dcgrpo.algorithm.step import DC_METRIC_KEYS, SHAPING_KEYS, method_hparams
from dcgrpo.config import ConfigError, load_config
from dcgrpo.verl_plugin import TRAINER_NAME
from dcgrpo.verl_plugin.config import TRAIN_MAIN, render_overrides
from dcgrpo.verl_plugin.launch import DC_METRICS_FILE
from tests.verl.conftest import require_verl

pytestmark = pytest.mark.verl
require_verl()

from hydra import compose, initialize_config_dir  # noqa: E402  (verl dependency)
from verl.trainer.ppo.v1 import get_trainer_cls  # noqa: E402

from dcgrpo.verl_plugin import trainer as plugin  # noqa: E402
from verl import DataProto  # noqa: E402

METHODS = sorted(methods.METHODS)
GROUP = 4


def _cfg(**sets):
    base = {
        "model.path": "/models/tiny",
        "verl.gpus_per_node": 1,
        "method.lambda_init": 0.5,
        # Pinned, not the tiny-cpu defaults (which are tuned for the CPU loop and change).
        "method.budget": 2e-3,
        "method.dual_lr": 1.0,
        "train.group_size": 4,
        "verl.checkpoint_dir": "ck",
    }
    base.update(sets)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def _verl_config(cfg, tmp_path=None):
    import verl

    overrides = render_overrides(cfg, train_files="/data/train.parquet")
    if tmp_path is not None:
        overrides.append(f"trainer.default_local_dir={tmp_path}")
    with initialize_config_dir(os.path.join(os.path.dirname(verl.__file__), "trainer/config"), version_base=None):
        return compose("ppo_trainer", overrides=overrides)


def _batch(seed, batch=16, length=9):
    """A padded verl batch as _compute_advantage builds it: (B, T) tensors + uid."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float32)
    logp_old = torch.log_softmax(torch.randn(batch, length, 7, generator=g), -1)[..., 0] * mask
    logp_roll = (logp_old + 0.3 * torch.randn(batch, length, generator=g)) * mask
    scores = torch.zeros(batch, length)
    scores[torch.arange(batch), lengths - 1] = torch.randint(0, 2, (batch,), generator=g).float()
    uid = np.array([f"p{i // GROUP}" for i in range(batch)], dtype=object)
    return DataProto.from_dict(
        tensors={
            "response_mask": mask,
            "old_log_probs": logp_old,
            "rollout_log_probs": logp_roll,
            "token_level_rewards": scores,
        },
        non_tensors={"uid": uid},
    )


def test_entry_point_registers_trainer_on_import_verl():
    (ep,) = [e for e in entry_points(group="verl.plugins") if e.name == TRAINER_NAME]
    assert ep.value == "dcgrpo.verl_plugin.trainer"
    # a fresh interpreter: nothing but `import verl`, as in every Ray worker
    code = (
        "import sys, verl; assert 'dcgrpo.verl_plugin.trainer' in sys.modules;"
        "from verl.trainer.ppo.v1 import get_trainer_cls; c = get_trainer_cls('dc_grpo');"
        "print(c.__module__ + '.' + c.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("dcgrpo.verl_plugin.trainer.DCGRPOTrainer")
    assert get_trainer_cls(TRAINER_NAME) is plugin.DCGRPOTrainer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_shape_batch_equals_algorithm(method, seed):
    data = _batch(seed)
    mcfg = _cfg(**{"method.name": method}).method
    lam = 0.7
    fields, stats = plugin.shape_batch(data, mcfg, lam)

    b = data.batch
    mask = b["response_mask"]
    d = discrepancy.token_discrepancy(b["old_log_probs"], b["rollout_log_probs"], mask, mcfg.discrepancy)
    seq_adv = advantage.grpo_advantage(b["token_level_rewards"].sum(-1), list(data.non_tensor_batch["uid"]))
    want = methods.shape_advantages(
        method, seq_adv, d, b["old_log_probs"], b["rollout_log_probs"], mask, method_hparams(mcfg, lam)
    )
    assert fields["advantages"].shape == mask.shape == (16, 9)
    torch.testing.assert_close(fields["advantages"], want.advantages, rtol=0, atol=0)
    torch.testing.assert_close(fields["returns"], want.advantages, rtol=0, atol=0)
    assert ("rollout_is_weights" in fields) == (want.is_weights is not None)
    if want.is_weights is not None:
        torch.testing.assert_close(fields["rollout_is_weights"], want.is_weights, rtol=0, atol=0)
    assert ("response_mask" in fields) == (not torch.equal(want.mask, mask))  # MIS dropped sequences
    torch.testing.assert_close(stats["dc/discrepancy_mean"], discrepancy.masked_mean(d, mask))
    assert set(stats) == set(SHAPING_KEYS)  # the kernel's keys: the built-in loop logs the same
    if method in ("dc-grpo", "dual-grpo"):  # the penalty really moved the advantages
        assert (fields["advantages"] - seq_adv[:, None] * mask).abs().max() > 1e-3


def test_a_registered_method_shapes_verls_batch_through_the_config_alone():
    """The twin of the built-in loop's test: register a method, name it in the config, and the verl trainer's
    advantage uses it (no edit to the plugin or the config module)."""

    def halved(seq_adv, d, logp_train, logp_infer, mask, hp):
        return methods.ShapedBatch(0.5 * seq_adv[:, None] * mask, mask, None)

    methods.register_method("test-halved-grpo")(halved)
    try:
        data = _batch(0)
        fields, _ = plugin.shape_batch(data, _cfg(**{"method.name": "test-halved-grpo"}).method, 0.0)
        grpo, _ = plugin.shape_batch(data, _cfg(**{"method.name": "grpo"}).method, 0.0)
        torch.testing.assert_close(fields["advantages"], 0.5 * grpo["advantages"])
    finally:
        methods.METHODS.pop("test-halved-grpo")


def test_missing_rollout_log_probs_names_the_setting():
    data = _batch(0)
    data.batch = data.batch.exclude("rollout_log_probs")
    with pytest.raises(KeyError, match="calculate_log_probs=True"):
        plugin.shape_batch(data, _cfg().method, 0.0)


def test_bad_dc_grpo_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"algorithm\.dc_grpo\.budget"):
        plugin.method_config_from_verl({"dc_grpo": {"budget": -1}})
    with pytest.raises(ConfigError, match=r"algorithm\.dc_grpo\.lamda_init"):
        plugin.method_config_from_verl({"dc_grpo": {"lamda_init": 1}})


def test_trainer_rejects_config_it_cannot_honour():
    conf = _verl_config(_cfg())
    conf.algorithm.adv_estimator = "gae"
    conf.actor_rollout_ref.rollout.calculate_log_probs = False
    with pytest.raises(ConfigError, match="adv_estimator must be grpo(.|\n)*calculate_log_probs"):
        plugin.DCGRPOTrainer(conf)


def test_multiplier_updates_and_round_trips_through_checkpoint(tmp_path):
    cfg = _cfg(**{"method.dual_lr": 10.0, "method.budget": 0.01})
    trainer = get_trainer_cls(TRAINER_NAME)(_verl_config(cfg, tmp_path))
    # verl's base class must see the sync loop: sync replay buffer, no TransferQueue checkpoints
    assert trainer.trainer_mode == "sync" and trainer.registered_mode == TRAINER_NAME
    assert type(trainer.replay_buffer).__name__ == "ReplayBuffer" and trainer.parameter_sync_step == 1
    assert trainer.multiplier.value == 0.5

    # step 3 measured mean d = 0.05: verl saves *before* on_step_end, so the checkpoint
    # must already hold the post-step lambda 0.5 + 10 * (0.05 - 0.01) = 0.9
    trainer.global_steps = 3
    trainer._step_discrepancy = 0.05
    path = trainer.save_dc_state(trainer._save_folder())
    assert path == str(tmp_path / "global_step_3" / plugin.CHECKPOINT_FILE)
    assert trainer.multiplier.value == 0.5
    dual = trainer.dual_step()  # what on_step_end does after the weight sync
    assert dual == {"dc/violation": pytest.approx(0.04), "dc/lambda_next": pytest.approx(0.9)}
    assert trainer._step_discrepancy is None and trainer.dual_step() == {"dc/lambda_next": pytest.approx(0.9)}

    resumed = plugin.DCGRPOTrainer(_verl_config(cfg, tmp_path))
    resumed.global_steps = 3  # as verl's _load_checkpoint sets it from global_step_3
    assert resumed._resume_folder() == str(tmp_path / "global_step_3")
    assert resumed.load_dc_state(resumed._resume_folder())
    assert resumed.multiplier.state_dict() == trainer.multiplier.state_dict()
    assert resumed.multiplier.num_updates == 1

    fresh = plugin.DCGRPOTrainer(_verl_config(cfg, tmp_path))
    assert not fresh.load_dc_state(str(tmp_path / "global_step_9"))  # verl-only checkpoint: lambda_init kept
    assert fresh.multiplier.value == 0.5


def test_fixed_lambda_methods_do_not_move_lambda(tmp_path):
    trainer = plugin.DCGRPOTrainer(_verl_config(_cfg(**{"method.name": "dual-grpo"}), tmp_path))
    trainer._step_discrepancy = 1.0
    assert trainer.dual_step()["dc/lambda_next"] == 0.5


@pytest.fixture(scope="module")
def transfer_queue():
    """A real local Ray + TransferQueue, as verl's TaskRunnerV1 starts them (~25 s on 2 cores)."""
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


@pytest.mark.slow
def test_compute_advantage_override_through_transfer_queue(transfer_queue, tmp_path, monkeypatch):
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorData  # noqa: F401  (tq stores uid as non-tensor data)
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    tq = transfer_queue
    data = _batch(3)
    b = data.batch
    lengths = b["response_mask"].sum(-1).long()
    keys = [f"{uid}{i % GROUP}_0_0" for i, uid in enumerate(data.non_tensor_batch["uid"])]

    def nested(t):
        return torch.nested.as_nested_tensor([t[i, : lengths[i]] for i in range(len(keys))], layout=torch.jagged)

    fields = TensorDict(
        {
            "response_mask": nested(b["response_mask"].long()),
            "rm_scores": nested(b["token_level_rewards"]),
            "old_log_probs": nested(b["old_log_probs"]),
            "rollout_log_probs": nested(b["rollout_log_probs"]),
        },
        batch_size=len(keys),
    )
    fields["uid"] = list(data.non_tensor_batch["uid"])
    meta = tq.kv_batch_put(keys=keys, partition_id="train", fields=fields)

    trainer = plugin.DCGRPOTrainer(_verl_config(_cfg(), tmp_path))
    metrics: dict = {}
    meta = trainer._compute_advantage(meta, metrics)
    got = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages", "returns"])
    adv = got["advantages"].to_padded_tensor(0.0)  # (B, T_max)

    want, stats = plugin.shape_batch(data, trainer.dc_method, 0.5)
    torch.testing.assert_close(adv, want["advantages"][:, : adv.shape[1]], rtol=0, atol=1e-6)
    assert set(metrics) >= {
        "dc/lambda",
        "dc/discrepancy_mean",
        "dc/discrepancy_max",
        "dc/discrepancy_p99",
        "dc/penalty_mean",
    }
    assert metrics["dc/lambda"] == 0.5 and isinstance(metrics["dc/discrepancy_mean"], float)
    assert metrics["dc/discrepancy_mean"] == pytest.approx(float(stats["dc/discrepancy_mean"]))
    assert trainer._step_discrepancy == metrics["dc/discrepancy_mean"]  # pending for on_step_end

    # on_step_end, after verl's weight sync (stubbed: no rollout replicas here): the dual step
    monkeypatch.setattr(PPOTrainerSync, "on_step_end", lambda self: None)
    trainer.global_steps = 7
    trainer.on_step_end()
    metrics.update(trainer._consume_sync_metrics())  # as verl's loop does before logging the step's metrics
    assert metrics["dc/violation"] == pytest.approx(metrics["dc/discrepancy_mean"] - 2e-3)
    logged = {k: v for k, v in metrics.items() if k.startswith("dc/")}
    assert set(logged) == set(DC_METRIC_KEYS)
    # the same dc/* values, one line for the step, in the file the pipeline's train step reads
    (line,) = (tmp_path / DC_METRICS_FILE).read_text().splitlines()
    assert json.loads(line) == {"step": 7, **logged}
    tq.kv_clear(keys=keys, partition_id="train")


def test_rendered_overrides_compose_with_verl_cfg_job():
    cfg = _cfg(**{"rollout.precision": "fp8", "train.prompts_per_batch": 8, "train.ppo_mini_batch": 2})
    overrides = render_overrides(cfg, train_files="/checkpoints/data/train.parquet", total_steps=6)
    out = subprocess.run(
        [sys.executable, "-m", TRAIN_MAIN, *overrides, "--cfg", "job"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job = yaml.safe_load(out.stdout)
    rollout = job["actor_rollout_ref"]["rollout"]
    assert rollout["calculate_log_probs"] is True and rollout["quantization"] == "fp8" and rollout["n"] == 4
    assert job["data"]["train_files"] == "/checkpoints/data/train.parquet" and job["data"]["train_batch_size"] == 8
    assert job["actor_rollout_ref"]["actor"]["ppo_mini_batch_size"] == 2  # prompts; verl multiplies by n
    assert job["trainer"]["v1"]["trainer_mode"] == TRAINER_NAME and job["trainer"]["total_training_steps"] == 6
    assert job["trainer"]["logger"] == ["console", "mlflow"]
    assert plugin.method_config_from_verl(job["algorithm"]) == cfg.method  # every key survives the trip


def test_round_file_ends_the_loop_at_the_rounds_step_only(tmp_path, monkeypatch):
    """One launch = one pipeline round: the loop's bound moves, the configured total (LR horizon) does not."""
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from dcgrpo.verl_plugin.launch import write_round_file

    monkeypatch.setattr(PPOTrainerSync, "fit", lambda self, *a, **k: self.total_training_steps)
    conf = _verl_config(_cfg(), tmp_path)
    trainer = plugin.DCGRPOTrainer(conf)
    trainer.total_training_steps = 10  # what verl's _init_dataloader sets from trainer.total_training_steps
    assert trainer.fit(None) == 10  # no round file: the whole run
    write_round_file(tmp_path, 4)
    trainer.total_training_steps = 10
    assert trainer.fit(None) == 4
    assert conf.trainer.total_training_steps == 16  # rounds x steps_per_round, untouched


def test_verl_loads_our_math_verify_reward_from_the_composed_config():
    """verl's own loader finds `compute_score` through the rendered overrides and scores as dcgrpo.reward does."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    from dcgrpo.reward import score

    conf = _verl_config(_cfg(**{"reward.timeout_s": 2.0}))
    fn = get_custom_reward_fn(OmegaConf.create(OmegaConf.to_container(conf, resolve=True)))
    cases = [
        ("synthetic/arith-d1", "12 + 7 = \\boxed{19}", "19"),
        ("math_dapo", "so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
        ("math_dapo", "Answer: 34", "35"),
        ("aime", "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "1"),  # adversarial: nested parens
    ]
    got = [fn(data_source=src, solution_str=text, ground_truth=gt, extra_info={}) for src, text, gt in cases]
    assert got == [score(text, gt) for _, text, gt in cases]
    assert got[:3] == [1.0, 1.0, 0.0]
    assert conf.reward.custom_reward_function.reward_kwargs.timeout_s == 2.0
