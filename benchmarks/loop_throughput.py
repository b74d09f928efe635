"""Loop throughput on the tiny-cpu preset (not a timed test): rollout tokens/s and step time.

    .venv/bin/python benchmarks/loop_throughput.py [--steps 8] [--precision bf16]

Rollout: the deploy engine samples n=group_size responses for batches of
prompts of growing size (T=1, max_response_length tokens), best of 3 calls
after a warm-up. Step: a short default DC-GRPO run, mean step time and its
phases (step 1 left out: first-call warm-up).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from statistics import mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--work", default="outputs/bench-methods")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.engines.vllm_engine import apply_chat_template
    from dcgrpo.stages.model import prepare_inputs
    from dcgrpo.train.rl import make_engine, train

    cfg = load_config(overrides=[f"rollout.precision={args.precision}", "train.rounds=1",
                                 f"train.steps_per_round={args.steps}"])  # fmt: skip
    model_dir, train_path, _ = prepare_inputs(cfg, Path(args.work))
    rows = read_rows(train_path)
    t0 = time.perf_counter()
    engine = make_engine(cfg, str(model_dir))
    print(f"engine start: {time.perf_counter() - t0:.1f} s ({args.precision})")
    try:
        G, T = cfg.train.group_size, cfg.rollout.max_response_length
        print(f"{'prompts':>7} {'responses':>9} {'tokens':>7} {'s':>7} {'tok/s':>8}")
        for P in (1, 8, 32, 128):
            prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in rows[:P]]
            engine.generate(prompts, n=G, temperature=1.0, top_p=1.0, max_tokens=T)  # warm-up
            best = None
            for _ in range(3):
                t0 = time.perf_counter()
                out = engine.generate(prompts, n=G, temperature=1.0, top_p=1.0, max_tokens=T)
                dt = time.perf_counter() - t0
                toks = sum(len(g.token_ids) for grp in out for g in grp)
                best = min(best or (dt, toks), (dt, toks))
            print(f"{P:7d} {P * G:9d} {best[1]:7d} {best[0]:7.3f} {best[1] / best[0]:8.0f}")
        res = train(cfg, model_dir=model_dir, train_path=train_path, out_dir=Path(args.work) / "runs" / "throughput",
                    engine=engine, progress=False)  # fmt: skip
    finally:
        engine.close()
    steps = [h for h in res.history if "dc/lambda" in h][1:]
    phases = ("rollout", "reward", "recompute", "update", "sync")
    m = {p: mean(h[f"timing/{p}_s"] for h in steps) for p in phases}
    step = mean(h["timing/step_s"] for h in steps)
    toks = mean(h["response/length_mean"] for h in steps) * cfg.train.responses_per_batch
    print(f"\nstep ({cfg.train.prompts_per_batch} prompts x {G}, {len(steps)} steps after warm-up): {step:.3f} s, "
          f"{toks / step:.0f} response tok/s end to end, rollout {toks / m['rollout']:.0f} tok/s")  # fmt: skip
    print("  " + "  ".join(f"{p} {m[p]:.3f}" for p in phases) + f"  other {step - sum(m.values()):.3f}")


if __name__ == "__main__":
    main()
