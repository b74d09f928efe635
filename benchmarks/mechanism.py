"""Mechanism lab (issue 13, part 1): what the penalty ``A - lambda * d_t`` does to d, entropy, reward and accuracy.

Fixed lambda (Dual-GRPO's form: no dual ascent, so each lambda is held for the whole run) over a grid, for each
discrepancy metric (prob_diff, ratio, log_ratio) and the margin hinge, on the tiny-cpu preset with an FP8 deploy
engine (FP8-grid weights served in bf16 on CPU), plus one variant of ours, labelled as such:

- ``lowp`` (ours): the penalty only on tokens the trainer gives p < 1/2. Why: both engines share the weights, so
  a token's gap is about p(1-p) times the logit error (the lab reports corr(d, p(1-p)) over the tokens it saw);
  lowering a sampled token's probability then lowers its gap only when p < 1/2, and raises it above.

Token level, every step: which tokens carry the penalty (by the trainer's probability, by the sign of
p_train - p_infer, by position), and how d and the policy entropy move together.

    .venv/bin/python benchmarks/mechanism.py --quick      # 1 seed, 40 steps, lambda 0/10/300, prob_diff (~3 min)
    .venv/bin/python benchmarks/mechanism.py              # 2 seeds, 80 steps, the whole grid (~25 min)

One subprocess per seed holds one vLLM engine and runs every setting through it (each from the same cached warm
start). Writes ``benchmarks/results/mechanism.{json,md,png}`` (``--out``); rows are cached per (setting, seed) in
``--work``, so an interrupted lab resumes where it stopped.
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
    figure,
    fill_cache,
    md_table,
    mean_curves,
    nanmean,
    plot_curves,
    quarter_mean,
    quiet_worker,
    step_curves,
    val_accuracies,
    write_report,
)

RESULTS = Path(__file__).resolve().parent / "results"
P_BINS = (0.0, 0.1, 0.5, 0.9, 1.0 + 1e-9)
CURVES = ("dc/discrepancy_mean", "actor/entropy", "reward/mean")  # per step, in each row and the plot
BIN_NAMES = ("p<.1", ".1-.5", ".5-.9", ">.9")


def settings(quick: bool) -> list[dict]:
    """(method, discrepancy kind, lambda, margin) per run; lambda 0 is GRPO with the metric only measured."""
    if quick:
        return [{"method": m, "kind": "prob_diff", "lam": lam, "margin": 0.0}
                for m, lams in (("dual-grpo", (0.0, 10.0, 300.0)), ("lowp", (300.0,))) for lam in lams]  # fmt: skip
    runs = [{"method": "dual-grpo", "kind": k, "lam": lam, "margin": 0.0}
            for k in ("prob_diff", "ratio", "log_ratio") for lam in (0.0, 1.0, 10.0, 100.0, 300.0)]  # fmt: skip
    runs.append({"method": "dual-grpo", "kind": "prob_diff", "lam": 300.0, "margin": 1e-3})  # the hinge
    runs += [{"method": "lowp", "kind": "prob_diff", "lam": lam, "margin": 0.0} for lam in (10.0, 100.0, 300.0)]
    return runs


def run_key(s: dict) -> str:
    return f"{s['method']}-{s['kind']}-lam{s['lam']:g}-m{s['margin']:g}"


# ------------------------------------------------------------------ token statistics (pure torch, tested)


def token_stats(logp_train, logp_infer, d, mask, lam: float, margin: float) -> dict[str, float]:
    """Where one step's penalty ``lam * max(d - margin, 0)`` falls, and how d relates to p(1-p).

    Shares are of the penalty mass (of d when lam is 0: where it would fall); ``d_by_p`` is the mean d per
    probability bin of the trainer's p; ``corr_d_pq`` the Pearson correlation of d with p(1-p) over tokens.
    """
    import torch

    m = mask > 0
    p, q = logp_train.exp()[m].double(), logp_infer.exp()[m].double()
    dd = d[m].double()
    weight = (dd - margin).clamp_min(0.0) if lam > 0 else dd
    total = float(weight.sum()) or 1.0
    pos = torch.nonzero(m, as_tuple=False)[:, 1].double()  # token position within its response
    out = {"tokens": int(m.sum()), "share_p_above_q": float(weight[p > q].sum()) / total,
           "mean_pos_all": float(pos.mean()), "mean_pos_weighted": float((pos * weight).sum()) / total}  # fmt: skip
    for name, lo, hi in zip(BIN_NAMES, P_BINS[:-1], P_BINS[1:], strict=True):
        sel = (p >= lo) & (p < hi)
        out[f"tokens_{name}"] = float(sel.double().mean())
        out[f"share_{name}"] = float(weight[sel].sum()) / total
        out[f"d_by_p_{name}"] = float(dd[sel].mean()) if bool(sel.any()) else float("nan")
    pq = p * (1 - p)
    out["corr_d_pq"] = float(torch.corrcoef(torch.stack([dd, pq]))[0, 1]) if dd.numel() > 2 else float("nan")
    return out


def lowp_shaping(seq_adv, d, logp_train, logp_infer, mask, hp):
    """Ours: DC-GRPO's penalty on the tokens the trainer gives p < 1/2 only (module docstring)."""
    from dcgrpo.algorithm.advantage import dc_penalized_advantage
    from dcgrpo.algorithm.methods import ShapedBatch

    low = (logp_train.exp() < 0.5).to(d.dtype)
    return ShapedBatch(dc_penalized_advantage(seq_adv, d * low, mask, hp.lam, hp.margin), mask, None)


# ------------------------------------------------------------------ worker: one seed, every setting


def record_token_stats(recorded: list[dict]) -> None:
    """Wrap the loop's step kernel so that every step appends its ``token_stats`` to ``recorded``."""
    from dcgrpo.algorithm.discrepancy import token_discrepancy, valid_token_mask
    from dcgrpo.train import rl

    kernel = rl.shape_step

    def recording_shape_step(rewards, group_ids, logp_train, logp_infer, mask, method_cfg, lam, *rest):
        out = kernel(rewards, group_ids, logp_train, logp_infer, mask, method_cfg, lam, *rest)
        valid = valid_token_mask(logp_train, logp_infer, mask)
        d = token_discrepancy(logp_train, logp_infer, valid, method_cfg.discrepancy)
        recorded.append(token_stats(logp_train, logp_infer, d, valid, float(lam), method_cfg.margin))
        return out

    rl.shape_step = recording_shape_step


def worker(args) -> None:
    quiet_worker()
    from dcgrpo.algorithm.methods import METHODS, register_method
    from dcgrpo.config import load_config

    if "lowp" not in METHODS:
        register_method("lowp", penalised=True)(lowp_shaping)
    recorded: list[dict] = []
    record_token_stats(recorded)
    base = [f"rollout.precision={args.precision}", f"train.seed={args.seed}", f"rollout.seed={args.seed}",
            "train.rounds=1", f"train.steps_per_round={args.steps}", f"train.lr={args.lr}"]  # fmt: skip
    with EnginePool(args.work) as pool:
        for s in json.loads(args.runs):
            recorded.clear()
            over = [f"method.name={s['method']}", f"method.discrepancy={s['kind']}", f"method.lambda_init={s['lam']}",
                    f"method.margin={s['margin']}", f"method.lambda_max={max(s['lam'], 10.0)}"]  # fmt: skip
            res, wall_s = pool.train(load_config(overrides=base + over), f"{run_key(s)}-{args.seed}")
            vals = val_accuracies(res.history)
            emit_row({**s, "seed": args.seed, "steps": args.steps, "wall_s": wall_s, "acc_start": vals[0],
                      "acc": vals[-1], "curve": step_curves(res.history, CURVES),
                      "tokens": {k: nanmean([r[k] for r in recorded]) for k in recorded[0]}})  # fmt: skip


# ------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 4 settings")
    ap.add_argument("--seeds", type=int, help="seeds 0..n-1 (default 2; --quick 1)")
    ap.add_argument("--steps", type=int, help="RL steps per run (default 80; --quick 40)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--precision", default="fp8", help="deploy precision of the rollout engine")
    ap.add_argument("--work", default="outputs/bench-mechanism", help="warm start, runs and the row cache")
    ap.add_argument("--out", default=str(RESULTS), help="where mechanism.{json,md,png} go")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    seeds = args.seeds or (1 if args.quick else 2)
    steps = args.steps or (40 if args.quick else 80)
    cache = RowCache(Path(args.work) / f"rows-{args.precision}-{steps}-{args.lr:g}.jsonl",
                     key=lambda row: (run_key(row), row["seed"]))  # fmt: skip
    clock = Stopwatch()
    argv = [f"--steps={steps}", f"--lr={args.lr}", f"--precision={args.precision}", f"--work={args.work}"]
    for seed in range(seeds):
        fill_cache(cache, __file__, seed, settings(args.quick), run_key, argv,
                   on_row=lambda row: clock.say(f"seed {row['seed']} {run_key(row)}: acc {row['acc_start']:.3f} -> "
                                                f"{row['acc']:.3f}"))  # fmt: skip
    wanted = {run_key(s) for s in settings(args.quick)}
    rows = [r for r in cache.rows.values() if run_key(r) in wanted and r["seed"] < seeds]
    report(rows, steps, args, Path(args.out), clock.elapsed)


# ------------------------------------------------------------------ report


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean over seeds per setting: accuracy, d and entropy (first vs last quarter of the run), token shares."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(run_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        c = mean_curves(rs)
        tok = {k: mean(r["tokens"][k] for r in rs) for k in rs[0]["tokens"]}
        out.append({"setting": key, **{k: rs[0][k] for k in ("method", "kind", "lam", "margin")}, "seeds": len(rs),
                    "acc_start": mean(r["acc_start"] for r in rs), "acc": mean(r["acc"] for r in rs),
                    "acc_min": min(r["acc"] for r in rs), "acc_max": max(r["acc"] for r in rs),
                    "d_first": quarter_mean(c["dc/discrepancy_mean"], False),
                    "d_last": quarter_mean(c["dc/discrepancy_mean"], True),
                    "ent_first": quarter_mean(c["actor/entropy"], False),
                    "ent_last": quarter_mean(c["actor/entropy"], True),
                    "reward_last": quarter_mean(c["reward/mean"], True), "tokens": tok, "curve": c})  # fmt: skip
    return out


TABLE_HEADER = ["setting", "acc start", "acc end", "d first", "d last", "entropy first", "entropy last", "reward last",
                *(f"share {b}" for b in BIN_NAMES), "share p>q", "corr(d, p(1-p))"]  # fmt: skip


def table_cells(t: dict) -> list[str]:
    """One line of the table (``summary_rows``), formatted."""
    tok = t["tokens"]
    return [t["setting"], f"{t['acc_start']:.3f}", f"{t['acc']:.3f} [{t['acc_min']:.3f}, {t['acc_max']:.3f}]",
            f"{t['d_first']:.2e}", f"{t['d_last']:.2e}", f"{t['ent_first']:.3f}", f"{t['ent_last']:.3f}",
            f"{t['reward_last']:.3f}", *(f"{tok[f'share_{b}']:.2f}" for b in BIN_NAMES),
            f"{tok['share_p_above_q']:.2f}", f"{tok['corr_d_pq']:.2f}"]  # fmt: skip


def report(rows: list[dict], steps: int, args, out: Path, wall_s: float) -> None:
    table = summary_rows(rows)
    seeds = sorted({r["seed"] for r in rows})
    tok0 = table[0]["tokens"]
    lines = [f"# Mechanism lab: tiny-cpu, {args.precision} deploy, {steps} steps, lr {args.lr:g}, seeds {seeds}",
             "", f"`.venv/bin/python benchmarks/mechanism.py{' --quick' if args.quick else ''}`; "
             f"{sum(r['wall_s'] for r in rows):.0f} s of runs ({wall_s:.0f} s this call) on a 2-core CPU machine.",
             "Accuracy: greedy, deploy engine, 256 held-out problems, mean over seeds [min, max]. d and entropy: mean "
             "of the first and last quarter of the steps. Shares: where the step's penalty mass falls (of d at "
             "lambda 0), by the trainer's probability p of the sampled token; p>q: share on tokens the trainer "
             "rates above the deploy engine.", "", md_table(TABLE_HEADER, [table_cells(t) for t in table]), "",
             "Mean d by the trainer's p (first setting, all steps): "
             + ", ".join(f"{b}: {tok0[f'd_by_p_{b}']:.2e} ({tok0[f'tokens_{b}']:.0%} of tokens)" for b in BIN_NAMES)]  # fmt: skip
    write_report(out, "mechanism", "\n".join(lines) + "\n",
                 {"steps": steps, "lr": args.lr, "precision": args.precision, "seeds": seeds, "rows": rows}, indent=1)  # fmt: skip
    with figure(out / "mechanism.png", 1, 3, (15, 4)) as (_, axes):
        series = [(t["setting"], t["curve"], {"lw": 1.2, "ls": "--" if t["method"] == "lowp" else "-"})
                  for t in table if t["kind"] == "prob_diff"]  # fmt: skip
        plot_curves(axes, series, CURVES, str, log_panel=0, legend_panel=2, legend_size=7)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
