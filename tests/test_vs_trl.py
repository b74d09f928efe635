"""Pure helpers of benchmarks/vs_trl.py (dcgrpo vs TRL): config mapping (vs_trl_mapping.py), step grouping, summaries
and table arithmetic (vs_trl_report.py), the background-load estimate (vs_trl.py).

Runs in .venv without TRL: nothing here imports trl; the TRL-side check of the mapping (GRPOConfig accepts every
key) is skipped unless trl is importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dcgrpo.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402
import vs_trl  # noqa: E402
import vs_trl_mapping as mapping  # noqa: E402
import vs_trl_report as report  # noqa: E402


@pytest.fixture
def cfg():
    return load_config(overrides=mapping.run_overrides("grpo", 16))


def test_run_overrides_one_round_of_steps():
    c = load_config(overrides=mapping.run_overrides("grpo", 5, group_size=16, max_len=64))
    assert (c.method.name, c.train.rounds, c.train.steps_per_round) == ("grpo", 1, 5)
    assert (c.train.group_size, c.rollout.max_response_length) == (16, 64)
    assert mapping.run_overrides("dc-grpo", 3)[-1] == "train.steps_per_round=3"  # preset G and T untouched


def test_trl_kwargs_match_dcgrpo_field_by_field(cfg):
    kw = mapping.trl_grpo_kwargs(cfg, 16, "/tmp/x")
    rows = mapping.config_rows(cfg, kw)
    assert mapping.rows_match(rows) == []
    tc = cfg.train
    # one dcgrpo step = one TRL generation batch of P x G, cut into P / mini-batch optimiser steps
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == tc.prompts_per_batch * tc.group_size
    assert kw["per_device_train_batch_size"] % kw["num_generations"] == 0
    assert kw["max_steps"] == 16 * tc.updates_per_step == 32
    assert (kw["learning_rate"], kw["adam_beta1"], kw["adam_beta2"]) == (tc.lr, *tc.betas)
    assert (kw["lr_scheduler_type"], kw["warmup_steps"], kw["beta"], kw["num_iterations"]) == ("constant", 0, 0.0, 1)
    assert (kw["epsilon"], kw["epsilon_high"], kw["delta"]) == (tc.clip_low, tc.clip_high, tc.clip_ratio_c)
    assert (kw["loss_type"], kw["scale_rewards"], kw["use_vllm"], kw["shuffle_dataset"]) == (
        "bnpo",
        "group",
        False,
        False,
    )


def test_trl_kwargs_follow_changed_settings():
    c = load_config(overrides=[*mapping.run_overrides("grpo", 4, group_size=4), "train.ppo_mini_batch=2",
                               "train.ppo_epochs=2", "train.lr=3e-4", "train.norm_adv_by_std=false",
                               "train.loss_agg=seq-mean-token-mean", "train.weight_decay=0.01"])  # fmt: skip
    kw = mapping.trl_grpo_kwargs(c, 4, "-")
    assert (kw["per_device_train_batch_size"], kw["steps_per_generation"], kw["num_iterations"]) == (8, 4, 2)
    assert kw["max_steps"] == 4 * 2 * 4
    assert (kw["learning_rate"], kw["weight_decay"], kw["scale_rewards"], kw["loss_type"]) == (
        3e-4,
        0.01,
        "none",
        "grpo",
    )
    assert mapping.rows_match(mapping.config_rows(c, kw)) == []


def test_mapping_refuses_what_trl_cannot_express():
    c = load_config(overrides=["train.loss_agg=seq-mean-token-sum"])
    with pytest.raises(ValueError, match="loss_agg"):
        mapping.trl_grpo_kwargs(c, 1, "-")
    c = load_config(overrides=["train.clip_ratio_c=1.1"])
    with pytest.raises(ValueError, match="delta"):
        mapping.trl_grpo_kwargs(c, 1, "-")


def test_rows_match_reports_a_drift(cfg):
    kw = mapping.trl_grpo_kwargs(cfg, 16, "-")
    kw["learning_rate"] *= 2
    kw["scale_rewards"] = "batch"
    assert mapping.rows_match(mapping.config_rows(cfg, kw)) == ["train.lr", "train.norm_adv_by_std"]


def test_prompt_order_is_dcgrpo_sampler_order():
    from dcgrpo.train.rl import PromptSampler

    order = mapping.prompt_order(50, 7, 120)  # crosses two epoch boundaries
    s = PromptSampler(50, 7)
    assert order == [i for _ in range(15) for i in s.next(8)]  # the loop draws 8 prompts per step
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": i}} for i in range(50)]
    ds = mapping.trl_rows(rows, order[:3])
    assert ds[1] == {"prompt": [{"role": "user", "content": f"q{order[1]}"}], "ground_truth": str(order[1])}


def test_group_steps_sums_optimizer_steps_per_generation():
    assert report.group_steps([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [3.0, 7.0]  # partial tail dropped
    assert report.group_steps([1.5], 1) == [1.5]
    with pytest.raises(ValueError):
        report.group_steps([1.0], 0)


def _run(step_s, tokens=100, wall=None, setup=1.0):
    steps = [{"step_s": t, "tokens": tokens, "responses": 10, "reward_mean": 0.5, "rollout_s": t / 2,
              "update_s": t / 4} for t in step_s]  # fmt: skip
    return {"steps": steps, "train_wall_s": wall or setup + sum(step_s), "setup_s": setup, "peak_rss_mib": 512.0,
            "setup_parts": {"engine_start_s": 0.5}}  # fmt: skip


def test_summarize_arithmetic():
    s = report.summarize(_run([5.0, 1.0, 3.0, 2.0]))
    assert s["response_tokens"] == 400
    assert s["tokens_per_s"] == pytest.approx(400 / 12.0)  # tokens / (setup + all steps)
    assert s["loop_tokens_per_s"] == pytest.approx(300 / 6.0)  # the warm-up step left out
    assert s["median_step_s"] == 2.0 and s["first_step_s"] == 5.0
    assert s["mean_response_len"] == 10.0
    assert s["rollout_s"] == 1.0 and s["reward_s"] == 0.0  # missing phases count as 0
    assert s["setup.engine_start_s"] == 0.5
    one = report.summarize(_run([4.0]))  # a one-step run keeps its only step
    assert one["median_step_s"] == 4.0 and one["loop_tokens_per_s"] == 25.0


def test_aggregate_medians_and_ranges():
    runs = [report.summarize(_run([1.0, t])) for t in (2.0, 8.0, 4.0)]
    for r, acc in zip(runs, (0.7, 0.9, 0.8), strict=True):
        r["acc_final"] = acc
    agg = report.aggregate(runs)
    assert agg["repeats"] == 3
    assert agg["median_step_s"] == 4.0 and (agg["median_step_s_min"], agg["median_step_s_max"]) == (2.0, 8.0)
    assert agg["acc_final"] == 0.8 and agg["acc_final_max"] == 0.9
    assert "peak_rss_mib_min" not in agg  # ranges only for the headline metrics
    assert report.cell(agg, "median_step_s") == "4.000 (2.000-8.000)"
    assert report.cell({"x": 1.5, "repeats": 1}, "x") == "1.500"
    assert report.cell({}, "x") == "-"


def test_ratio_and_table():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(None, 2.0) is None and report.ratio(1.0, 0.0) is None
    d = {"tokens_per_s": 200.0, "median_step_s": 0.5}
    t = {"tokens_per_s": 100.0, "median_step_s": 1.0}
    rows = {r[1]: r for r in report.comparison_rows(d, t)}
    assert rows["tokens_per_s"][4] == 2.0 and rows["median_step_s"][4] == 0.5
    assert rows["peak_rss_mib"][4] is None  # missing on both sides
    table = harness.md_table(["a", "b"], [["x", 1234.5], ["y", None], ["z", 0.00012]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 1,234 |", "| y | - |", "| z | 1.20e-04 |"]


def test_others_cores_from_cpu_samples():
    assert vs_trl.others_cores((10.0, 0.0), (16.0, 4.0), own_cpu_s=2.0) == 1.0
    assert vs_trl.others_cores((10.0, 0.0), (11.0, 4.0), own_cpu_s=2.0) == 0.0  # clock skew never goes negative
    busy, now = vs_trl.cpu_busy_seconds()
    assert busy > 0 and now > 0


def test_every_mismatch_names_a_real_trl_field():
    fields = {f for f, _ in mapping.MISMATCHES if f}
    kw = mapping.trl_grpo_kwargs(load_config(), 1, "-")
    assert fields <= set(kw) | {"vllm_importance_sampling_correction"}
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl not installed (it lives in .venv-trl): GRPOConfig field check skipped")
    import dataclasses

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert fields <= names and set(kw) <= names


def test_fixed_cost_and_break_even():
    d = {"setup_s": 4.0, "first_step_s": 2.5, "median_step_s": 0.3}
    t = {"setup_s": 0.5, "first_step_s": 0.6, "median_step_s": 0.4}
    assert report.fixed_and_steady(d) == pytest.approx((6.2, 0.3))
    assert report.break_even_steps(d, t) == pytest.approx((6.2 - 0.7) / 0.1)  # 55 steps
    assert report.break_even_steps(d, dict(t, median_step_s=0.3)) is None  # never: same steady step, larger fixed
    assert report.break_even_steps(t, d) is None  # cheaper start but slower steps: overtaken for long runs
    assert report.break_even_steps(dict(d, setup_s=0.0, first_step_s=0.3), t) == 0.0  # ahead from the start
