"""Reward self-check over every row of the six benchmarks.

For each row: a model-style completion ending in the reference answer
(``... so the answer is \\boxed{<answer>}``) should score 1, and one ending in
a perturbed wrong answer (``dcgrpo.reward.perturb_answer``) should score 0.
Prints a results table (rate per benchmark, wall time) and the failing rows.

    .venv/bin/python benchmarks/reward_sweep.py [--benchmark-dir DIR] [--workers N] [--sample N]
"""

from __future__ import annotations

import argparse
import random
import time


def completion(answer: str) -> str:
    return f"Let me work through this step by step. ... so the answer is \\boxed{{{answer}}}"


def sweep(bench_dir, names, workers: int, sample: int | None = None, seed: int = 0):
    """``{name: {"rows", "ref_ok", "pert_ok", "ref_fail": [...], "pert_fail": [...], "seconds"}}``."""
    from dcgrpo import reward
    from dcgrpo.config import RewardConfig
    from dcgrpo.data.benchmarks import load_benchmark

    cfg = RewardConfig(num_workers=workers)
    reward.get_pool(workers)  # start workers outside the timed part
    out = {}
    for name in names:
        rows = load_benchmark(name, bench_dir)
        if sample is not None and sample < len(rows):
            rows = random.Random(seed).sample(rows, sample)
        t0 = time.perf_counter()
        gts = [r["answer"] for r in rows]
        ref = reward.score_batch([completion(a) for a in gts], gts, cfg)
        perturbed = [reward.perturb_answer(a) for a in gts]
        pert = reward.score_batch([completion(p) for p in perturbed], gts, cfg)
        out[name] = {
            "rows": len(rows),
            "ref_ok": sum(s == 1.0 for s in ref),
            "pert_ok": sum(s == 0.0 for s in pert),
            "ref_fail": [(r["id"], r["answer"]) for r, s in zip(rows, ref, strict=True) if s != 1.0],
            "pert_fail": [(r["id"], r["answer"], p) for r, p, s in zip(rows, perturbed, pert, strict=True) if s != 0.0],
            "seconds": time.perf_counter() - t0,
        }
    return out


def main() -> None:
    from dcgrpo.data.benchmarks import BENCHMARKS, default_benchmark_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark-dir", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample", type=int, default=None, help="rows per benchmark (default: all)")
    args = ap.parse_args()
    bench_dir = args.benchmark_dir or default_benchmark_dir()
    res = sweep(bench_dir, list(BENCHMARKS), args.workers, args.sample)
    print("| benchmark | rows | reference scores 1 | perturbed scores 0 | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, r in res.items():
        n = r["rows"]
        print(
            f"| {name} | {n} | {r['ref_ok']}/{n} ({100 * r['ref_ok'] / n:.1f}%) "
            f"| {r['pert_ok']}/{n} ({100 * r['pert_ok'] / n:.1f}%) | {r['seconds']:.1f} |"
        )
    for name, r in res.items():
        for rid, ans in r["ref_fail"]:
            print(f"reference not 1: {name} {rid}: {ans!r}")
        for rid, ans, p in r["pert_fail"]:
            print(f"perturbed not 0: {name} {rid}: {ans!r} -> {p!r}")


if __name__ == "__main__":
    main()
