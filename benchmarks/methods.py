"""Methods benchmark on the tiny-cpu preset (not a timed test): prints one results table.

Runs GRPO, Dual-GRPO, DC-GRPO, TIS, MIS and IcePop with bf16 and fp8 deploy
(fp8 on CPU = FP8-grid weights served in bf16), several seeds, the same
warm start, data and steps. One subprocess per (precision, seed) holds one vLLM
engine (one engine per process) and runs every method through it, syncing
each method's fresh policy in, so methods of one row group share a process
and their step times are comparable.

    .venv/bin/python benchmarks/methods.py                       # full: 6 methods x 2 precisions x 3 seeds
    .venv/bin/python benchmarks/methods.py --seeds 1 --steps 4 --methods grpo,dc-grpo

Seed s sets train.seed and rollout.seed (data order, rollouts, mini-batches);
the SFT warm start (cached under --work) is the same for every run.
"""

from __future__ import annotations

import argparse
import time
from statistics import mean, median

from harness import EnginePool, Stopwatch, emit_row, quiet_worker, run_worker, text_table

from dcgrpo.algorithm.methods import METHODS as _REGISTRY

METHODS = tuple(_REGISTRY)  # every registered method, in registration order
PHASES = ("rollout", "reward", "recompute", "update", "sync")


def worker(args) -> None:
    """One (precision, seed): every method through one engine; one ``ROW`` line per method on stdout."""
    quiet_worker()
    from dcgrpo.config import load_config
    from dcgrpo.train.rl import summarize

    base = [f"rollout.precision={args.precision}", f"train.seed={args.seed}", f"rollout.seed={args.seed}",
            "train.rounds=1", f"train.steps_per_round={args.steps}"]  # fmt: skip
    with EnginePool(args.work) as pool:
        for name in args.methods.split(","):
            fixed = [f"method.lambda_init={args.dual_lambda}"] if name == "dual-grpo" else []
            mcfg = load_config(overrides=base + [f"method.name={name}"] + fixed + (args.set or []))
            res, _ = pool.train(mcfg, f"{name}-{args.precision}-{args.seed}")
            hist = [h for h in res.history if "dc/lambda" in h]
            timed = hist[1:] or hist  # step 1 pays first-call warm-up
            s = summarize(res.history)
            row = {"method": name, "precision": args.precision, "seed": args.seed,
                   "acc_start": s["val/accuracy_start"], "acc": s["val/accuracy"], "lambda": res.lam,
                   "d_mean": mean(h["dc/discrepancy_mean"] for h in hist),
                   "d_max": max(h["dc/discrepancy_max"] for h in hist),
                   "step_s": median(h["timing/step_s"] for h in timed),
                   "shape_us": _method_cost_us(name, mcfg)}  # fmt: skip
            for p in PHASES:  # medians: the machine is shared, a busy neighbour inflates single steps
                row[f"{p}_s"] = median(h[f"timing/{p}_s"] for h in timed)
            emit_row(row)


def _method_cost_us(name: str, cfg) -> float:
    """What a method itself adds to a step, isolated from the shared loop: discrepancy, GRPO
    advantage, the method's shaping and (DC-GRPO) the dual step on a full-size (B, T) batch.
    Microseconds, median of 200 calls."""
    import torch

    from dcgrpo.algorithm.advantage import grpo_advantage
    from dcgrpo.algorithm.discrepancy import token_discrepancy
    from dcgrpo.algorithm.methods import get_method, shape_advantages
    from dcgrpo.algorithm.step import make_multiplier, method_hparams

    B, T = cfg.train.responses_per_batch, cfg.rollout.max_response_length
    g = torch.Generator().manual_seed(0)
    logp_train = -torch.rand(B, T, generator=g)  # (B, T)
    logp_infer = logp_train + 1e-3 * torch.randn(B, T, generator=g)  # (B, T)
    mask = torch.ones(B, T)
    rewards = (torch.rand(B, generator=g) > 0.5).float()  # (B,)
    group_ids = torch.arange(cfg.train.prompts_per_batch).repeat_interleave(cfg.train.group_size)
    mc, method = cfg.method, get_method(name)
    lam = make_multiplier(mc, method.dual_ascent)
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        d = token_discrepancy(logp_train, logp_infer, mask, mc.discrepancy)
        adv = grpo_advantage(rewards, group_ids)
        shape_advantages(name, adv, d, logp_train, logp_infer, mask, method_hparams(mc, lam.value))
        if method.dual_ascent:
            lam.update(float(d.mean()))  # host sync, as in the loop
        times.append(time.perf_counter() - t0)
    return median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0..n-1)")
    ap.add_argument("--steps", type=int, default=16, help="RL steps per run (one round)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--dual-lambda", type=float, default=1.0, help="Dual-GRPO's fixed lambda (method.lambda_init)")
    ap.add_argument("--work", default="outputs/bench-methods", help="cache for data, warm start and checkpoints")
    ap.add_argument("--set", action="append", help="extra config override section.field=value (repeatable)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    rows, clock = [], Stopwatch()
    for precision in args.precisions.split(","):
        for seed in range(args.seeds):
            argv = ["--worker", f"--precision={precision}", f"--seed={seed}", f"--steps={args.steps}",
                    f"--methods={args.methods}", f"--work={args.work}", f"--dual-lambda={args.dual_lambda}",
                    *(f"--set={s}" for s in args.set or [])]  # fmt: skip
            got = run_worker(__file__, argv, label=f"worker {precision} seed {seed}").rows
            rows += got
            clock.say(f"{precision} seed {seed}: {len(got)} runs")
    report(rows, args)


def report(rows: list[dict], args) -> None:
    n = len({r["seed"] for r in rows})
    print(
        f"\ntiny-cpu, {args.steps} steps, {n} seed(s). acc (deploy engine, greedy, 256 held-out), d, lambda: mean"
        f" over seeds (acc +-: half range). Times: median step after step 1, mean over seeds; s except method us."
    )
    cols = ("method", "deploy", "acc start", "acc end", "+-", "mean d", "max d", "lambda", "step s", "method",
            "rollout", "reward", "recomp", "update", "sync", "other")  # fmt: skip
    widths = (10, 6, 9, 7, 5, 9, 9, 8, 7, 8, 7, 7, 7, 7, 7, 7)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["precision"], r["method"]), []).append(r)
    print(text_table(cols, [table_cells(precision, method, rs) for (precision, method), rs in groups.items()], widths))
    for precision in args.precisions.split(","):
        g, dc = groups.get((precision, "grpo")), groups.get((precision, "dc-grpo"))
        if g and dc:
            step_g = mean(r["step_s"] for r in g)
            extra_us = mean(r["shape_us"] for r in dc) - mean(r["shape_us"] for r in g)
            print(f"{precision}: DC-GRPO / GRPO step time = {mean(r['step_s'] for r in dc) / step_g:.3f} measured "
                  f"(median steps, adjacent runs in one process); from the isolated method cost: "
                  f"1 + {extra_us:.0f} us / {step_g * 1e3:.0f} ms = {1 + extra_us * 1e-6 / step_g:.4f}")  # fmt: skip
    step = mean(r["step_s"] for r in rows)
    core = mean(r["rollout_s"] + r["recompute_s"] + r["update_s"] for r in rows)
    print(f"share of a step outside rollout + recompute + update: {1 - core / step:.1%} "
          f"(reward {mean(r['reward_s'] for r in rows) / step:.1%}, sync {mean(r['sync_s'] for r in rows) / step:.1%},"
          f" rest {1 - (core + mean(r['reward_s'] + r['sync_s'] for r in rows)) / step:.1%})")  # fmt: skip


def table_cells(precision: str, method: str, rs: list[dict]) -> list[str]:
    """One line of the table: means over seeds (accuracy: and its half range)."""
    m = {k: mean(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
    other = m["step_s"] - sum(m[f"{p}_s"] for p in PHASES)
    half = (max(r["acc"] for r in rs) - min(r["acc"] for r in rs)) / 2
    return [method, precision, f"{m['acc_start']:.3f}", f"{m['acc']:.3f}", f"{half:.2f}", f"{m['d_mean']:.2e}",
            f"{m['d_max']:.2e}", f"{m['lambda']:.2g}", f"{m['step_s']:.3f}", f"{m['shape_us']:.0f} us",
            *(f"{m[f'{p}_s']:.3f}" for p in PHASES), f"{other:.3f}"]  # fmt: skip


if __name__ == "__main__":
    main()
