"""Issue 28, part 2: penalty variants of ours against GRPO and the paper's form, on the real training lab.

tiny-cpu after its SFT warm start, FP8 deploy engine (vLLM CPU), fixed lambda (Dual-GRPO's form, so a lambda
is held for the whole run), the same seeds for every setting:

- ``grpo``;
- ``dual-grpo``: the paper's ``A - lambda * d_t`` at lambda 10 (the default lambda_max) and 300 (where it fails,
  SCIENCE.md section 1);
- ``noise-baseline`` (ours, ``dcgrpo.algorithm.penalty.group_baseline_penalty``): ``A - lambda * (d_t - b_t)``,
  b_t the leave-one-out mean d of the prompt's other responses at position t; same expected gradient, less
  spread; the test of the noise explanation;
- ``noise-sequence`` (ours, ``sequence_penalty``): ``A - lambda * mean_t d_t``, once per sequence.

    .venv/bin/python benchmarks/noise.py                 # 3 seeds, 80 steps, 6 settings (1-2 h on 2 shared cores)
    .venv/bin/python benchmarks/noise.py --seeds 1 --steps 40

One subprocess per seed (one vLLM engine) runs every setting from the cached warm start; rows are cached per
(setting, seed) in ``--work``, so a stopped run resumes. Writes ``benchmarks/results/noise.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from harness import (
    EnginePool,
    RowCache,
    Stopwatch,
    add_worker_args,
    emit_row,
    fill_cache,
    interval,
    quiet_worker,
    step_curves,
    val_accuracies,
)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [("grpo", 0.0), ("dual-grpo", 10.0), ("dual-grpo", 300.0), ("noise-baseline", 10.0),
            ("noise-baseline", 300.0), ("noise-sequence", 300.0)]  # fmt: skip
CURVES = ("dc/discrepancy_mean", "actor/entropy", "reward/mean")


def key(method: str, lam: float) -> str:
    return f"{method} lambda {lam:g}" if method != "grpo" else "grpo"


_GROUPS: list = []  # the current step's group ids, stashed by the wrapped step kernel for the baseline variant


def baseline_shaping(seq_adv, d, logp_train, logp_infer, mask, hp):
    """Ours: ``A - lambda * (d_t - leave-one-out group mean of d at t)``."""
    from dcgrpo.algorithm.methods import ShapedBatch
    from dcgrpo.algorithm.penalty import group_baseline_penalty

    pen = group_baseline_penalty(d, mask, _GROUPS[-1])
    return ShapedBatch((seq_adv.unsqueeze(-1) - hp.lam * pen) * mask, mask, None)


def sequence_shaping(seq_adv, d, logp_train, logp_infer, mask, hp):
    """Ours: ``A - lambda * mean_t d_t``, the penalty once per sequence."""
    from dcgrpo.algorithm.methods import ShapedBatch
    from dcgrpo.algorithm.penalty import sequence_penalty

    return ShapedBatch((seq_adv.unsqueeze(-1) - hp.lam * sequence_penalty(d, mask)) * mask, mask, None)


def run_key(run: dict) -> str:
    return key(run["method"], run["lam"])


def worker(args) -> None:
    quiet_worker()
    from dcgrpo.algorithm.methods import METHODS, register_method
    from dcgrpo.config import load_config
    from dcgrpo.train import rl

    for name, fn in (("noise-baseline", baseline_shaping), ("noise-sequence", sequence_shaping)):
        if name not in METHODS:
            register_method(name, penalised=True)(fn)
    kernel = rl.shape_step

    def stashing_shape_step(rewards, group_ids, *rest):
        _GROUPS[:] = [group_ids]
        return kernel(rewards, group_ids, *rest)

    rl.shape_step = stashing_shape_step
    base = ["rollout.precision=fp8", f"train.seed={args.seed}", f"rollout.seed={args.seed}", "train.rounds=1",
            f"train.steps_per_round={args.steps}", f"train.lr={args.lr}"]  # fmt: skip
    with EnginePool(args.work) as pool:
        for r in json.loads(args.runs):
            method, lam = r["method"], r["lam"]
            over = [f"method.name={method}", f"method.lambda_init={lam}", f"method.lambda_max={max(lam, 10.0)}"]
            name = f"{run_key(r).replace(' ', '-')}-{args.seed}"
            res, wall_s = pool.train(load_config(overrides=base + over), name)
            vals = val_accuracies(res.history)
            emit_row({"key": run_key(r), "method": method, "lam": lam, "seed": args.seed, "steps": args.steps,
                      "wall_s": wall_s, "acc_start": vals[0], "acc": vals[-1],
                      "curve": step_curves(res.history, CURVES)})  # fmt: skip


def _last(xs: list[float]) -> float:
    n = max(len(xs) // 4, 1)
    return mean(xs[-n:])


def _fields(r: dict) -> dict[str, float]:
    return {"acc": r["acc"], "d": _last(r["curve"][CURVES[0]]), "entropy": _last(r["curve"][CURVES[1]])}


def summary(rows: list[dict]) -> list[dict]:
    """Per setting: acc, and d and entropy of the last quarter of the steps (mean ± 95% over seeds); each paired
    with GRPO on the same seed (mean ± 95%, on how many seeds the setting's value is lower, of how many)."""
    by = {(r["key"], r["seed"]): _fields(r) for r in rows}
    out = []
    for k in dict.fromkeys(key(m, lam) for m, lam in SETTINGS):
        seeds = sorted(s for kk, s in by if kk == k)
        if not seeds:
            continue
        row = {"key": k, "seeds": seeds, "wall_s": mean(r["wall_s"] for r in rows if r["key"] == k)}
        for f in ("acc", "d", "entropy"):
            row[f] = interval([by[k, s][f] for s in seeds])
            diffs = [by[k, s][f] - by["grpo", s][f] for s in seeds if ("grpo", s) in by]
            row[f"{f}_vs"] = (*interval(diffs), sum(x < 0 for x in diffs), len(diffs)) if diffs else None
        out.append(row)
    return out


def _pm(x: tuple, fmt: str) -> str:
    return f"{x[0]:{fmt}} ± {x[1]:{fmt.lstrip('+')}}"


def report(rows: list[dict], args, out: Path) -> str:
    table = summary(rows)
    lines = [f"# Penalty variants (issue 28): tiny-cpu, fp8 deploy, {args.steps} steps, lr {args.lr:g}, fixed lambda",
             "", "acc: greedy on the deploy engine, 256 held-out problems. d, entropy: mean of the last quarter of "
             "the steps. ± is the 95% t half-width over seeds; 'vs GRPO' is paired by seed, with on how many "
             "seeds the value is lower than GRPO's.", "",
             "| setting | seeds | acc | acc vs GRPO (lower on) | d | d vs GRPO (lower on) | entropy | "
             "entropy vs GRPO (lower on) | s per run |", "|" + "---|" * 9]  # fmt: skip
    for t in table:
        cells = []
        for f, fmt in (("acc", ".3f"), ("d", ".2e"), ("entropy", ".3f")):
            vs = t[f"{f}_vs"]
            cells += [
                _pm(t[f], fmt),
                "" if t["key"] == "grpo" or vs is None else f"{_pm(vs, '+' + fmt)} ({vs[2]}/{vs[3]})",
            ]
        lines.append(f"| {t['key']} | {len(t['seeds'])} | " + " | ".join(cells) + f" | {t['wall_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.md").write_text(text)
    (out / "noise.json").write_text(json.dumps({"steps": args.steps, "lr": args.lr, "rows": rows}, indent=1))
    plot(rows, out / "noise.png")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in dict.fromkeys(r["key"] for r in rows):
        rs = [r for r in rows if r["key"] == k]
        for ax, c in zip(axes, CURVES, strict=True):
            ys = [mean(v) for v in zip(*(r["curve"][c] for r in rs), strict=False)]
            ax.plot(ys, label=k, lw=1.2, ls="--" if k.startswith("noise") else "-")
    for ax, c in zip(axes, CURVES, strict=True):
        ax.set_title(f"{c} (mean over seeds)")
        ax.set_xlabel("step")
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--only", help="comma-separated setting keys to train (default: all)")
    ap.add_argument("--no-train", action="store_true", help="report from the cached rows only")
    ap.add_argument("--work", default="outputs/bench-noise")
    ap.add_argument("--out", default=str(RESULTS))
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cache = RowCache(Path(args.work) / f"rows-{args.steps}-{args.lr:g}.jsonl", key=lambda r: (r["key"], r["seed"]))
    only = set(args.only.split(",")) if args.only else None
    runs = [{"method": m, "lam": lam} for m, lam in SETTINGS if only is None or key(m, lam) in only]
    clock = Stopwatch()
    argv = [f"--steps={args.steps}", f"--lr={args.lr}", f"--work={args.work}"]
    for seed in range(args.seeds if not args.no_train else 0):
        fill_cache(cache, __file__, seed, runs, run_key, argv,
                   on_row=lambda r: clock.say(f"seed {r['seed']} {r['key']}: acc {r['acc_start']:.3f} -> {r['acc']:.3f}"
                                              f" ({r['wall_s']:.0f} s)"))  # fmt: skip
    print(report([r for r in cache.rows.values() if r["seed"] < args.seeds], args, Path(args.out)))


if __name__ == "__main__":
    main()
