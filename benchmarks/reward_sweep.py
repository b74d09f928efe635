"""Reward self-check over every row of the six benchmarks.

For each row: a model-style completion ending in the reference answer
(``... so the answer is \\boxed{<answer>}``) should score 1, and one ending in
a perturbed wrong answer (``perturb_answer`` below) should score 0.
Prints a results table (rate per benchmark, wall time) and the failing rows.

    .venv/bin/python benchmarks/reward_sweep.py [--benchmark-dir DIR] [--workers N] [--sample N]
"""

from __future__ import annotations

import argparse
import random
import re
import time


def perturb_answer(answer: str) -> str:
    """A wrong variant of ``answer`` (a wrong value, not a wrong notation): for this sweep and tests/test_reward.py.

    The first number that is not a subscript or exponent (``52_8`` is a base,
    ``cm^2`` a unit) is increased by one; else the last number; else the next
    choice letter; else ``+1`` is appended.
    ``"\\frac{\\pi}{2}" -> "\\frac{\\pi}{3}"``, ``"52_8" -> "53_8"``, ``"\\text{(C)}" -> "\\text{(D)}"``.
    """
    runs = list(re.finditer(r"\d+", answer))
    if runs:
        main = [m for m in runs if not re.search(r"[_^]\{?$", answer[: m.start()])]
        m = main[0] if main else runs[-1]
        return answer[: m.start()] + str(int(m.group(0)) + 1) + answer[m.end() :]
    letter = re.search(r"\(([A-E])\)|^([A-E])$", answer)
    if letter:
        g = 1 if letter.group(1) else 2
        return answer[: letter.start(g)] + chr(ord(letter.group(g)) + 1) + answer[letter.end(g) :]
    return f"{answer}+1"


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
        perturbed = [perturb_answer(a) for a in gts]
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
    from dcgrpo.data.benchmarks import BENCHMARKS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmark-dir", default="hub", help="hub (default: the full sets), samples, or a directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sample", type=int, default=None, help="rows per benchmark (default: all)")
    args = ap.parse_args()
    bench_dir = args.benchmark_dir
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
