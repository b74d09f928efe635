"""Routing lab (issue 26, point 3, as far as it went): how often vLLM routes a token to other experts than the trainer.

On the tiny Qwen3-MoE (4 experts, top-2, after its SFT warm start), per deploy format of the rollout engine (bf16,
FP8 block, int4 group 32) and per rollout seed: greedy accuracy on the deploy engine, then sampled rollouts whose
tokens are routed twice, by the HF fp32 trainer and by vLLM CPU (a forward hook on each layer's router, the
sequence scored alone so the hook's rows are its positions). A token is *routed differently* when, at the position
that produced it, some layer's top-k set differs between the engines; d = |p_train - p_inf| of that token.

    .venv/bin/python benchmarks/routing.py --seeds 3 --sft-steps 600      # resumable: rows cached in --work
    .venv/bin/python benchmarks/routing.py --no-run                       # the report from the cached rows

Not measured here: GRPO / DC-GRPO training on the MoE (SCIENCE.md, section 6, says why).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness import (
    RowCache,
    Stopwatch,
    add_worker_args,
    emit_row,
    figure,
    fill_cache,
    interval,
    md_table,
    quiet_worker,
    write_report,
)

RESULTS = Path(__file__).resolve().parent / "results"
DEPLOYS = {
    "bf16": ["rollout.precision=bf16"],
    "fp8_block": ["rollout.precision=fp8", "export.scheme=fp8_block"],
    "int4_g32": ["rollout.precision=bf16", "rollout.weight_grid=int4_g32"],
}
FIELDS = ("acc", "flip_token", "flip_layer", "d_same", "d_flip", "d_all", "p99_same", "p99_flip")


def _install_router_hooks(worker) -> int:
    """Worker side: record every router's logits (one call per layer per forward) on ``worker._routing``."""
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    worker._routing = []
    gates = [m for m in worker.model_runner.model.modules() if isinstance(m, GateLinear)]
    for m in gates:
        m.register_forward_hook(lambda mod, inp, out: worker._routing.append(_logits(out).float().clone()))
    return len(gates)


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _pop_routing(worker) -> list:
    out, worker._routing = worker._routing, []
    return out


def vllm_topk(engine, ids: list[int], k: int):
    """(positions, layers, k) top-k experts vLLM routes ``ids`` to, scored as one prefill (no prefix cache)."""
    import torch
    from vllm import SamplingParams

    engine.llm.reset_prefix_cache()
    engine.llm.collective_rpc(_pop_routing)
    engine.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    logits = engine.llm.collective_rpc(_pop_routing)[0]
    prefill = [x for x in logits if x.shape[0] == len(ids)]  # max_tokens=1: one forward, one call per layer
    if len(prefill) != len(logits) or not prefill:
        raise RuntimeError(f"router calls of {[tuple(x.shape) for x in logits]} rows for a {len(ids)}-token prefill")
    return torch.stack([x.topk(k, dim=-1).indices.sort(-1).values for x in prefill], 1)


def hf_routing(policy, batch):
    """log p_train (B, T) and HF's top-k experts (B, L, layers, k) of a TokenBatch (hooks on each router)."""
    import torch

    captured = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out[2]))
             for n, m in policy.model.named_modules() if n.endswith("mlp.gate")]  # fmt: skip
    with torch.no_grad():
        logp, _ = policy.logprobs(batch)
    for h in hooks:
        h.remove()
    B, L = batch.input_ids.shape
    return logp, torch.stack([c.reshape(B, L, -1).sort(-1).values for c in captured], 2)


def measure(cfg, model_dir, val_rows, prompts_n: int, group: int) -> dict:
    """One deploy format: greedy accuracy, then routing and d on sampled rollouts."""
    import torch

    from dcgrpo.engines.hf_engine import HFEngine
    from dcgrpo.engines.vllm_engine import apply_chat_template
    from dcgrpo.train import rl

    T, k = cfg.rollout.max_response_length, cfg.model.num_experts_per_tok
    policy = HFEngine(str(model_dir), "fp32")
    with rl.make_engine(cfg, str(model_dir)) as engine:
        acc = rl.heldout_accuracy(engine, val_rows, T)
        engine.llm.collective_rpc(_install_router_hooks)
        prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in val_rows[:prompts_n]]
        gens = [g for grp in engine.generate(prompts, n=group, temperature=1.0, top_p=1.0, max_tokens=T) for g in grp]
        batch = policy.token_batch([g.prompt_token_ids for g in gens], [g.token_ids for g in gens], T)
        logp_train, hf_top = hf_routing(policy, batch)
        d_same, d_flip, flip_layer = [], [], []
        for i, g in enumerate(gens):
            ids, P = g.prompt_token_ids + g.token_ids, len(g.prompt_token_ids)
            v_top = vllm_topk(engine, ids[:-1], k)  # the positions that produced each response token
            pos = torch.arange(P - 1, P - 1 + len(g.token_ids))
            differs = (v_top[pos] != hf_top[i, pos]).any(-1)  # (T_i, layers)
            d = (logp_train[i, : len(g.token_ids)].exp() - torch.tensor(g.logprobs).exp()).abs()
            flip_layer += differs.float().mean(-1).tolist()
            for flipped, dt in zip(differs.any(-1).tolist(), d.tolist(), strict=True):
                (d_flip if flipped else d_same).append(dt)
    q = lambda xs: float(torch.tensor(xs).quantile(0.99)) if xs else float("nan")  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    n = len(d_same) + len(d_flip)
    return {"acc": acc, "tokens": n, "flip_token": len(d_flip) / n, "flip_layer": mean(flip_layer),
            "d_same": mean(d_same), "d_flip": mean(d_flip), "d_all": mean(d_same + d_flip),
            "p99_same": q(d_same), "p99_flip": q(d_flip)}  # fmt: skip


def worker(args) -> None:
    quiet_worker()
    import time

    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.stages.model import prepare_inputs

    for r in json.loads(args.runs):
        over = ["model.arch=qwen3-moe", f"model.sft_steps={args.sft_steps}", f"rollout.seed={args.seed}",
                *DEPLOYS[r["key"]]]  # fmt: skip
        cfg = load_config(overrides=over)
        model_dir, _, val_path = prepare_inputs(cfg, args.work)  # warm start cached, shared by seeds and formats
        t0 = time.perf_counter()
        row = measure(cfg, model_dir, read_rows(val_path)[: args.val], args.prompts, args.group)
        emit_row({"key": r["key"], "seed": args.seed, "wall_s": time.perf_counter() - t0, **row})


def _interval(rows: list[dict], field: str) -> tuple[float, float]:
    """Mean and 95% half-width over the seeds that have ``field`` (a seed without a flipped token has no d_flip)."""
    xs = [r[field] for r in rows if r[field] == r[field]]
    return interval(xs) if xs else (float("nan"), float("nan"))


def report(cache: RowCache, out: Path) -> None:
    rows = list(cache.rows.values())
    table = []
    for deploy in DEPLOYS:
        rs = [r for r in rows if r["key"] == deploy]
        if not rs:
            continue
        cells = [f"{m:.3g} ± {h:.2g}" for m, h in (_interval(rs, f) for f in FIELDS)]
        table.append([deploy, str(len(rs)), str(sum(r["tokens"] for r in rs)), *cells])
    md = md_table(["deploy", "seeds", "tokens", *FIELDS], table) + "\n"
    write_report(out, "routing", md, {"rows": rows})
    with figure(out / "routing.png", 1, 2, (10, 3.6)) as (_, axes):
        names = [t[0] for t in table]
        for ax, fields, title in ((axes[0], ("flip_token", "flip_layer"), "routing flips (fraction)"),
                                  (axes[1], ("d_same", "d_flip"), "mean d = |p_train - p_inf|")):  # fmt: skip
            for j, f in enumerate(fields):
                ms = [_interval([r for r in rows if r["key"] == n], f) for n in names]
                ax.bar([i + 0.4 * j for i in range(len(names))], [m for m, _ in ms], 0.4, label=f,
                       yerr=[h if h == h else 0 for _, h in ms])  # fmt: skip
            ax.set_xticks([i + 0.2 for i in range(len(names))], names)
            ax.set_title(title)
            ax.legend()
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--val", type=int, default=256, help="held-out problems for greedy accuracy")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--work", default="outputs/bench-routing")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-run", action="store_true")
    add_worker_args(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cache = RowCache(Path(args.work) / f"rows-sft{args.sft_steps}.jsonl", key=lambda r: (r["key"], r["seed"]))
    clock = Stopwatch()
    if not args.no_run:
        argv = [f"--sft-steps={args.sft_steps}", f"--val={args.val}", f"--prompts={args.prompts}",
                f"--group={args.group}", f"--work={args.work}"]  # fmt: skip
        for seed in range(args.seeds):
            fill_cache(cache, __file__, seed, [{"key": d} for d in DEPLOYS], lambda r: r["key"], argv, "routing")
            clock.say(f"seed {seed} done")
    report(cache, Path(args.out))


if __name__ == "__main__":
    main()
