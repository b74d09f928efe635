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
    interval,
    md_table,
    mean_curves,
    paired,
    plot_curves,
    quarter_mean,
    quiet_worker,
    step_curves,
    val_accuracies,
    write_report,
)

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
CURVES = ("dc/lambda", "dc/discrepancy_mean", "actor/entropy", "reward/mean")  # per step, in each row and plot


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
    quiet_worker()
    from dcgrpo.config import load_config

    with EnginePool(args.work) as pool:
        for r in json.loads(args.runs):
            over = [f"train.seed={args.seed}", f"rollout.seed={args.seed}", "train.rounds=1",
                    f"train.steps_per_round={args.steps}", f"train.lr={args.lr}", f"method.name={r['method']}",
                    *DEPLOYS[r["deploy"]], *r["extra"]]  # fmt: skip
            cfg = load_config(overrides=over)
            res, wall_s = pool.train(cfg, f"{_slug(r['key'])}-{args.seed}")
            vals = val_accuracies(res.history)
            curve = step_curves(res.history, CURVES)
            emit_row({"key": r["key"], "seed": args.seed, "wall_s": wall_s, "acc_start": vals[0], "acc": vals[-1],
                      "budget": res_budget(res, cfg), "steps": len(curve["dc/lambda"]), "curve": curve})  # fmt: skip


def _slug(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def res_budget(res, cfg) -> float | None:
    """The budget the run ended with (``auto``: the measured one, logged as ``dc/budget``)."""
    if cfg.method.budget != "auto":
        return float(cfg.method.budget)
    return [h["dc/budget"] for h in res.history if "dc/budget" in h][-1]


# ------------------------------------------------------------------ driver


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
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (40 if args.quick else 80)
    plan = {k: v for k, v in studies(args.quick).items() if k in args.studies.split(",")}
    cache = RowCache(Path(args.work) / f"rows-{steps}-{args.lr:g}.jsonl", key=lambda row: (row["key"], row["seed"]))
    clock = Stopwatch()
    for study, entries in plan.items():
        wanted = [r for label, r, _ in entries if not args.only or any(t in label for t in args.only.split(","))]
        for seed in range(seeds):
            if not args.no_train:
                fill_cache(cache, __file__, seed, wanted, lambda r: r["key"],
                           [f"--steps={steps}", f"--lr={args.lr}", f"--work={args.work}"], f"{study} worker",
                           lambda row, study=study: _progress(clock, study, row))  # fmt: skip
    report(plan, cache.rows, seeds, steps, args, Path(args.out), clock.elapsed)


def _progress(clock: Stopwatch, study: str, row: dict) -> None:
    clock.say(f"{study} seed {row['seed']} {row['key']}: acc {row['acc_start']:.3f} -> {row['acc']:.3f} "
              f"({row['wall_s']:.0f} s)")  # fmt: skip


# ------------------------------------------------------------------ report


def study_table(entries, done: dict, seeds: int) -> list[dict]:
    """One line per row label: accuracy and its gain over the warm start (both on the deploy engine), the paired
    difference against the reference row, d, entropy and lambda at the end (means over seeds)."""
    by_label = {label: r["key"] for label, r, _ in entries}
    out = []
    for label, r, ref in entries:
        rs = [done[r["key"], s] for s in range(seeds) if (r["key"], s) in done]
        if not rs:
            continue
        c = mean_curves(rs)
        gains = [x["acc"] - x["acc_start"] for x in rs]
        line = {"label": label, "key": r["key"], "seeds": len(rs), "acc": interval([x["acc"] for x in rs]),
                "acc_start": mean(x["acc_start"] for x in rs), "gain": interval(gains),
                "d_first": quarter_mean(c["dc/discrepancy_mean"], False),
                "d_last": quarter_mean(c["dc/discrepancy_mean"], True),
                "ent_last": quarter_mean(c["actor/entropy"], True), "lambda_last": c["dc/lambda"][-1],
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


TABLE_HEADER = ["run", "n", "acc", "gain", "vs ref", "ref", "d first", "d last", "entropy last", "lambda end (max)",
                "eps", "s/run"]  # fmt: skip


def table_cells(t: dict) -> list[str]:
    """One line of a study's table (``study_table``), formatted."""
    vs = _fmt(t["vs_ref"]) + (" (gain)" if t["cross"] else "") if t["ref"] else ""
    return [t["label"], str(t["seeds"]), _fmt(t["acc"])[1:], _fmt(t["gain"]), vs, t["ref"], f"{t['d_first']:.2e}",
            f"{t['d_last']:.2e}", f"{t['ent_last']:.3f}", f"{t['lambda_last']:.3g} ({t['lambda_max_seen']:.3g})",
            _eps(t), f"{t['wall_s']:.0f}"]  # fmt: skip


def report(plan, done: dict, seeds: int, steps: int, args, out: Path, wall_s: float) -> None:
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
        lines += ["", f"## {study}", "", md_table(TABLE_HEADER, [table_cells(t) for t in table])]
        with figure(out / f"lab_{study}.png", 1, 4, (18, 4), dpi=100) as (_, axes):
            plot_curves(axes, [(t["label"], t["curve"], {"lw": 1.1}) for t in table], CURVES,
                        lambda k, study=study: f"{study}: {k} (mean over seeds)", 1, 3, 6)  # fmt: skip
    rows = [done[k] | {"seed": k[1]} for k in sorted(used) if k in done]
    write_report(out, "lab", "\n".join(lines) + "\n", {"steps": steps, "lr": args.lr, "seeds": seeds, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
