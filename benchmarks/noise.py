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
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_toy import interval  # noqa: E402

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


def worker(args) -> None:
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    from dcgrpo.algorithm.methods import METHODS, register_method
    from dcgrpo.config import load_config
    from dcgrpo.train import rl
    from dcgrpo.train.jobs import prepare_inputs

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
    cfg = load_config(overrides=base)
    model_dir, train_path, val_path = prepare_inputs(cfg, Path(args.work))
    engine = rl.make_engine(cfg, str(model_dir))
    try:
        for method, lam in json.loads(args.settings):
            over = [f"method.name={method}", f"method.lambda_init={lam}", f"method.lambda_max={max(lam, 10.0)}"]
            mcfg = load_config(overrides=base + over)
            t0 = time.perf_counter()
            res = rl.train(mcfg, model_dir=model_dir, train_path=train_path, val_path=val_path,
                           out_dir=Path(args.work) / "runs" / f"{key(method, lam).replace(' ', '-')}-{args.seed}",
                           engine=engine, progress=False)  # fmt: skip
            steps = [h for h in res.history if "dc/lambda" in h]
            vals = [h["val/accuracy"] for h in res.history if "val/accuracy" in h]
            row = {"key": key(method, lam), "method": method, "lam": lam, "seed": args.seed, "steps": args.steps,
                   "wall_s": time.perf_counter() - t0, "acc_start": vals[0], "acc": vals[-1],
                   "curve": {k: [h[k] for h in steps] for k in CURVES}}  # fmt: skip
            print("ROW " + json.dumps(row), flush=True)
    finally:
        engine.close()


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
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cache = Path(args.work) / f"rows-{args.steps}-{args.lr:g}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    have = {(r["key"], r["seed"]) for r in done}
    only = set(args.only.split(",")) if args.only else None
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        todo = [s for s in SETTINGS if (key(*s), seed) not in have and (only is None or key(*s) in only)]
        if todo and not args.no_train:
            run_seed(args, seed, todo, cache, done, t0)
    print(report([r for r in done if r["seed"] < args.seeds], args, Path(args.out)))


def run_seed(args, seed: int, todo: list, cache: Path, done: list, t0: float) -> None:
    cmd = [sys.executable, __file__, "--worker", f"--seed={seed}", f"--steps={args.steps}", f"--lr={args.lr}",
           f"--work={args.work}", f"--settings={json.dumps(todo)}"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                with cache.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done.append(row)
                print(f"[{time.perf_counter() - t0:.0f} s] seed {seed} {row['key']}: acc {row['acc_start']:.3f} -> "
                      f"{row['acc']:.3f} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"worker for seed {seed} failed (rc {proc.returncode}); rows so far are in {cache}")


if __name__ == "__main__":
    main()
