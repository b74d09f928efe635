"""The single-machine DC-GRPO loop (CleanRL-style: one function, read it top to bottom).

Two different engines score the same tokens, so the train-inference
discrepancy is real and black-box, as in the paper: vLLM (deploy precision,
maybe FP8) samples and reports log p_inf; HF transformers (fp32 on CPU)
recomputes log p_train and is trained. Every method of the config runs
through this same loop, dispatched only through ``dcgrpo.algorithm.methods``.

One call runs ``rounds`` rounds of ``cfg.train.steps_per_round`` steps and
writes a checkpoint at the end of each round (model + optimizer + lambda +
step + data cursor + RNG). ``resume_from`` continues lambda, the step
numbering, the data order and the rollout randomness exactly.

Determinism: rollouts of step k depend only on (seed, k, weights): the
in-process vLLM sampler draws from torch's global generator, which is
re-seeded at the start of every step.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dcgrpo import storage
from dcgrpo.algorithm.discrepancy import masked_mean
from dcgrpo.algorithm.dual import LagrangeMultiplier
from dcgrpo.algorithm.loss import ppo_clip_loss
from dcgrpo.algorithm.methods import get_method
from dcgrpo.algorithm.step import dual_step, shape_step
from dcgrpo.data.synthetic import read_rows
from dcgrpo.engines.hf_engine import HFEngine
from dcgrpo.engines.vllm_engine import VLLMEngine, apply_chat_template
from dcgrpo.reward import score_batch
from dcgrpo.tracking import plot_curves, scalarize
from dcgrpo.train import checkpoint as ckpt

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: str
    """URI of the last checkpoint written (an HF model directory)."""
    step: int
    """Global step reached (steps are numbered 1, 2, ...)."""
    lam: float
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step metrics of this call (plus ``val/accuracy`` at round ends)."""
    run_id: str | None = None
    plot: str | None = None


class PromptSampler:
    """Deterministic epoch-wise shuffled prompts; its state is the data cursor."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        perm = list(range(self.n))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
        return perm

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


def heldout_accuracy(engine: VLLMEngine, rows: list[dict], max_tokens: int, reward=None) -> float:
    """Greedy accuracy on ``rows`` with the deploy engine and the project's reward."""
    prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in rows]
    outs = engine.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
    scores = score_batch([o[0].text for o in outs], [str(r["reward_model"]["ground_truth"]) for r in rows], reward)
    return sum(scores) / max(len(scores), 1)


def rounds_left(train_cfg, step: int) -> int:
    """Rounds of ``train_cfg.rounds`` still to run after global step ``step``."""
    return train_cfg.rounds - step // train_cfg.steps_per_round


def make_engine(cfg, model_dir: str) -> VLLMEngine:
    return VLLMEngine(
        model_dir,
        cfg.rollout.precision,
        seed=cfg.rollout.seed,
        max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_response_length + 16,
        cpu_kv_cache_gib=cfg.rollout.cpu_kv_cache_gib,
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        keep_high_precision=cfg.export.keep_high_precision,
        fp8_block_size=cfg.export.block_size,
        fp8_scheme=cfg.export.scheme,
    )


def train(
    cfg,
    *,
    model_dir: str | Path,
    train_path: str | Path,
    out_dir: str | Path,
    resume_from: str | ckpt.LoadedCheckpoint | None = None,
    run=None,
    rounds: int | None = None,
    val_path: str | Path | None = None,
    engine: VLLMEngine | None = None,
    progress: bool = True,
    rows: list[dict] | None = None,
    val_rows: list[dict] | None = None,
) -> TrainResult:
    """Run DC-GRPO (or any registered method) for ``rounds`` rounds.

    Args:
        cfg: the ``RunConfig``.
        model_dir: HF model directory to start from (ignored when resuming).
        train_path: training parquet (verl schema), local or s3://.
        out_dir: where ``checkpoints/`` and ``plots/`` go, local or s3://.
        resume_from: a checkpoint (or a ``checkpoints/`` dir) to continue, or one already loaded
            (``train_job`` loads it before creating the MLflow run, to fail before any trace).
        run: a ``dcgrpo.tracking.Run`` to log to (None: log nowhere but the history).
        rounds: rounds to run in this call (default: the rest of ``cfg.train.rounds``).
        val_path: held-out parquet; greedy accuracy is measured before the first
            round and after each (``val/accuracy``).
        engine: an existing ``VLLMEngine`` to reuse (weights are synced into it).
        rows, val_rows: ``train_path``'s / ``val_path``'s rows when the caller has read them already.
    """
    tc, mc = cfg.train, cfg.method
    method = get_method(mc.name)
    if tc.kl_loss_coef > 0:
        raise ValueError("train.kl_loss_coef > 0 is not supported by the built-in loop (the paper trains without KL)")
    out_dir = str(out_dir)
    endpoint = cfg.storage.s3_endpoint_url
    cache_dir = Path(tempfile.mkdtemp(prefix="dcgrpo-train-"))
    rows = read_rows(train_path, endpoint) if rows is None else rows
    if val_rows is None:
        val_rows = read_rows(val_path, endpoint) if val_path else []

    # ---- state: policy, optimiser, multiplier, data cursor (fresh or resumed) ----
    lam = LagrangeMultiplier(mc.lambda_init, mc.dual_lr if method.dual_ascent else 0.0, mc.budget, mc.lambda_max)
    sampler = PromptSampler(len(rows), cfg.data.seed + tc.seed)
    step, history = 0, []
    loaded = resume_from
    if isinstance(resume_from, str | Path):
        loaded = ckpt.load_checkpoint(str(resume_from), cache_dir, endpoint)
    policy = HFEngine(str(loaded.local_dir if loaded else model_dir), tc.train_precision)
    opt = torch.optim.AdamW(policy.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    if loaded:
        if loaded.state["config_hash"] != cfg.config_hash():
            log.warning(
                "resuming %s written with config %s (now %s)",
                loaded.uri,
                loaded.state["config_hash"],
                cfg.config_hash(),
            )
        ckpt.optimizer_from_tensors(opt, loaded.optimizer_tensors, loaded.state["optimizer"])
        lam.load_state_dict(loaded.state["lambda"])
        sampler.load_state_dict(loaded.state["data_cursor"])
        ckpt.set_rng_state(loaded.state["rng"])
        step = int(loaded.state["step"])
        history = list(loaded.state.get("history", []))
        log.info("resumed %s at step %d, lambda %.4g", loaded.uri, step, lam.value)
        if run is not None:  # steps after the checkpoint the crashed process already sent are not sent twice
            run.skip_logged_after(step)
    rounds = rounds_left(tc, step) if rounds is None else rounds
    if rounds <= 0:
        raise ValueError(f"nothing to do: {step // tc.steps_per_round} of {tc.rounds} rounds already done")
    own_engine = engine is None
    if engine is None:
        engine = make_engine(cfg, str(loaded.local_dir if loaded else model_dir))
    else:
        engine.sync_weights(policy.state_dict())
    tok = policy.tokenizer
    P, G = tc.prompts_per_batch, tc.group_size
    new_history: list[dict[str, float]] = []
    if val_rows and step == 0:
        acc0 = heldout_accuracy(engine, val_rows, cfg.rollout.max_response_length, cfg.reward)
        new_history.append({"step": 0, "val/accuracy": acc0})
        if run is not None:
            run.log_metrics({"val/accuracy": acc0}, step=0)

    last_uri, plot_uri = "", None
    end_step = step + rounds * tc.steps_per_round
    bar = tqdm(total=end_step - step, desc=f"{mc.name}", dynamic_ncols=True, disable=not progress)
    try:
        while step < end_step:
            step += 1
            t_step = time.perf_counter()
            torch.manual_seed(cfg.rollout.seed * 1_000_003 + step)  # rollouts depend on (seed, step) only

            # ---- 1. rollout: n responses per prompt from the deploy engine (log p_inf) ----
            t0 = time.perf_counter()
            batch_rows = [rows[i] for i in sampler.next(P)]
            prompts = [apply_chat_template(tok, r["prompt"]) for r in batch_rows]
            groups = engine.generate(prompts, n=G, temperature=cfg.rollout.temperature,
                                     top_p=cfg.rollout.top_p, max_tokens=cfg.rollout.max_response_length)  # fmt: skip
            gens = [g for group in groups for g in group]  # B = P * G, prompt-major
            group_ids = torch.arange(P).repeat_interleave(G)  # (B,)
            rollout_s = time.perf_counter() - t0

            # ---- 2. reward: math-verify on the decoded completions ----
            t0 = time.perf_counter()
            truths = [str(r["reward_model"]["ground_truth"]) for r in batch_rows for _ in range(G)]
            rewards = torch.tensor(score_batch([g.text for g in gens], truths, cfg.reward), dtype=torch.float32)  # (B,)
            reward_s = time.perf_counter() - t0

            # ---- 3. recompute: log p_train of the same tokens with the training engine ----
            t0 = time.perf_counter()
            batch = policy.token_batch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens],
                                       cfg.rollout.max_response_length)  # fmt: skip
            logp_infer = torch.zeros(batch.response_mask.shape)  # (B, T)
            for i, g in enumerate(gens):
                logp_infer[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
            logp_infer = logp_infer.to(policy.device)
            with torch.no_grad():
                logp_old, _ = policy.logprobs(batch, cfg.rollout.temperature)  # (B, T)
            recompute_s = time.perf_counter() - t0

            # ---- 4-6. d_t (Eq. 5-7), GRPO advantage, the method's shaping (DC-GRPO: A - lam * d): the kernel ----
            step_out = shape_step(rewards, group_ids, logp_old, logp_infer, batch.response_mask.to(policy.device),
                                  mc, lam.value, tc.norm_adv_by_std)  # fmt: skip
            shaped = step_out.shaped

            # ---- 7. PPO-clip updates over prompt-group mini-batches ----
            t0 = time.perf_counter()
            policy.model.train()
            upd: dict[str, list[torch.Tensor]] = {"pg_loss": [], "clipfrac": [], "entropy": [], "grad_norm": [],
                                                  "approx_kl": []}  # fmt: skip
            skipped = 0
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step)
            for _epoch in range(tc.ppo_epochs):
                for prompt_idx in torch.randperm(P, generator=gen).split(tc.ppo_mini_batch):
                    idx = (prompt_idx[:, None] * G + torch.arange(G)).flatten()  # responses of these prompts
                    logp_new, entropy = policy.logprobs(batch.select(idx), cfg.rollout.temperature, with_entropy=True)
                    m_mask = shaped.mask[idx]
                    w = shaped.is_weights[idx] if shaped.is_weights is not None else None
                    pg_loss, pm = ppo_clip_loss(logp_new, logp_old[idx], shaped.advantages[idx], m_mask,
                                                tc.clip_low, tc.clip_high, w, tc.loss_agg, tc.clip_ratio_c)  # fmt: skip
                    ent = masked_mean(entropy, m_mask)
                    loss = pg_loss - tc.entropy_coef * ent
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), tc.grad_clip)
                    if torch.isfinite(grad_norm):  # host sync: a NaN/inf step is skipped, never applied
                        opt.step()
                    else:
                        skipped += 1
                    for k, v in (("pg_loss", pg_loss), ("clipfrac", pm["clipfrac"]), ("entropy", ent),
                                 ("grad_norm", grad_norm), ("approx_kl", pm["approx_kl"])):  # fmt: skip
                        upd[k].append(v.detach())
            policy.model.eval()
            update_s = time.perf_counter() - t0

            # ---- 8. sync the new weights into the deploy engine (in place) ----
            t0 = time.perf_counter()
            engine.sync_weights(policy.state_dict())
            sync_s = time.perf_counter() - t0

            # ---- 9. dual ascent on lambda (Eq. 11): up when over budget, down to 0 when under ----
            d_mean = float(step_out.discrepancy_mean)  # host sync
            dual = dual_step(lam, mc.name, d_mean)

            # ---- 10. log: tensors become floats here, once per step ----
            lengths = batch.response_mask.sum(-1)
            metrics = scalarize({
                **step_out.metrics,
                **dual,
                "reward/mean": rewards.mean(),
                "reward/accuracy": (rewards > 0.5).float().mean(),
                "actor/pg_loss": torch.stack(upd["pg_loss"]).mean(),
                "actor/clipfrac": torch.stack(upd["clipfrac"]).mean(),
                "actor/entropy": torch.stack(upd["entropy"]).mean(),
                "actor/grad_norm": torch.stack(upd["grad_norm"]).mean(),
                "actor/approx_kl": torch.stack(upd["approx_kl"]).mean(),
                "actor/skipped_updates": skipped,
                "response/length_mean": lengths.mean(),
                "response/clip_ratio": sum(g.finish_reason == "length" for g in gens) / len(gens),
                "timing/rollout_s": rollout_s,
                "timing/reward_s": reward_s,
                "timing/recompute_s": recompute_s,
                "timing/update_s": update_s,
                "timing/sync_s": sync_s,
                "timing/step_s": time.perf_counter() - t_step,
            })  # fmt: skip
            if run is not None and (step % cfg.tracking.log_every == 0 or step % tc.steps_per_round == 0):
                run.log_metrics(metrics, step=step)  # every log_every steps and every round's last
            new_history.append({"step": step, **metrics})
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", lam=f"{lam.value:.3g}", d=f"{d_mean:.2e}")

            # ---- 11. round end: held-out accuracy, checkpoint, plot, strict metric flush ----
            if step % tc.steps_per_round == 0:
                if val_rows:
                    acc = heldout_accuracy(engine, val_rows, cfg.rollout.max_response_length, cfg.reward)
                    new_history[-1]["val/accuracy"] = acc
                    if run is not None:
                        run.log_metrics({"val/accuracy": acc}, step=step)
                state = {
                    "step": step,
                    "round": step // tc.steps_per_round,
                    "method": mc.name,
                    "lambda": lam.state_dict(),
                    "data_cursor": sampler.state_dict(),
                    "rng": ckpt.rng_state(),
                    "config_hash": cfg.config_hash(),
                    "history": history + new_history,
                    "mlflow_run_id": run.run_id if run is not None else None,
                }
                last_uri = storage.join(out_dir, "checkpoints", f"step_{step:06d}")
                ckpt.save_checkpoint(last_uri, policy.model, tok, opt, state, endpoint)
                plot_uri = _save_plot(history + new_history, out_dir, mc.budget, run, endpoint)
                if run is not None:
                    run.flush(strict=True)  # raises TrackingUnavailable after retries; the checkpoint is already safe
    finally:
        bar.close()
        if own_engine:
            engine.close()
    return TrainResult(last_uri, step, lam.value, new_history, run.run_id if run is not None else None, plot_uri)


def _save_plot(history, out_dir: str, budget: float, run, endpoint) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(
            [h for h in history if "dc/lambda" in h or "val/accuracy" in h], Path(tmp) / "dc_curves.png", budget
        )
        uri = storage.join(out_dir, "plots", "dc_curves.png")
        storage.write_bytes(uri, png.read_bytes(), endpoint)
        if run is not None:
            try:
                run.log_artifact(png, "plots")
            except Exception as exc:  # the plot is on disk too; metrics are what must not be lost
                log.warning("could not upload plot to MLflow: %s", exc)
    return uri


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
    """Last values of the headline metrics (for tables and the registry)."""
    steps = [h for h in history if "dc/lambda" in h]
    vals = [h["val/accuracy"] for h in history if "val/accuracy" in h]
    out = {}
    if steps:
        last = steps[-1]
        for k in ("dc/discrepancy_mean", "dc/discrepancy_max", "reward/mean", "timing/step_s"):
            out[k] = last[k]
        out["dc/lambda"] = last.get("dc/lambda_next", last["dc/lambda"])  # lambda after the last step
        out["reward/mean_avg"] = sum(h["reward/mean"] for h in steps) / len(steps)
        out["timing/step_s_avg"] = sum(h["timing/step_s"] for h in steps) / len(steps)
    if vals:
        out["val/accuracy_start"], out["val/accuracy"] = vals[0], vals[-1]
    return out
