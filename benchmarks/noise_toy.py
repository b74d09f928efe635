"""Issue 28, part 1: why a strong ``A - lambda * d_t`` penalty raises d, on a toy where both engines' full
distributions are known.

Two explanations fit the lab's numbers (SCIENCE.md section 1):

- **drift** (per token): the penalty's *expected* gradient, ``-lambda * sum_a q(a) d(a) grad log p(a)``, moves
  mass toward tokens with a small d. For a peaked state the top token carries the largest d (d is about
  p(1-p) x the logit error), so the signal itself flattens the distribution and raises d and entropy.
- **noise** (per batch): the penalty's gradient is mostly zero-mean sampling noise; Adam rescales every
  coordinate to a step of about lr, so the noise becomes a random walk of the logits that flattens them.

The toy: a contextual bandit of S prompts x L answer positions over a vocabulary of V tokens. The policy is a
small MLP (shared weights, as in a real model) whose logits at (prompt, position) are softmaxed; the deploy engine
runs the *same* weights rounded to FP8 e4m3 (per-tensor scale) and samples the rollouts. Reward 1 if all L tokens
are right; GRPO advantage over G responses per prompt; token-mean policy-gradient loss (one update per batch, so
PPO's ratio is 1). Every d is exact: both engines' full distributions are in hand.

Penalty modes (the term ``lambda * d_t * log p(a_t)`` added to the loss):

- ``sampled``   the paper's form on the sampled tokens (Dual-GRPO, fixed lambda);
- ``expected``  its expectation over the deploy engine's sampling at the same state,
                ``lambda * sum_a q(a) d(a) log p(a)`` (signal only, no sampling noise);
- ``noise``     sampled minus expected (the zero-mean part only).

    .venv/bin/python benchmarks/noise_toy.py            # SNR + 4 modes x 4 lambdas x Adam/SGD x 3 seeds
    .venv/bin/python benchmarks/noise_toy.py --quick    # 1 seed, fewer steps

Writes ``benchmarks/results/noise_toy.{json,md,png}``. Pure torch, single thread.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import torch
from harness import interval

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("grpo", "sampled", "expected", "noise", "baseline", "sequence")
LAMBDAS = (10.0, 100.0, 300.0)


@dataclass(frozen=True)
class Toy:
    prompts: int = 128
    length: int = 4
    vocab: int = 32
    dim: int = 32
    hidden: int = 64
    batch_prompts: int = 8
    group: int = 8
    sft_steps: int = 800
    hard: float = 0.2
    deploy: str = "bf16"
    sft_lr: float = 3e-3


class Policy(torch.nn.Module):
    """logits(prompt, position) = W2 tanh(W1 (E[prompt] + P[position]))."""

    def __init__(self, toy: Toy) -> None:
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(toy.prompts, toy.dim) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(toy.length, toy.dim) * 0.5)
        self.w1 = torch.nn.Linear(toy.dim, toy.hidden)
        self.w2 = torch.nn.Linear(toy.hidden, toy.vocab)

    def forward(self, prompts: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """(N,) prompt ids -> (N, L, V) logits; ``params`` overrides the weights (the deploy engine's copy)."""
        p = params or dict(self.named_parameters())
        x = p["emb"][prompts].unsqueeze(1) + p["pos"].unsqueeze(0)  # (N, L, D)
        h = torch.tanh(x @ p["w1.weight"].T + p["w1.bias"])
        return h @ p["w2.weight"].T + p["w2.bias"]


def deploy_copy(model: Policy, fmt: str = "bf16") -> dict[str, torch.Tensor]:
    """The deploy engine's weights: each tensor rounded to bf16, or to FP8 e4m3 with a per-tensor scale."""
    out = {}
    for name, w in model.named_parameters():
        w = w.detach()
        if fmt == "bf16":
            out[name] = w.to(torch.bfloat16).to(torch.float32)
            continue
        scale = w.abs().max().clamp(min=1e-12) / 448.0
        out[name] = (w / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return out


def warm_start(toy: Toy, seed: int) -> tuple[Policy, torch.Tensor]:
    """A policy after SFT on noisy labels: at a ``hard`` share of the (prompt, position) states the label is a
    distractor with probability U(0.3, 0.7), so the warm start is peaked on most states and unsure (or wrong)
    on the rest, which RL can then fix."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = (toy.prompts, toy.length)
    target = torch.randint(0, toy.vocab, shape, generator=g)
    distractor = (target + torch.randint(1, toy.vocab, shape, generator=g)) % toy.vocab
    noise = torch.where(torch.rand(shape, generator=g) < toy.hard, 0.3 + 0.4 * torch.rand(shape, generator=g), 0.0)
    model = Policy(toy)
    opt = torch.optim.Adam(model.parameters(), lr=toy.sft_lr)
    for _ in range(toy.sft_steps):
        idx = torch.randint(0, toy.prompts, (32,), generator=g)
        flip = torch.rand(idx.shape[0], toy.length, generator=g) < noise[idx]
        label = torch.where(flip, distractor[idx], target[idx])
        loss = torch.nn.functional.cross_entropy(model(idx).reshape(-1, toy.vocab), label.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, target


@dataclass
class Batch:
    prompts: torch.Tensor  # (N,) one row per response
    groups: torch.Tensor  # (N,) group id
    tokens: torch.Tensor  # (N, L) sampled by the deploy engine
    reward: torch.Tensor  # (N,)
    q: torch.Tensor  # (N, L, V) deploy distribution
    p: torch.Tensor  # (N, L, V) trainer distribution (detached)


def rollout(model: Policy, target: torch.Tensor, toy: Toy, g: torch.Generator) -> Batch:
    prompts = torch.randint(0, toy.prompts, (toy.batch_prompts,), generator=g).repeat_interleave(toy.group)
    groups = torch.arange(toy.batch_prompts).repeat_interleave(toy.group)
    with torch.no_grad():
        q = torch.softmax(model(prompts, deploy_copy(model, toy.deploy)), -1)
        p = torch.softmax(model(prompts), -1)
    tokens = torch.multinomial(q.reshape(-1, toy.vocab), 1, generator=g).reshape(q.shape[:2])
    reward = (tokens == target[prompts]).all(-1).float()
    return Batch(prompts, groups, tokens, reward, q, p)


def loss_terms(model: Policy, b: Batch) -> dict[str, torch.Tensor]:
    """The reward loss and each penalty form's loss, per unit lambda, token-mean (d and q detached)."""
    from dcgrpo.algorithm.advantage import grpo_advantage
    from dcgrpo.algorithm.penalty import group_baseline_penalty, sequence_penalty

    logp_all = torch.log_softmax(model(b.prompts), -1)  # (N, L, V)
    logp = logp_all.gather(-1, b.tokens.unsqueeze(-1)).squeeze(-1)  # (N, L)
    d_all = (b.p - b.q).abs()  # (N, L, V) every token's discrepancy at this state
    d = d_all.gather(-1, b.tokens.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones_like(d)
    adv = grpo_advantage(b.reward, b.groups).unsqueeze(-1)  # (N, 1)
    sampled = (d * logp).mean()
    expected = (b.q * d_all * logp_all).sum(-1).mean()
    return {"grpo": -(adv * logp).mean(), "sampled": sampled, "expected": expected, "noise": sampled - expected,
            "baseline": (group_baseline_penalty(d, mask, b.groups) * logp).mean(),
            "sequence": (sequence_penalty(d, mask) * logp).mean()}  # fmt: skip


@torch.no_grad()
def evaluate(model: Policy, target: torch.Tensor, toy: Toy) -> dict[str, float]:
    """Over every (prompt, position): greedy accuracy on the deploy engine (all L right), expected d under the
    deploy engine's sampling, the trainer's entropy and its top-token probability."""
    prompts = torch.arange(toy.prompts)
    q = torch.softmax(model(prompts, deploy_copy(model, toy.deploy)), -1)
    p = torch.softmax(model(prompts), -1)
    acc = (q.argmax(-1) == target).all(-1).float().mean()
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    d_exp = (q * (p - q).abs()).sum(-1).mean()
    return {"acc": float(acc), "d": float(d_exp), "entropy": float(ent), "p_top": float(p.max(-1).values.mean())}


def grad_vector(model: Policy, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return torch.cat([x.reshape(-1) for x in grads])


# ------------------------------------------------------------------ measurement 1: signal and noise of the gradients


def snr(model: Policy, target: torch.Tensor, toy: Toy, batches: int, seed: int) -> dict[str, float]:
    """The reward term's and the penalty term's (lambda 1) gradients over many batches: the norm of their mean
    (signal) against the per-batch spread (noise); the penalty's spread split into its token-sampling part (sampled
    minus the exact expectation at the same states) and the rest; the first-order change of the deploy-sampled d
    and of the entropy along the penalty's mean gradient."""
    g = torch.Generator().manual_seed(10_000 + seed)
    gr, gs, ge, gb = [], [], [], []
    for _ in range(batches):
        b = rollout(model, target, toy, g)
        terms = loss_terms(model, b)
        gr.append(grad_vector(model, terms["grpo"]))
        gs.append(grad_vector(model, terms["sampled"]))
        ge.append(grad_vector(model, terms["expected"]))
        gb.append(grad_vector(model, terms["baseline"]))
    gr, gs, ge, gb = torch.stack(gr), torch.stack(gs), torch.stack(ge), torch.stack(gb)

    def spread(x: torch.Tensor, centre: torch.Tensor) -> float:
        return float((x - centre).norm(dim=1).pow(2).mean().sqrt())

    out = {"reward_signal": float(gr.mean(0).norm()), "reward_noise": spread(gr, gr.mean(0)),
           "pen_signal": float(ge.mean(0).norm()), "pen_signal_sampled": float(gs.mean(0).norm()),
           "pen_noise": spread(gs, gs.mean(0)), "pen_noise_tokens": spread(gs - ge, 0.0),
           "baseline_signal": float(gb.mean(0).norm()), "baseline_noise": spread(gb, gb.mean(0)),
           "cos_pen_reward": float(torch.cosine_similarity(ge.mean(0), gr.mean(0), dim=0))}  # fmt: skip
    out["pen_snr"] = out["pen_signal"] / out["pen_noise"]
    out["reward_snr"] = out["reward_signal"] / out["reward_noise"]
    out |= {f"dir_{k}": v for k, v in directional(model, target, toy, ge.mean(0)).items()}
    return out | token_profile(model, toy)


def directional(model: Policy, target: torch.Tensor, toy: Toy, grad: torch.Tensor, step: float = 0.05) -> dict:
    """Change of d and entropy after a descent step of length ``step`` along ``-grad`` (as plain SGD would take)."""
    before = evaluate(model, target, toy)
    saved = [p.detach().clone() for p in model.parameters()]
    unit, offset = grad / grad.norm().clamp(min=1e-30), 0
    with torch.no_grad():
        for p in model.parameters():
            p -= step * unit[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    after = evaluate(model, target, toy)
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved, strict=True):
            p.copy_(s)
    return {"d_change": after["d"] / before["d"] - 1, "entropy_change": after["entropy"] / before["entropy"] - 1}


# ------------------------------------------------------------------ measurement 2: training runs


def train(toy: Toy, seed: int, mode: str, lam: float, opt_name: str, steps: int, lr: float) -> tuple[dict, Policy]:
    """GRPO + ``lam`` x the penalty in ``mode`` from the seed's warm start; curves of d, entropy and accuracy."""
    model, target = warm_start(toy, seed)
    opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1_000 + seed)  # the same rollout stream for every mode on this seed
    curve = [evaluate(model, target, toy)]
    every = max(steps // 20, 1)
    for step in range(1, steps + 1):
        b = rollout(model, target, toy, g)
        terms = loss_terms(model, b)
        loss = terms["grpo"] + (lam * terms[mode] if mode != "grpo" else 0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % every == 0:
            curve.append(evaluate(model, target, toy))
    row = {"mode": mode, "lam": lam, "opt": opt_name, "seed": seed, "steps": steps, "lr": lr, "start": curve[0],
           "end": curve[-1], "curve": curve}  # fmt: skip
    return row, model


def token_profile(model: Policy, toy: Toy) -> dict[str, float]:
    """How d spreads over the vocabulary at each state: the top token's share of sum_a d(a), and sum_a q(a) d(a)."""
    with torch.no_grad():
        prompts = torch.arange(toy.prompts)
        q = torch.softmax(model(prompts, deploy_copy(model, toy.deploy)), -1)
        p = torch.softmax(model(prompts), -1)
        d = (p - q).abs()
        top = p.argmax(-1, keepdim=True)
        share = d.gather(-1, top).squeeze(-1) / d.sum(-1).clamp(min=1e-30)
        below = (d < d.gather(-1, top)).float().mean(-1)  # fraction of tokens with a smaller d than the top token
    return {"top_share_of_d": float(share.mean()), "tokens_below_top_d": float(below.mean())}


# ------------------------------------------------------------------ driver, report


def run_all(args, toy: Toy) -> dict:
    opts = {"adam": args.adam_lr, "sgd": args.sgd_lr}
    rows, snrs = [], []
    for seed in range(args.seeds):
        model, target = warm_start(toy, seed)
        snrs.append({"seed": seed, "at": "warm start", "lam": 0.0, **snr(model, target, toy, args.batches, seed)})
        for opt_name, lr in opts.items():
            row, _ = train(toy, seed, "grpo", 0.0, opt_name, args.steps, lr)
            rows.append(row)
            for lam in args.lambdas:
                for mode in MODES[1:]:
                    t0 = time.perf_counter()
                    row, model = train(toy, seed, mode, lam, opt_name, args.steps, lr)
                    rows.append({**row, "wall_s": time.perf_counter() - t0})
                    if mode == "sampled" and opt_name == "adam":
                        at = f"after Adam, sampled, lambda {lam:g}"
                        snrs.append({"seed": seed, "at": at, "lam": lam, **snr(model, target, toy, args.batches, seed)})
            print(f"seed {seed} {opt_name} done", flush=True)
    return {"toy": toy.__dict__, "args": vars(args), "rows": rows, "snr": snrs}


def _cell(rows: list[dict], ref: dict, field: str, fmt: str) -> str:
    """'mean ± hw (diff vs GRPO ± hw, n higher)' over seeds, paired by seed with the GRPO run of that optimiser."""
    m, hw = interval([r["end"][field] for r in rows])
    diffs = [r["end"][field] - ref[r["seed"]]["end"][field] for r in rows]
    dm, dhw = interval(diffs)
    up = sum(x > 0 for x in diffs)
    return f"{m:{fmt}} ({dm:+{fmt}} ± {dhw:{fmt}}, {up}/{len(diffs)} up)"


def report(res: dict, out: Path) -> str:
    rows, a = res["rows"], res["args"]
    lines = [f"# Noise toy: {a['seeds']} seeds, {a['steps']} steps, Adam lr {a['adam_lr']:g}, SGD lr {a['sgd_lr']:g}",
             "", f"Toy: {res['toy']}", "", "## Training runs: end of run, mean ± 95% half-width over seeds; in "
             "brackets the paired difference from GRPO with the same optimiser and seed, and on how many seeds it is "
             "higher.", ""]  # fmt: skip
    for opt_name in ("adam", "sgd"):
        ref = {r["seed"]: r for r in rows if r["opt"] == opt_name and r["mode"] == "grpo"}
        g = list(ref.values())
        lines += [f"### {opt_name}", "", "| mode | lambda | acc (deploy, greedy) | d (deploy-sampled) | entropy |",
                  "|---|---|---|---|---|", f"| warm start | | {mean(r['start']['acc'] for r in g):.3f} | "
                  f"{mean(r['start']['d'] for r in g):.2e} | {mean(r['start']['entropy'] for r in g):.3f} |",
                  f"| grpo | 0 | {interval([r['end']['acc'] for r in g])[0]:.3f} | "
                  f"{interval([r['end']['d'] for r in g])[0]:.2e} | {interval([r['end']['entropy'] for r in g])[0]:.3f} |"]  # fmt: skip
        for lam in a["lambdas"]:
            for mode in MODES[1:]:
                sel = [r for r in rows if r["opt"] == opt_name and r["mode"] == mode and r["lam"] == lam]
                lines.append(f"| {mode} | {lam:g} | {_cell(sel, ref, 'acc', '.3f')} | {_cell(sel, ref, 'd', '.2e')} | "
                             f"{_cell(sel, ref, 'entropy', '.3f')} |")  # fmt: skip
        lines.append("")
    lines += snr_table(res["snr"])
    text = "\n".join(lines) + "\n"
    (out / "noise_toy.md").write_text(text)
    (out / "noise_toy.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "noise_toy.png")
    return text


def snr_table(snrs: list[dict]) -> list[str]:
    lines = ["## Gradients: signal (norm of the mean over batches) and noise (per-batch spread), mean over seeds",
             "", "Penalty at lambda 1; multiply by lambda to compare with the reward term. d / entropy change: "
             "relative change after an SGD step of length 0.05 along the penalty's mean (expected) gradient.", "",
             "| policy | reward signal | reward noise | penalty signal | penalty noise | of it, token sampling | "
             "penalty SNR | baseline-penalty noise | cos(penalty, reward) | d change | entropy change | "
             "top token's share of sum_a d(a) | share of tokens with d below the top token's | "
             "lambda where penalty noise = reward signal | ... = reward noise |", "|" + "---|" * 15]  # fmt: skip
    for at in dict.fromkeys(s["at"] for s in snrs):
        ss = [s for s in snrs if s["at"] == at]

        def m(k: str, ss=ss) -> float:
            return mean(s[k] for s in ss)

        lines.append(f"| {at} | {m('reward_signal'):.2e} | {m('reward_noise'):.2e} | {m('pen_signal'):.2e} | "
                     f"{m('pen_noise'):.2e} | {m('pen_noise_tokens'):.2e} | {m('pen_snr'):.3f} | "
                     f"{m('baseline_noise'):.2e} | {m('cos_pen_reward'):+.2f} | {m('dir_d_change'):+.2%} | "
                     f"{m('dir_entropy_change'):+.2%} | {m('top_share_of_d'):.2f} | {m('tokens_below_top_d'):.2f} | "
                     f"{m('reward_signal') / m('pen_noise'):.0f} | "
                     f"{m('reward_noise') / m('pen_noise'):.0f} |")  # fmt: skip
    return lines + [""]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, lams = res["rows"], res["args"]["lambdas"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for i, opt_name in enumerate(("adam", "sgd")):
        grpo = [r for r in rows if r["opt"] == opt_name and r["mode"] == "grpo"]
        for j, field in enumerate(("acc", "d", "entropy")):
            ax = axes[i, j]
            ax.axhline(mean(r["end"][field] for r in grpo), color="k", ls=":", label="grpo")
            for mode in MODES[1:]:
                ys = [mean(r["end"][field] for r in rows if r["opt"] == opt_name and r["mode"] == mode and r["lam"] == lam)
                      for lam in lams]  # fmt: skip
                ax.plot(lams, ys, marker="o", label=mode)
            ax.set_xscale("log")
            ax.set_title(f"{opt_name}: {field} at the end")
            ax.set_xlabel("lambda")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 150 steps, 40 gradient batches")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batches", type=int, default=200, help="batches per signal/noise measurement")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[100.0, 300.0, 1000.0, 3000.0])
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--sgd-lr", type=float, default=0.3)
    ap.add_argument("--deploy", default="bf16", choices=("bf16", "fp8"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batches = 1, 150, 40
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run_all(args, Toy(deploy=args.deploy))
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report(res, out) + f"\n{res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
