"""RL improves held-out accuracy over the SFT warm start, judged by a paired test that holds on any machine.

Real parts only: the default warm start (600 SFT steps), a real vLLM CPU
engine (bf16 deploy) for rollouts and the held-out greedy evaluation.

Why paired, and why more steps than the demo: the warm start is not the same
on every CPU (same seed and code: 0.746 held-out on one machine, 0.797 on
another), so an absolute threshold ("+0.03 after 16 steps") fails on some
machines by chance: at accuracy 0.8 on 256 problems one standard error is
~0.025. Here every distinct held-out problem is scored greedily before and
after training by the same engine (the warm start re-evaluated is the
control), and the net number of problems training fixed must exceed Z
standard errors of the paired difference (McNemar's statistic). The ratio
gain / SE grows with the number of problems that change, so the test gives
itself statistical room instead of a warm start of a given strength: a 2,048
held-out draw and 4 x 8 RL steps. Measured on this 2-core machine (2026-12-06),
where the current warm start is strong: 1,024 draws and 2 x 8 steps gave
0.958 -> 0.970 = 2.0 SE (fails Z = 3); 2,048 draws and 4 x 8 steps gave
0.928 -> 0.965 = 6.0 SE. Absolute learning figures live in benchmarks/methods.py.
A sign check on the surrogate runs on the same engine first.
"""

from __future__ import annotations

import math

import pytest
import torch

from dcgrpo.algorithm.advantage import grpo_advantage
from dcgrpo.algorithm.loss import ppo_clip_loss
from dcgrpo.config import load_config
from dcgrpo.data.synthetic import read_rows
from dcgrpo.engines.hf_engine import HFEngine
from dcgrpo.engines.vllm_engine import apply_chat_template
from dcgrpo.reward import score_batch
from dcgrpo.stages.model import prepare_inputs
from dcgrpo.train.rl import make_engine, train

# The timeout only stops a hang: on 2 cores oversubscribed ~4x (load 8-9) the SFT warm start alone took 15 min.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

Z = 3.0  # the net gain must exceed this many paired standard errors (one-sided p ~ 0.001)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    # tiny-cpu defaults with twice the RL steps (4 x 8) and a larger held-out draw: see the module docstring
    cfg = load_config(overrides=["data.synthetic_val_size=2048", "train.rounds=4"])
    model_dir, train_path, val_path = prepare_inputs(cfg, root / "work")
    engine = make_engine(cfg, str(model_dir))
    yield {"cfg": cfg, "root": root, "model": model_dir, "train": train_path, "val": val_path, "engine": engine}
    engine.close()


def greedy_scores(engine, rows, max_tokens: int) -> list[float]:
    """1/0 per held-out problem: greedy answer of the deploy engine, scored by the project's reward."""
    prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in rows]
    outs = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    return score_batch([o[0].text for o in outs], [str(r["reward_model"]["ground_truth"]) for r in rows])


def paired_gain(before: list[float], after: list[float]) -> tuple[float, float]:
    """(mean gain, its standard error) for paired 0/1 outcomes on the same problems (McNemar)."""
    n = len(before)
    fixed = sum(1 for b, a in zip(before, after, strict=True) if a > b)
    broken = sum(1 for b, a in zip(before, after, strict=True) if b > a)
    gain = (fixed - broken) / n
    var = ((fixed + broken) / n - gain**2) / n  # variance of the mean of per-problem differences
    return gain, math.sqrt(max(var, 0.0))


def test_paired_gain_statistic():
    assert paired_gain([0, 0, 1, 1], [0, 0, 1, 1]) == (0.0, 0.0)
    gain, se = paired_gain([0, 0, 0, 1] * 25, [1, 0, 0, 1] * 25)  # 25 fixed, none broken, n = 100
    assert gain == pytest.approx(0.25) and se == pytest.approx(math.sqrt((0.25 - 0.0625) / 100))


def test_update_raises_logprob_of_positive_advantage_responses(setup):
    cfg, engine = setup["cfg"], setup["engine"]
    rows = read_rows(setup["train"])[:16]
    policy = HFEngine(str(setup["model"]))
    engine.sync_weights(policy.state_dict())
    torch.manual_seed(0)
    groups = engine.generate([apply_chat_template(engine.tokenizer, r["prompt"]) for r in rows], n=8,
                             temperature=1.0, top_p=1.0, max_tokens=cfg.rollout.max_response_length)  # fmt: skip
    gens = [g for grp in groups for g in grp]
    truths = [str(r["reward_model"]["ground_truth"]) for r in rows for _ in range(8)]
    rewards = torch.tensor(score_batch([g.text for g in gens], truths))
    assert rewards.max() == 1.0 and rewards.min() == 0.0  # correct completions score 1, wrong 0
    adv = grpo_advantage(rewards, torch.arange(len(rows)).repeat_interleave(8))  # (B,)
    batch = policy.token_batch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens])
    mask = batch.response_mask

    def seq_logp():
        with torch.no_grad():
            return (policy.logprobs(batch)[0] * mask).sum(-1)  # (B,)

    before = seq_logp()
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-4)
    logp_new, _ = policy.logprobs(batch)
    # On-policy (logp_old = logp_new): ratio 1, so the gradient is -A * grad log p.
    loss, _ = ppo_clip_loss(logp_new, logp_new.detach(), adv[:, None] * mask, mask, 0.2, 0.28)
    loss.backward()
    opt.step()
    delta = seq_logp() - before  # (B,)
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_training_beats_the_warm_start_on_the_same_problems(setup):
    cfg, engine = setup["cfg"], setup["engine"]
    val_rows = list({r["extra_info"]["question"]: r for r in read_rows(setup["val"])}.values())  # distinct
    max_tokens = cfg.rollout.max_response_length
    engine.sync_weights(HFEngine(str(setup["model"])).state_dict())  # the control: the warm start itself
    before = greedy_scores(engine, val_rows, max_tokens)
    res = train(cfg, model_dir=setup["model"], train_path=setup["train"], out_dir=setup["root"] / "out",
                engine=setup["engine"], progress=False)  # fmt: skip
    assert res.step == cfg.train.rounds * cfg.train.steps_per_round
    after = greedy_scores(engine, val_rows, max_tokens)  # train() left the final weights in the engine
    gain, se = paired_gain(before, after)
    acc0, acc1 = sum(before) / len(before), sum(after) / len(after)
    print(f"\nheld-out {acc0:.3f} -> {acc1:.3f} on {len(before)} problems: {gain / se if se else 0:.1f} SE")
    # No precondition on acc0 (it is the machine's: 0.38-0.96 seen): a warm start with no room left fails here too,
    # naming acc0. Nor on lambda: whether bf16's d exceeds the budget depends on how confident the warm start is
    # (lambda stays 0 above ~0.75); the dual ascent itself is held on fixed inputs in test_step_kernel/test_appendix_b.
    assert gain > Z * se, f"held-out {acc0:.3f} -> {acc1:.3f}: gain {gain:+.3f} is not > {Z} x SE {se:.3f}"
