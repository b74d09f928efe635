"""The single-machine loop end to end: real vLLM CPU, real MLflow server, real S3 (moto).

One tiny model, one SFT warm start and one vLLM engine are built per module
and shared (``train(..., engine=...)`` syncs the policy into it).
"""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from dcgrpo.algorithm.step import DC_METRIC_KEYS
from dcgrpo.config import ConfigError, RunConfig
from dcgrpo.data.synthetic import write_synthetic_splits
from dcgrpo.models import build_tiny_model
from dcgrpo.tracking import start_run
from dcgrpo.train import checkpoint as ckpt
from dcgrpo.train.rl import make_engine, train
from dcgrpo.train.sft import warm_start

pytestmark = pytest.mark.slow

REQUIRED = [
    "dc/lambda", "dc/lambda_next", "dc/penalty_mean", "dc/discrepancy_mean", "dc/discrepancy_max",
    "dc/discrepancy_p99", "dc/violation",
    "reward/mean", "reward/accuracy", "actor/pg_loss", "actor/clipfrac", "actor/entropy", "actor/grad_norm",
    "response/length_mean", "timing/rollout_s", "timing/recompute_s", "timing/update_s", "timing/sync_s",
]  # fmt: skip


def small_cfg(**overrides) -> RunConfig:
    base = [
        "train.prompts_per_batch=4", "train.group_size=4", "train.ppo_mini_batch=2", "train.steps_per_round=2",
        "train.rounds=2", "train.lr=1e-3", "rollout.max_response_length=16", "model.sft_steps=40",
        "data.synthetic_train_size=200", "data.synthetic_val_size=16",
    ]  # fmt: skip
    from dcgrpo.config import load_config

    return load_config(overrides=base + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    cfg = small_cfg()
    train_path, val_path = write_synthetic_splits(cfg.data, root / "data")
    base = build_tiny_model(cfg.model, root / "base")
    model_dir = warm_start(cfg, base, train_path, root / "sft")
    engine = make_engine(cfg, str(model_dir))
    yield {"root": root, "model_dir": model_dir, "train": train_path, "val": val_path, "engine": engine}
    engine.close()


def _run(setup, cfg, out_dir, **kw):
    return train(cfg, model_dir=setup["model_dir"], train_path=setup["train"], out_dir=out_dir,
                 engine=setup["engine"], progress=False, **kw)  # fmt: skip


def test_training_run_logs_every_metric_to_mlflow_and_lambda_rises(setup, mlflow_server, tmp_path):
    cfg = small_cfg(**{"method.budget": 0.0, "method.dual_lr": 1.0, "train.rounds": 1,
                       "tracking.mlflow_uri": mlflow_server})  # fmt: skip
    with start_run(cfg.tracking, storage_root=str(tmp_path), run_name="t", params=cfg.to_flat_dict()) as run:
        res = _run(setup, cfg, tmp_path / "out", run=run, val_path=setup["val"])
    client = MlflowClient(mlflow_server)
    data = client.get_run(res.run_id).data
    for key in REQUIRED + ["val/accuracy"]:
        assert key in data.metrics, key
    assert len(client.get_metric_history(res.run_id, "dc/lambda")) == 2
    assert data.params["method.name"] == "dc-grpo"
    assert client.get_run(res.run_id).info.status == "FINISHED"
    assert "plots/dc_curves.png" in [a.path for a in client.list_artifacts(res.run_id, "plots")]
    # Over budget (eps = 0, d > 0): lambda goes up by eta * mean(d) each step.
    steps = [h for h in res.history if "dc/lambda" in h]
    lams, ds = [h["dc/lambda_next"] for h in steps], [h["dc/discrepancy_mean"] for h in steps]
    assert all(d > 0 for d in ds) and lams[0] > 0 and lams[1] > lams[0]
    assert lams[1] == pytest.approx(cfg.method.dual_lr * sum(ds))
    # dc/lambda is the lambda a step shaped with: the previous step's dc/lambda_next (as verl logs it)
    assert steps[0]["dc/lambda"] == cfg.method.lambda_init and steps[1]["dc/lambda"] == lams[0]
    per_step = {k for h in steps for k in h if k.startswith("dc/")} - {"dc/discrepancy_round_mean"}  # a round's
    assert per_step == set(DC_METRIC_KEYS)  # = the verl trainer's (its rounds' means: stages.train_verl)
    assert [h.get("dc/discrepancy_round_mean") for h in steps] == [None, pytest.approx(sum(ds) / 2)]  # round end
    assert [m.step for m in client.get_metric_history(res.run_id, "dc/discrepancy_round_mean")] == [2]


def test_lambda_decays_under_budget_and_grpo_keeps_it_fixed(setup, tmp_path):
    cfg = small_cfg(**{"method.budget": 0.5, "method.lambda_init": 0.6, "method.dual_lr": 1.0, "train.rounds": 1})
    res = _run(setup, cfg, tmp_path / "dc")
    lams = [h["dc/lambda_next"] for h in res.history if "dc/lambda" in h]
    assert lams[0] < 0.6 and lams[1] < lams[0]  # under budget: decays towards 0 (projected at 0)
    grpo = small_cfg(**{"method.name": "grpo", "method.lambda_init": 0.6, "train.rounds": 1})
    res = _run(setup, grpo, tmp_path / "grpo")
    assert {h[k] for h in res.history if "dc/lambda" in h for k in ("dc/lambda", "dc/lambda_next")} == {0.6}


def test_a_method_registered_outside_the_package_trains_through_the_config_alone(setup, tmp_path):
    """Registering a method is all it takes: the config accepts its name and the loop dispatches to it (the verl
    trainer's twin test is in tests/verl/test_plugin.py)."""
    from dcgrpo.algorithm import methods

    calls = []

    def halved(seq_adv, d, logp_train, logp_infer, mask, hp):  # a throw-away method: half the GRPO advantage
        calls.append(hp.lam)
        return methods.ShapedBatch(0.5 * seq_adv[:, None] * mask, mask, None)

    methods.register_method("test-halved-grpo")(halved)
    try:
        res = _run(setup, small_cfg(**{"method.name": "test-halved-grpo", "train.rounds": 1}), tmp_path / "h")
    finally:
        methods.METHODS.pop("test-halved-grpo")
    assert len(calls) == 2 and res.step == 2
    with pytest.raises(ConfigError, match="unknown method 'test-halved-grpo'"):
        small_cfg(**{"method.name": "test-halved-grpo"})  # unregistered again


def test_reward_settings_reach_the_loop(setup, tmp_path, monkeypatch):
    """``reward.*`` is the loop's reward config too (timeouts, limits, workers): every rollout batch and held-out
    evaluation is scored with the run's ``cfg.reward`` (the real scorer, watched on its way through)."""
    from dcgrpo.train import rl

    seen = []

    def watched(completions, truths, cfg=None):
        seen.append(cfg)
        return real(completions, truths, cfg)

    real = rl.score_batch
    monkeypatch.setattr(rl, "score_batch", watched)
    cfg = small_cfg(**{"reward.timeout_s": 7.5, "reward.max_completion_chars": 4000, "train.rounds": 1})
    _run(setup, cfg, tmp_path / "r", val_path=setup["val"])
    assert len(seen) == 2 + 2 and all(c == cfg.reward for c in seen)  # 2 steps, held-out before and after


def _weights(uri):
    return load_file(str(uri) + "/model.safetensors")


def test_exact_resume(setup, tmp_path):
    cfg = small_cfg(**{"method.budget": 1e-4})
    full = _run(setup, cfg, tmp_path / "full")
    first = _run(setup, cfg, tmp_path / "split", rounds=1)
    assert first.step == 2
    resumed = _run(setup, cfg, tmp_path / "split", resume_from=str(tmp_path / "split" / "checkpoints"))
    assert resumed.step == full.step == 4
    wa, wb = _weights(full.checkpoint), _weights(resumed.checkpoint)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    untimed = lambda h: {k: v for k, v in h.items() if not k.startswith("timing/")}  # noqa: E731
    assert [untimed(h) for h in full.history[2:]] == [untimed(h) for h in resumed.history]
    assert resumed.lam == full.lam
    state = ckpt.load_checkpoint(resumed.checkpoint, tmp_path / "c").state
    assert state["step"] == 4 and state["lambda"]["value"] == full.lam and len(state["history"]) == 4


def test_checkpoint_corruption_is_detected(setup, tmp_path):
    cfg = small_cfg(**{"train.rounds": 1})
    res = _run(setup, cfg, tmp_path / "out")
    loaded = ckpt.load_checkpoint(str(tmp_path / "out" / "checkpoints"), tmp_path / "c")  # follows `latest`
    assert loaded.state["step"] == 2
    assert not list((tmp_path / "out" / "checkpoints").glob(".*partial*"))  # no staging left behind
    path = tmp_path / "out" / "checkpoints" / "step_000002" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch in model.safetensors"):
        ckpt.load_checkpoint(res.checkpoint, tmp_path / "c")
    (tmp_path / "out" / "checkpoints" / "step_000002" / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="manifest"):
        ckpt.load_checkpoint(res.checkpoint, tmp_path / "c")


def test_s3_checkpoints_and_resume(setup, s3_server, tmp_path):
    cfg = small_cfg(**{"storage.s3_endpoint_url": s3_server})
    out = "s3://dcgrpo-test/runs/loop"
    first = _run(setup, cfg, out, rounds=1)
    assert first.checkpoint == f"{out}/checkpoints/step_000002"
    resumed = _run(setup, cfg, out, resume_from=f"{out}/checkpoints")
    assert resumed.step == 4 and resumed.checkpoint.startswith("s3://")
    loaded = ckpt.load_checkpoint(resumed.checkpoint, tmp_path / "c", s3_server)
    assert loaded.state["step"] == 4 and (loaded.local_dir / "config.json").is_file()
