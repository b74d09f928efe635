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

from dcgrpo import shutdown, storage
from dcgrpo.algorithm.discrepancy import masked_mean
from dcgrpo.algorithm.dual import LagrangeMultiplier
from dcgrpo.algorithm.loss import ppo_clip_loss
from dcgrpo.algorithm.methods import get_method
from dcgrpo.algorithm.step import dual_step, make_multiplier, shape_step
from dcgrpo.data.schema import check_prompt_lengths
from dcgrpo.data.synthetic import read_rows
from dcgrpo.engines.hf_engine import HFEngine
from dcgrpo.engines.vllm_engine import VLLMEngine, apply_chat_template, engine_from_config
from dcgrpo.plots import plot_curves
from dcgrpo.reward import score_batch
from dcgrpo.tracking import ROUND_DISCREPANCY, scalarize
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
    """The deploy engine sized for training: the longest prompt plus the longest response."""
    return engine_from_config(cfg, model_dir, cfg.data.max_prompt_length + cfg.rollout.max_response_length + 16)


def train(
    cfg, *, model_dir: str | Path, train_path: str | Path, out_dir: str | Path,
    resume_from: str | ckpt.LoadedCheckpoint | None = None, run=None, rounds: int | None = None,
    val_path: str | Path | None = None, engine: VLLMEngine | None = None, progress: bool = True,
    rows: list[dict] | None = None, val_rows: list[dict] | None = None,
) -> TrainResult:  # fmt: skip
    """Run DC-GRPO (or any registered method) for ``rounds`` rounds (default: the rest of ``cfg.train.rounds``).

    ``model_dir``: the HF model to start from (ignored when resuming); ``train_path``/``val_path``: parquet (verl
    schema), local or s3:// (``rows``/``val_rows`` when already read); held-out greedy accuracy is measured before
    the first round and after each. ``out_dir``: where ``checkpoints/`` and ``plots/`` go, local or s3://.
    ``resume_from``: a checkpoint (or ``checkpoints/`` dir) to continue, or one already loaded (``train_job`` loads
    it before creating the MLflow run). ``run``: a ``dcgrpo.tracking.Run`` (None: only the returned history).
    ``engine``: an open ``VLLMEngine`` to reuse (the policy's weights are synced into it).
    """
    tc, mc = cfg.train, cfg.method
    if tc.kl_loss_coef > 0:
        raise ValueError("train.kl_loss_coef > 0 is not supported by the built-in loop (the paper trains without KL)")
    out_dir, endpoint = str(out_dir), cfg.storage.s3_endpoint_url
    rows = read_rows(train_path, endpoint) if rows is None else rows
    val_rows = (read_rows(val_path, endpoint) if val_path else []) if val_rows is None else val_rows
    st = _initial_state(cfg, model_dir, resume_from, len(rows), run)  # fresh, or exactly where a checkpoint left
    check_prompt_lengths(rows, st.policy.tokenizer, cfg.data.max_prompt_length, str(train_path))  # before vLLM
    rounds = rounds_left(tc, st.step) if rounds is None else rounds
    if rounds <= 0:
        raise ValueError(f"nothing to do: {st.step // tc.steps_per_round} of {tc.rounds} rounds already done")
    own_engine = engine is None
    engine = make_engine(cfg, st.weights_dir) if own_engine else engine
    if not own_engine:
        engine.sync_weights(st.policy.state_dict())
    lam = st.lam
    new_history: list[dict[str, float]] = []
    if val_rows and st.step == 0:
        _log_heldout(cfg, engine, val_rows, run, new_history, step=0)

    # A checkpoint written at SIGTERM may sit mid-round: the current round is finished first.
    last_uri, plot_uri, end_step = "", None, (st.step // tc.steps_per_round + rounds) * tc.steps_per_round
    bar = tqdm(total=end_step - st.step, desc=f"{mc.name}", dynamic_ncols=True, disable=not progress)
    shutdown.defer_sigterm()  # SIGTERM now stops at the next step boundary, with a checkpoint (dcgrpo.shutdown)
    try:
        while st.step < end_step:
            metrics = _one_step(cfg, st, engine, rows, run)
            new_history.append({"step": st.step, **metrics})
            bar.set_description(f"{mc.name} round {(st.step - 1) // tc.steps_per_round + 1}/{tc.rounds}", refresh=False)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", lam=f"{lam.value:.3g}",
                            d=f"{metrics['dc/discrepancy_mean']:.2e}", refresh=False)  # fmt: skip
            bar.update(1)  # one line per step where the output is a log, not a terminal
            written = _after_step(cfg, st, engine, val_rows, out_dir, new_history, run)
            last_uri, plot_uri = written or (last_uri, plot_uri)
    finally:
        shutdown.undefer_sigterm()
        bar.close()
        if own_engine:
            engine.close()
    return TrainResult(last_uri, st.step, lam.value, new_history, run.run_id if run is not None else None, plot_uri)


def _after_step(cfg, st, engine, val_rows, out_dir: str, new_history: list[dict], run) -> tuple[str, str] | None:
    """Step 11 at a round's end: held-out accuracy, checkpoint, plot, strict metric flush; returns (checkpoint,
    plot) when one was written. On SIGTERM (an eviction): this step's checkpoint (mid-round too), then stop."""
    step, spr = st.step, cfg.train.steps_per_round
    written = None
    if step % spr == 0:
        _log_round_discrepancy(cfg.train, st.history + new_history, run, step)
        if val_rows:
            _log_heldout(cfg, engine, val_rows, run, new_history, step=step)
        written = _end_round(cfg, st, out_dir, new_history, run)
    if shutdown.requested():
        if step % spr:
            written = _end_round(cfg, st, out_dir, new_history, run)
        raise shutdown.Terminated(f"SIGTERM after step {step}: checkpoint {written[0]} written "
                                  "(resume: dcgrpo train --resume auto with the same config and --out)")  # fmt: skip
    return written


def _one_step(cfg, st, engine: VLLMEngine, rows: list[dict], run) -> dict[str, float]:
    """Steps 1-10 of one training step (DESIGN.md's data flow); returns its metrics as floats."""
    tc, mc, policy, lam = cfg.train, cfg.method, st.policy, st.lam
    st.step += 1
    step, t_step = st.step, time.perf_counter()
    torch.manual_seed(cfg.rollout.seed * 1_000_003 + step)  # rollouts depend on (seed, step) only

    # ---- 1-3. rollout (deploy engine, log p_inf), reward (math-verify), recompute (log p_train) ----
    ro = _rollout(cfg, engine, policy, [rows[i] for i in st.sampler.next(tc.prompts_per_batch)])

    # ---- 4-6. d_t (Eq. 5-7), GRPO advantage, the method's shaping (DC-GRPO: A - lam * d): the kernel ----
    step_out = shape_step(ro.rewards, ro.group_ids, ro.logp_old, ro.logp_infer,
                          ro.batch.response_mask.to(policy.device), mc, lam.value, tc.norm_adv_by_std)  # fmt: skip

    # ---- 7. PPO-clip updates over prompt-group mini-batches; 8. new weights into the deploy engine ----
    t0 = time.perf_counter()
    upd = _ppo_update(cfg, st, ro.batch, ro.logp_old, step_out.shaped)
    t1 = time.perf_counter()
    engine.sync_weights(policy.state_dict())  # in place
    update_s, sync_s = t1 - t0, time.perf_counter() - t1

    # ---- 9. dual ascent on lambda (Eq. 11): up when over budget, down to 0 when under ----
    dual = dual_step(lam, mc.name, float(step_out.discrepancy_mean))  # host sync

    # ---- 10. log: tensors become floats here, once per step ----
    timings = {**ro.timings, "update_s": update_s, "sync_s": sync_s, "step_s": time.perf_counter() - t_step}
    metrics = scalarize({**step_out.metrics, **dual, **upd, **ro.metrics()}
                        | {f"timing/{k}": v for k, v in timings.items()})  # fmt: skip
    if run is not None and (step % cfg.tracking.log_every == 0 or step % tc.steps_per_round == 0):
        run.log_metrics(metrics, step=step)  # every log_every steps and every round's last
    return metrics


@dataclass
class _Rollout:
    """One step's batch: the deploy engine's responses, their rewards, both engines' log-probs (B = P * G)."""

    gens: list
    batch: Any  # the training engine's TokenBatch of prompt + response tokens
    rewards: torch.Tensor  # (B,)
    logp_infer: torch.Tensor  # (B, T) deploy engine, at sampling time
    logp_old: torch.Tensor  # (B, T) training engine, recomputed before the update
    timings: dict[str, float]
    group_ids: torch.Tensor  # (B,) the prompt of each response: GRPO's groups

    def metrics(self) -> dict[str, Any]:
        return {
            "reward/mean": self.rewards.mean(),
            "reward/accuracy": (self.rewards > 0.5).float().mean(),
            "response/length_mean": self.batch.response_mask.sum(-1).mean(),
            "response/clip_ratio": sum(g.finish_reason == "length" for g in self.gens) / len(self.gens),
        }


def _rollout(cfg, engine: VLLMEngine, policy: HFEngine, batch_rows: list[dict]) -> _Rollout:
    """Phases 1-3 of a step: n responses per prompt from the deploy engine (log p_inf), math-verify rewards
    with ``cfg.reward``, and log p_train of the same tokens recomputed by the training engine."""
    G, T = cfg.train.group_size, cfg.rollout.max_response_length
    t0 = time.perf_counter()
    prompts = [apply_chat_template(policy.tokenizer, r["prompt"]) for r in batch_rows]
    groups = engine.generate(prompts, n=G, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=T)
    gens = [g for group in groups for g in group]  # prompt-major
    t1 = time.perf_counter()
    truths = [str(r["reward_model"]["ground_truth"]) for r in batch_rows for _ in range(G)]
    rewards = torch.tensor(score_batch([g.text for g in gens], truths, cfg.reward), dtype=torch.float32)  # (B,)
    t2 = time.perf_counter()
    batch = policy.token_batch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens], T)
    logp_infer = torch.zeros(batch.response_mask.shape)  # (B, T)
    for i, g in enumerate(gens):
        logp_infer[i, : len(g.logprobs)] = torch.tensor(g.logprobs)
    with torch.no_grad():
        logp_old, _ = policy.logprobs(batch, cfg.rollout.temperature)  # (B, T)
    timings = {"rollout_s": t1 - t0, "reward_s": t2 - t1, "recompute_s": time.perf_counter() - t2}
    group_ids = torch.arange(len(batch_rows)).repeat_interleave(G)  # prompt-major
    return _Rollout(gens, batch, rewards, logp_infer.to(policy.device), logp_old, timings, group_ids)


@dataclass
class _LoopState:
    """What a checkpoint holds and resume restores: policy + optimiser, lambda, data cursor, step, history."""

    policy: HFEngine
    opt: torch.optim.Optimizer
    lam: LagrangeMultiplier
    sampler: PromptSampler
    weights_dir: str
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def _initial_state(cfg, model_dir, resume_from, n_rows: int, run) -> _LoopState:
    """A fresh start from ``model_dir``, or the state of ``resume_from`` (a checkpoint URI or one loaded)."""
    tc, mc = cfg.train, cfg.method
    endpoint = cfg.storage.s3_endpoint_url
    loaded = resume_from
    if isinstance(resume_from, str | Path):
        loaded = ckpt.load_checkpoint(str(resume_from), Path(tempfile.mkdtemp(prefix="dcgrpo-train-")), endpoint)
    weights_dir = str(loaded.local_dir if loaded else model_dir)
    policy = HFEngine(weights_dir, tc.train_precision)
    st = _LoopState(
        policy=policy,
        opt=torch.optim.AdamW(policy.model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay),
        lam=make_multiplier(mc, get_method(mc.name).dual_ascent),
        sampler=PromptSampler(n_rows, cfg.data.seed + tc.seed),
        weights_dir=weights_dir,
    )
    if not loaded:
        return st
    ckpt.check_resumable(loaded.state, loaded.uri, cfg.to_flat_dict(), cfg.config_hash())
    ckpt.optimizer_from_tensors(st.opt, loaded.optimizer_tensors, loaded.state["optimizer"])
    st.lam.load_state_dict(loaded.state["lambda"])
    st.sampler.load_state_dict(loaded.state["data_cursor"])
    ckpt.set_rng_state(loaded.state["rng"])
    st.step, st.history = int(loaded.state["step"]), list(loaded.state.get("history", []))
    log.info("resumed %s at step %d, lambda %.4g", loaded.uri, st.step, st.lam.value)
    if run is not None:  # steps after the checkpoint the crashed process already sent are not sent twice
        run.skip_logged_after(st.step)
    return st


def _ppo_update(cfg, st: _LoopState, batch, logp_old, shaped) -> dict[str, Any]:
    """PPO-clip epochs over prompt-group mini-batches (Eq. 12); a non-finite gradient skips that update.
    Returns the ``actor/*`` metrics (0-d tensors, turned into floats with the step's others)."""
    tc, policy, P, G = cfg.train, st.policy, cfg.train.prompts_per_batch, cfg.train.group_size
    policy.model.train()
    upd: dict[str, list[torch.Tensor]] = {"pg_loss": [], "clipfrac": [], "entropy": [], "grad_norm": [],
                                          "approx_kl": []}  # fmt: skip
    skipped = 0
    gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + st.step)
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
            st.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.model.parameters(), tc.grad_clip)
            if torch.isfinite(grad_norm):  # host sync: a NaN/inf step is skipped, never applied
                st.opt.step()
            else:
                skipped += 1
            for k, v in (("pg_loss", pg_loss), ("clipfrac", pm["clipfrac"]), ("entropy", ent),
                         ("grad_norm", grad_norm), ("approx_kl", pm["approx_kl"])):  # fmt: skip
                upd[k].append(v.detach())
    policy.model.eval()
    return {f"actor/{k}": torch.stack(v).mean() for k, v in upd.items()} | {"actor/skipped_updates": skipped}


def _log_heldout(cfg, engine, val_rows, run, new_history: list[dict], step: int) -> None:
    """Greedy held-out accuracy on the deploy engine, into the history (step 0: its own row) and MLflow."""
    acc = heldout_accuracy(engine, val_rows, cfg.rollout.max_response_length, cfg.reward)
    if step == 0:
        new_history.append({"step": 0, "val/accuracy": acc})
    else:
        new_history[-1]["val/accuracy"] = acc
    if run is not None:
        run.log_metrics({"val/accuracy": acc}, step=step)


def _log_round_discrepancy(tc, history: list[dict], run, step: int) -> None:
    """``ROUND_DISCREPANCY`` of the round ending at ``step``: the mean of its steps' ``dc/discrepancy_mean`` (what
    method selection and the promotion gate compare), into the step's history row and MLflow."""
    first = step - tc.steps_per_round
    d = [h["dc/discrepancy_mean"] for h in history if first < h.get("step", -1) <= step and "dc/discrepancy_mean" in h]
    value = sum(d) / len(d) if d else float("nan")
    history[-1][ROUND_DISCREPANCY] = value
    if run is not None:
        run.log_metrics({ROUND_DISCREPANCY: value}, step=step)


def _end_round(cfg, st: _LoopState, out_dir: str, new_history: list[dict], run) -> tuple[str, str]:
    """The round's checkpoint (model, optimiser, lambda, cursor, RNG, history), its plot, a strict flush."""
    endpoint = cfg.storage.s3_endpoint_url
    state = {
        "step": st.step,
        "round": st.step // cfg.train.steps_per_round,
        "method": cfg.method.name,
        "lambda": st.lam.state_dict(),
        "data_cursor": st.sampler.state_dict(),
        "rng": ckpt.rng_state(),
        "config_hash": cfg.config_hash(),
        "config": cfg.to_flat_dict(),  # a resume checks it trains the same thing (checkpoint.check_resumable)
        "history": st.history + new_history,
        "mlflow_run_id": run.run_id if run is not None else None,
    }
    uri = storage.join(out_dir, "checkpoints", f"step_{st.step:06d}")
    ckpt.save_checkpoint(uri, st.policy.model, st.policy.tokenizer, st.opt, state, endpoint, cfg.train.keep_checkpoints)
    plot_uri = _save_plot(st.history + new_history, out_dir, st.lam.budget, run, endpoint, cfg.method.name)
    if run is not None:
        run.flush(strict=True)  # raises TrackingUnavailable after retries; the checkpoint is already safe
    return uri, plot_uri


def _save_plot(history, out_dir: str, budget: float | None, run, endpoint, method: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curves(history, Path(tmp) / "dc_curves.png", budget, method)
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
        out["dc/lambda_next"] = last.get("dc/lambda_next", last["dc/lambda"])  # lambda after the last step
        out["reward/mean_avg"] = sum(h["reward/mean"] for h in steps) / len(steps)
        out["timing/step_s_avg"] = sum(h["timing/step_s"] for h in steps) / len(steps)
    if vals:
        out["val/accuracy_start"], out["val/accuracy"] = vals[0], vals[-1]
    return out
