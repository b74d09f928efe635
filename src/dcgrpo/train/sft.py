"""Supervised warm start: teach a freshly built tiny model the task's format.

A randomly initialised model puts its mass on arbitrary tokens and never
earns a reward, so RL would have no signal. A few hundred steps of
next-token cross-entropy on ``extra_info.solution`` (response tokens only)
give a policy with a non-trivial but imperfect accuracy for RL to improve.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcgrpo.data.synthetic import read_rows
from dcgrpo.engines.hf_engine import HFEngine
from dcgrpo.engines.vllm_engine import apply_chat_template, encode_prompt
from dcgrpo.models import build_tiny_model

log = logging.getLogger(__name__)

SFT_BATCH_SIZE = 32


def _examples(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, reference solution tokens + EOS) of each row."""
    return [
        (encode_prompt(tok, apply_chat_template(tok, r["prompt"])),
         encode_prompt(tok, r["extra_info"]["solution"]) + [tok.eos_token_id])
        for r in rows
    ]  # fmt: skip


def warm_start(cfg, model_dir: str | Path, train_path: str | Path, out_dir: str | Path) -> Path:
    """Fine-tune ``model_dir`` for ``cfg.model.sft_steps`` steps on the reference
    solutions in ``train_path``; save an HF directory to ``out_dir`` and return it.

    Rows without ``extra_info.solution`` (e.g. DAPO problems) are skipped; with
    none at all the model is copied unchanged. Deterministic by ``cfg.model.seed``.
    """
    out_dir = Path(out_dir)
    rows = [
        r for r in read_rows(train_path, cfg.storage.s3_endpoint_url) if (r.get("extra_info") or {}).get("solution")
    ]
    if cfg.model.sft_steps and not rows:
        # The tiny model on DAPO-Math (problems without worked solutions): it starts untrained, its rewards stay
        # near 0 and RL has no signal. The run still exercises the data path end to end; learning needs a base model.
        log.warning("SFT warm start skipped: %s has no rows with worked solutions (extra_info.solution), so the tiny "
                    "model starts untrained and will score ~0: this run checks the data path, it cannot learn; "
                    "train a real base model on this data (model.path / --model-uri)", train_path)  # fmt: skip
    if cfg.model.sft_steps == 0 or not rows:
        log.info("SFT skipped (%d steps, %d rows with solutions)", cfg.model.sft_steps, len(rows))
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return out_dir

    torch.manual_seed(cfg.model.seed)
    rng = random.Random(cfg.model.seed)
    engine = HFEngine(str(model_dir), cfg.train.train_precision)
    tok = engine.tokenizer
    examples = _examples(tok, rows)
    model = engine.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.model.sft_lr, weight_decay=0.0)
    steps = cfg.model.sft_steps
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    # A line every 10 s where the output is a log (a pipeline task's), not 600 of them; live in a terminal.
    bar = tqdm(range(steps), desc="sft", dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
    for step in bar:
        batch_ex = rng.sample(examples, min(SFT_BATCH_SIZE, len(examples)))
        batch = engine.token_batch([p for p, _ in batch_ex], [r for _, r in batch_ex])
        logp, _ = engine.logprobs(batch)  # (B, T)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")  # host sync, every 20 steps only
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    for extra in ("generation_config.json",):
        if (Path(model_dir) / extra).is_file() and not (out_dir / extra).is_file():
            shutil.copy(Path(model_dir) / extra, out_dir / extra)
    log.info("SFT warm start: %d steps, final loss %.3f -> %s", steps, loss.item(), out_dir)
    return out_dir


def tiny_policy(cfg, train_path: str | Path, out_dir: str | Path) -> Path:
    """The policy when no base model is given (``dcgrpo train`` and the pipeline's warm start alike): the tiny
    model of ``cfg.model`` built in a temporary directory and warm-started into ``out_dir``."""

    with tempfile.TemporaryDirectory(prefix="dcgrpo-base-") as tmp:
        return warm_start(cfg, build_tiny_model(cfg.model, tmp), train_path, out_dir)
