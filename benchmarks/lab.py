"""Mismatch lab (issue 13, parts 2, 3 and 5): the paper's tables at toy scale, the deploy ladder, the auto budget.

Every number is accuracy on the *deploy* engine (greedy, 256 held-out problems, the engine the rollouts came from),
over seeds 0..n-1, with 95% t-intervals; comparisons are paired by seed against GRPO on the same deploy engine.

Studies (``--studies``, in this order; a run shared by two studies is trained once):

- ``ladder``   (part 2) GRPO and DC-GRPO (eps 3e-4, and ``budget=auto``) on each deploy format of the rollout
  engine: bf16, FP8 block/channel (``rollout.precision=fp8``), int4 group 128/32, MXFP4, NVFP4
  (``rollout.weight_grid``; simulated on CPU).
- ``table2``   (Table 2) GRPO, DC-GRPO, TIS, MIS, IcePop with bf16 and FP8 deploy.
- ``dual``     (Section 5) Dual-GRPO with a fixed lambda of 10/100/300 against DC-GRPO, whose budget lets lambda
  rise to the same lambda_max (300) only while the discrepancy is over it.
- ``eps``      (Table 5, part 5) DC-GRPO's budget eps from far below the measured floor to above it, and
  ``method.budget=auto`` (ours), at lambda_max 300 and dual lr 1e5, so that a saturated lambda can cost reward.
- ``robust``   (Tables 3-4) lambda_init 0/10/100 and dual lr 1e4/1e5/1e6 at eps 3e-4.
- ``levers``   (part 2) what grows the mismatch's effect: lr 3e-4 and 300 steps, the harder task (difficulty
  3: two-step answers, longer responses, more entropy), and the tiny Qwen3-MoE (4 experts, top-2; the router
  gate stays bf16, so routing flips come from the quantised layers before it): GRPO on bf16 and on the harshest
  grid, and DC-GRPO with ``budget=auto`` there.

    .venv/bin/python benchmarks/lab.py --quick        # 1 seed, 40 steps, 8 runs (~6 min)
    .venv/bin/python benchmarks/lab.py                # 3 seeds, every study (~2 h on 2 cores)
    .venv/bin/python benchmarks/lab.py --studies ladder,eps --seeds 3

One subprocess per (study, seed) trains its runs from the cached warm start (one vLLM engine per process,
rebuilt when the deploy format changes). Rows are cached in ``--work``/rows-*.jsonl, so an interrupted lab
resumes where it stopped. Writes ``lab.{md,json}`` and one PNG per study to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

RESULTS = Path(__file__).resolve().parent / "results"
STUDIES = ("ladder", "table2", "dual", "eps", "robust", "levers")
DEPLOYS = {  # deploy format -> rollout-engine overrides
    "bf16": ["rollout.precision=bf16"],
    "fp8_block": ["rollout.precision=fp8", "export.scheme=fp8_block"],
    "fp8_channel": ["rollout.precision=fp8", "export.scheme=fp8_channel"],
    **{g: ["rollout.precision=bf16", f"rollout.weight_grid={g}"] for g in ("int4_g128", "int4_g32", "mxfp4", "nvfp4")},
}
HARSH = "int4_g128"  # the levers' low-precision deploy: the ladder's largest discrepancy (benchmarks/results/lab.md)
DUAL = ["method.lambda_max=300", "method.dual_lr=1e5"]  # eps/robust: a lambda that can saturate where it costs


def run(method: str, deploy: str = "fp8_block", *extra: str) -> dict:
    """One training run: a method, a deploy format and extra config overrides; its key names all three."""
    return {"key": "|".join([method, deploy, *extra]), "method": method, "deploy": deploy, "extra": list(extra)}


def studies(quick: bool) -> dict[str, list[tuple[str, dict, str]]]:
    """Per study: (row label, run, label of the run it is compared with on the same seed; '' = none)."""
    if quick:
        return {
            "ladder": [(f"{m} {g}", run(m, g), f"grpo {g}" if m != "grpo" else "")
                       for g in ("bf16", "nvfp4") for m in ("grpo", "dc-grpo")],  # fmt: skip
            "eps": [("grpo", run("grpo"), ""), ("eps 1e-4", run("dc-grpo", "fp8_block", "method.budget=1e-4", *DUAL),
                     "grpo"), ("eps auto", run("dc-grpo", "fp8_block", "method.budget=auto", *DUAL), "grpo")],
            "dual": [("grpo", run("grpo"), ""), ("dual-grpo lambda 300", run("dual-grpo", "fp8_block", "method.lambda_init=300",
                                                   "method.lambda_max=300"), "grpo")],
        }  # fmt: skip
    out: dict[str, list[tuple[str, dict, str]]] = {}
    out["ladder"] = [(f"{m} {g}", run(m, g), f"grpo {g}" if m != "grpo" else "grpo bf16" if g != "bf16" else "")
                     for g in DEPLOYS for m in ("grpo", "dc-grpo")]  # fmt: skip
    out["ladder"] += [(f"dc-grpo auto {g}", run("dc-grpo", g, "method.budget=auto"), f"grpo {g}") for g in DEPLOYS]
    out["table2"] = [(f"{m} {g}", run(m, g), f"grpo {g}" if m != "grpo" else "")
                     for g in ("bf16", "fp8_block") for m in ("grpo", "dc-grpo", "tis", "mis", "icepop")]  # fmt: skip
    out["dual"] = [("grpo", run("grpo"), "")] + [
        (f"dual-grpo lambda {lam}", run("dual-grpo", "fp8_block", f"method.lambda_init={lam}", "method.lambda_max=300"),
         "grpo") for lam in (10, 100, 300)] + [("dc-grpo eps 3e-4, lambda_max 300", run("dc-grpo", "fp8_block",
                                                "method.budget=3e-4", *DUAL), "grpo")]  # fmt: skip
    out["eps"] = [("grpo", run("grpo"), "")] + [
        (f"eps {b}", run("dc-grpo", "fp8_block", f"method.budget={b}", *DUAL), "grpo")
        for b in ("1e-4", "3e-4", "5e-4", "1e-3", "auto")]  # fmt: skip
    out["robust"] = [("grpo", run("grpo"), "")] + [
        (f"lambda_init {li}", run("dc-grpo", "fp8_block", "method.budget=3e-4", *DUAL,
                                  *([f"method.lambda_init={li}"] if li else [])), "grpo") for li in (0, 10, 100)] + [
        (f"dual lr {lr}", run("dc-grpo", "fp8_block", "method.budget=3e-4", "method.lambda_max=300",
                              f"method.dual_lr={lr}"), "grpo") for lr in ("1e4", "1e6")]  # fmt: skip
    levers = []
    for name, grid, over in (
        ("lr 3e-4, 300 steps", HARSH, ("train.lr=3e-4", "train.steps_per_round=300")),
        ("difficulty 3", HARSH, ("data.synthetic_difficulty=3", "rollout.max_response_length=48")),
        ("moe", "int4_g32", ("model.arch=qwen3-moe",)),
    ):  # experts' 192 inputs: no 128-groups
        levers += [(f"{name}: grpo bf16", run("grpo", "bf16", *over), ""),
                   (f"{name}: grpo {grid}", run("grpo", grid, *over), f"{name}: grpo bf16"),
                   (f"{name}: dc-grpo auto {grid}", run("dc-grpo", grid, "method.budget=auto", *over),
                    f"{name}: grpo {grid}")]  # fmt: skip
    out["levers"] = levers
    return out


# ------------------------------------------------------------------ worker: one seed, a list of runs


def worker(args) -> None:
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.disable(logging.WARNING)
    from dcgrpo.config import load_config
    from dcgrpo.train import rl
    from dcgrpo.train.jobs import prepare_inputs

    engine, engine_key = None, None
    try:
        for r in json.loads(args.runs):
            over = [f"train.seed={args.seed}", f"rollout.seed={args.seed}", "train.rounds=1",
                    f"train.steps_per_round={args.steps}", f"train.lr={args.lr}", f"method.name={r['method']}",
                    *DEPLOYS[r["deploy"]], *r["extra"]]  # fmt: skip
            cfg = load_config(overrides=over)
            model_dir, train_path, val_path = prepare_inputs(cfg, Path(args.work))
            key = (str(model_dir), cfg.rollout.precision, cfg.rollout.weight_grid, cfg.export.scheme,
                   cfg.data.max_prompt_length + cfg.rollout.max_response_length)  # fmt: skip
            if key != engine_key:  # one engine per process: close before the next format's
                if engine is not None:
                    engine.close()
                engine, engine_key = rl.make_engine(cfg, str(model_dir)), key
            t0 = time.perf_counter()
            res = rl.train(cfg, model_dir=model_dir, train_path=train_path, val_path=val_path,
                           out_dir=Path(args.work) / "runs" / f"{_slug(r['key'])}-{args.seed}", engine=engine,
                           progress=False)  # fmt: skip
            steps = [h for h in res.history if "dc/lambda" in h]
            vals = [h["val/accuracy"] for h in res.history if "val/accuracy" in h]
            curve_keys = ("dc/lambda", "dc/discrepancy_mean", "actor/entropy", "reward/mean")
            row = {"key": r["key"], "seed": args.seed, "wall_s": time.perf_counter() - t0, "acc_start": vals[0],
                   "acc": vals[-1], "budget": res_budget(res, cfg), "steps": len(steps),
                   "curve": {k: [h[k] for h in steps] for k in curve_keys}}  # fmt: skip
            print("ROW " + json.dumps(row), flush=True)
    finally:
        if engine is not None:
            engine.close()


def _slug(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def res_budget(res, cfg) -> float | None:
    """The budget the run ended with (``auto``: the measured one, logged as ``dc/budget``)."""
    if cfg.method.budget != "auto":
        return float(cfg.method.budget)
    return [h["dc/budget"] for h in res.history if "dc/budget" in h][-1]


# ------------------------------------------------------------------ statistics (tested)


def t95(n: int) -> float:
    """Two-sided 95% Student-t quantile for n samples (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def interval(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval); the half-width is nan for one sample."""
    if len(xs) < 2:
        return mean(xs), float("nan")
    return mean(xs), t95(len(xs)) * stdev(xs) / math.sqrt(len(xs))


def paired(rows: dict[tuple[str, int], dict], key: str, ref: str, field: str = "acc") -> tuple[float, float, int]:
    """Mean and 95% half-width of ``field`` of run ``key`` minus run ``ref``, over the seeds both have."""
    seeds = sorted(s for k, s in rows if k == key and (ref, s) in rows)
    diffs = [rows[key, s][field] - rows[ref, s][field] for s in seeds]
    if not diffs:
        return float("nan"), float("nan"), 0
    return (*interval(diffs), len(diffs))


# ------------------------------------------------------------------ driver, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 40 steps, 8 runs")
    ap.add_argument("--studies", default=",".join(STUDIES))
    ap.add_argument("--seeds", type=int, help="seeds 0..n-1 (default 3; --quick 1)")
    ap.add_argument("--steps", type=int, help="RL steps per run unless a run sets its own (default 80; --quick 40)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--work", default="outputs/bench-lab", help="warm starts, runs and the row cache")
    ap.add_argument("--out", default=str(RESULTS), help="where lab.{md,json} and the PNGs go")
    ap.add_argument("--no-train", action="store_true", help="report from the cached rows only")
    ap.add_argument("--only", help="train only rows whose label contains one of these comma-separated texts")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (40 if args.quick else 80)
    plan = {k: v for k, v in studies(args.quick).items() if k in args.studies.split(",")}
    cache = Path(args.work) / f"rows-{steps}-{args.lr:g}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = (
        {(r["key"], r["seed"]): r for r in map(json.loads, cache.read_text().splitlines())} if cache.is_file() else {}
    )
    t0 = time.perf_counter()
    for study, entries in plan.items():
        for seed in range(seeds):
            wanted = [
                (label, r) for label, r, _ in entries if not args.only or any(t in label for t in args.only.split(","))
            ]
            todo = list({r["key"]: r for _, r in wanted if (r["key"], seed) not in done}.values())
            if todo and not args.no_train:
                _run_worker(study, seed, todo, steps, args, cache, done, t0)
    report(plan, done, seeds, steps, args, Path(args.out), time.perf_counter() - t0)


def _run_worker(study, seed, todo, steps, args, cache: Path, done: dict, t0: float) -> None:
    cmd = [sys.executable, __file__, "--worker", f"--seed={seed}", f"--steps={steps}", f"--lr={args.lr}",
           f"--work={args.work}", f"--runs={json.dumps(todo)}"]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                with cache.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[row["key"], seed] = row
                print(f"[{time.perf_counter() - t0:.0f} s] {study} seed {seed} {row['key']}: acc {row['acc_start']:.3f}"
                      f" -> {row['acc']:.3f} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{study} worker for seed {seed} failed (rc {proc.returncode}); rows so far are in {cache}")


def _quarter(xs: list[float], last: bool) -> float:
    n = max(len(xs) // 4, 1)
    return mean(xs[-n:] if last else xs[:n])


def study_table(entries, done: dict, seeds: int) -> list[dict]:
    """One line per row label: accuracy and its gain over the warm start (both on the deploy engine), the paired
    difference against the reference row, d, entropy and lambda at the end (means over seeds)."""
    by_label = {label: r["key"] for label, r, _ in entries}
    out = []
    for label, r, ref in entries:
        rs = [done[r["key"], s] for s in range(seeds) if (r["key"], s) in done]
        if not rs:
            continue
        c = {k: [mean(v) for v in zip(*(x["curve"][k] for x in rs), strict=True)] for k in rs[0]["curve"]}
        gains = [x["acc"] - x["acc_start"] for x in rs]
        line = {"label": label, "key": r["key"], "seeds": len(rs), "acc": interval([x["acc"] for x in rs]),
                "acc_start": mean(x["acc_start"] for x in rs), "gain": interval(gains),
                "d_first": _quarter(c["dc/discrepancy_mean"], False), "d_last": _quarter(c["dc/discrepancy_mean"], True),
                "ent_last": _quarter(c["actor/entropy"], True), "lambda_last": c["dc/lambda"][-1],
                "lambda_max_seen": max(c["dc/lambda"]), "budget": mean(x["budget"] or 0.0 for x in rs),
                "wall_s": mean(x["wall_s"] for x in rs), "curve": c, "ref": ref}  # fmt: skip
        if ref:  # across deploy formats the warm starts differ: compare gains, not end accuracies
            line["cross"] = r["deploy"] != by_label[ref].split("|")[1]
            line["vs_ref"] = (paired_gain if line["cross"] else paired)(done, r["key"], by_label[ref])
        out.append(line)
    return out


def paired_gain(done: dict, key: str, ref: str) -> tuple[float, float, int]:
    """Paired difference of the gain (acc end - acc start, each on its own deploy engine) of ``key`` and ``ref``."""
    gained = {k: {**v, "gain": v["acc"] - v["acc_start"]} for k, v in done.items() if k[0] in (key, ref)}
    return paired(gained, key, ref, "gain")


def _fmt(ci: tuple, digits: int = 3) -> str:
    m, h = ci[0], ci[1]
    return f"{m:+.{digits}f}" + ("" if h != h else f" ± {h:.{digits}f}")


def _eps(line: dict) -> str:
    """The budget of a dual-ascent row (measured, for ``auto``); blank where no budget applies."""
    if not line["key"].startswith("dc-grpo"):
        return ""
    return f"{line['budget']:.2g}" + (" (auto)" if "budget=auto" in line["key"] else "")


def report(plan, done: dict, seeds: int, steps: int, args, out: Path, wall_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tables = {study: study_table(entries, done, seeds) for study, entries in plan.items()}
    used = {(line["key"], s) for t in tables.values() for line in t for s in range(seeds) if (line["key"], s) in done}
    run_s = sum(done[k]["wall_s"] for k in used if k in done)
    cmd = "benchmarks/lab.py" + (" --quick" if args.quick else "") + f" --studies {','.join(plan)}"
    lines = [f"# Mismatch lab: tiny-cpu, {steps} steps unless a row says otherwise, lr {args.lr:g}, seeds 0-{seeds - 1}",
             "", f"`.venv/bin/python {cmd}`: {len(used)} runs, {run_s:.0f} s of training and evaluation "
             f"({wall_s:.0f} s this call, cached rows reused) on a 2-core CPU machine.", "",
             "acc: greedy accuracy on the deploy engine (256 held-out problems), mean ± 95% t-interval over seeds. "
             "gain: acc minus the warm start's acc on the same deploy engine. vs ref: paired by seed, acc minus the "
             "reference row's acc (gain minus its gain for rows on another deploy format). d: batch-mean prob_diff, "
             "first and last quarter of the steps. lambda: at the end (and the largest reached)."]  # fmt: skip
    for study, table in tables.items():
        lines += ["", f"## {study}", "", "| run | n | acc | gain | vs ref | ref | d first | d last | entropy last | "
                  "lambda end (max) | eps | s/run |", "|" + "---|" * 12]  # fmt: skip
        for t in table:
            vs = _fmt(t["vs_ref"]) + (" (gain)" if t["cross"] else "") if t["ref"] else ""
            lines.append(f"| {t['label']} | {t['seeds']} | {_fmt(t['acc'])[1:]} | {_fmt(t['gain'])} | {vs} | {t['ref']} | "
                         f"{t['d_first']:.2e} | {t['d_last']:.2e} | {t['ent_last']:.3f} | {t['lambda_last']:.3g} "
                         f"({t['lambda_max_seen']:.3g}) | {_eps(t)} | {t['wall_s']:.0f} |")  # fmt: skip
        plot_study(study, table, out / f"lab_{study}.png")
    (out / "lab.md").write_text("\n".join(lines) + "\n")
    rows = [done[k] | {"seed": k[1]} for k in sorted(used) if k in done]
    (out / "lab.json").write_text(json.dumps({"steps": steps, "lr": args.lr, "seeds": seeds, "rows": rows}))
    print("\n".join(lines))


def plot_study(study: str, table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("dc/lambda", "dc/discrepancy_mean", "actor/entropy", "reward/mean")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for t in table:
        for ax, k in zip(axes, keys, strict=True):
            ax.plot(t["curve"][k], label=t["label"], lw=1.1)
    for ax, k in zip(axes, keys, strict=True):
        ax.set_title(f"{study}: {k} (mean over seeds)")
        ax.set_xlabel("step")
    axes[1].set_yscale("log")
    axes[3].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
