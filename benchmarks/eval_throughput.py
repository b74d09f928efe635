"""`dcgrpo evaluate` wall time and tokens/s on the tiny model (CPU vLLM), real benchmark files.

    .venv/bin/python benchmarks/eval_throughput.py [--benchmarks aime24,math500] [--max-problems 64] [--k 4]

Builds the tiny Qwen3, runs ``dcgrpo.evaluate.evaluate`` (sampled avg@k + greedy
pass@1, no MLflow) and prints the results table with wall time and tokens/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    from dcgrpo.config import RunConfig
    from dcgrpo.evaluate import evaluate
    from dcgrpo.models import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", default="aime24,math500")
    ap.add_argument("--max-problems", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-prompts", type=int, default=64)
    ap.add_argument("--benchmark-dir", default="hub", help="hub (default: the full sets), samples, or a directory")
    args = ap.parse_args()
    cfg = RunConfig()
    cfg.eval.max_problems, cfg.eval.default_k = args.max_problems, args.k
    cfg.eval.max_tokens, cfg.eval.batch_prompts = args.max_tokens, args.batch_prompts
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(cfg.model, f"{tmp}/model")
        t = time.perf_counter()
        report = evaluate(str(model), cfg, f"{tmp}/out", benchmarks=args.benchmarks.split(","),
                          benchmark_dir=args.benchmark_dir, progress=False)  # fmt: skip
        total = time.perf_counter() - t
    print(report.markdown(), end="")
    print(f"evaluate() total incl. engine start: {total:.1f}s")


if __name__ == "__main__":
    main()
