"""The workers of ``benchmarks/vs_trl.py``, one per subprocess (``vs_trl.py --worker=<name>``): dcgrpo's loop and
TRL's GRPOTrainer on the same run, each rollout engine alone, and the held-out evaluation of the final models.

Each returns one JSON-able dict, which ``vs_trl.py`` hands back as the worker's ``ROW``. The TRL workers run in
``.venv-trl``; every heavy import is inside its worker.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from harness import quiet_worker
from vs_trl_mapping import run_overrides, trl_grpo_kwargs
from vs_trl_report import PHASES, group_steps


def _force_min_tokens(engine) -> None:
    """Make dcgrpo's vLLM engine sample exactly max_tokens tokens (EOS banned before), for the length sweep."""
    from vllm import SamplingParams

    llm_generate = engine.llm.generate

    def generate(prompts, params, **kw):
        params = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                max_tokens=params.max_tokens, logprobs=params.logprobs, min_tokens=params.max_tokens)  # fmt: skip
        return llm_generate(prompts, params, **kw)

    engine.llm.generate = generate


def worker_dcgrpo(a) -> dict:
    t_import = time.perf_counter()
    quiet_worker()
    import resource

    from vllm import LLM  # noqa: F401  (vLLM's lazy imports, ~5 s: imports are outside the timed wall on both sides)

    import dcgrpo.train.rl as rl
    from dcgrpo.config import load_config

    cfg = load_config(overrides=run_overrides(a.method, a.steps, a.group_size, a.max_len))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    parts = {"checkpoint_s": 0.0}
    save_checkpoint, save_plot = rl.ckpt.save_checkpoint, rl._save_plot

    def timed_save(fn):
        def inner(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                parts["checkpoint_s"] += time.perf_counter() - t

        return inner

    rl.ckpt.save_checkpoint, rl._save_plot = timed_save(save_checkpoint), timed_save(save_plot)
    import_s = time.perf_counter() - t_import
    t0, cpu0 = time.perf_counter(), time.process_time()
    engine = rl.make_engine(cfg, a.model_dir)
    parts["engine_start_s"] = time.perf_counter() - t0
    if a.force_length:
        _force_min_tokens(engine)
    try:
        res = rl.train(cfg, model_dir=a.model_dir, train_path=a.train_path, out_dir=out, engine=engine, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        engine.close()
        rl.ckpt.save_checkpoint, rl._save_plot = save_checkpoint, save_plot
    hist = [h for h in res.history if "timing/step_s" in h]
    B = cfg.train.responses_per_batch
    steps = []
    for h in hist:
        s = {"step_s": h["timing/step_s"], "tokens": round(h["response/length_mean"] * B), "responses": B,
             "reward_mean": h["reward/mean"], "skipped_updates": h["actor/skipped_updates"]}  # fmt: skip
        for p in PHASES[:-1]:
            s[f"{p}_s"] = h[f"timing/{p}_s"]
        s["other_s"] = s["step_s"] - sum(s[f"{p}_s"] for p in PHASES[:-1])
        steps.append(s)
    setup = wall - sum(s["step_s"] for s in steps)
    parts["other_setup_s"] = setup - parts["engine_start_s"] - parts["checkpoint_s"]
    return {"side": "dcgrpo", "steps": steps, "train_wall_s": wall, "train_cpu_s": cpu, "setup_s": setup, "setup_parts": parts,
            "import_s": import_s, "final_model": res.checkpoint,
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def worker_trl(a) -> dict:
    t_import = time.perf_counter()
    quiet_worker()
    import resource

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from dcgrpo.config import load_config
    from dcgrpo.reward import score_batch

    cfg = load_config(overrides=run_overrides(a.method, a.steps, a.group_size, a.max_len))
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    kw = trl_grpo_kwargs(cfg, a.steps, str(out / "trainer"))
    if a.force_length:
        kw["generation_kwargs"] = {"min_new_tokens": cfg.rollout.max_response_length}
    data = json.loads(Path(a.prompts).read_text())[: a.steps * cfg.train.prompts_per_batch]
    dataset = Dataset.from_list(data)

    def math_verify(prompts, completions, ground_truth, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score_batch(texts, ground_truth)

    rec: dict[str, list] = {"rollout": [], "reward": [], "prepare": [], "tokens": [], "responses": [], "reward_mean": [],
                            "step_end": []}  # fmt: skip
    callback = _step_times(rec)  # before the clock: TRL's imports are outside the timed wall
    import_s = time.perf_counter() - t_import
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer = GRPOTrainer(model=a.model_dir, reward_funcs=math_verify, args=GRPOConfig(**kw),
                          train_dataset=dataset, callbacks=[callback])  # fmt: skip
    init_s = time.perf_counter() - t0
    _instrument(trainer, rec)
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    final = out / "final"
    trainer.save_model(str(final))
    trainer.processing_class.save_pretrained(str(final))
    steps = _trl_steps(rec, kw["steps_per_generation"] * kw["num_iterations"])
    setup = wall - sum(s["step_s"] for s in steps)
    return {"side": "trl", "steps": steps, "train_wall_s": wall, "train_cpu_s": cpu, "setup_s": setup, "final_model": str(final),
            "setup_parts": {"trainer_init_s": init_s, "other_setup_s": setup - init_s}, "import_s": import_s,
            "trl_kwargs": {k: v for k, v in kw.items() if k != "output_dir"},
            "self_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


def _step_times(rec: dict):
    """A TrainerCallback that records the clock at the start of training and at the end of every optimiser step."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            rec["step_end"].append(time.perf_counter())

    return StepTimes()


def _instrument(trainer, rec: dict) -> None:
    """Time TRL's generation (and count its tokens), its reward call and the whole of its batch preparation."""
    import torch

    def timed(name, fn, after=None):
        def inner(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            rec[name].append(time.perf_counter() - t)
            if after is not None:
                after(result)
            return result

        return inner

    def count_tokens(result):
        completion_ids = result[0]
        rec["tokens"].append(sum(len(c) for c in completion_ids))
        rec["responses"].append(len(completion_ids))

    trainer._generate_single_turn = timed("rollout", trainer._generate_single_turn, count_tokens)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards,
                                       lambda r: rec["reward_mean"].append(float(torch.nanmean(r.nansum(dim=1)))))  # fmt: skip
    trainer._generate_and_score_completions = timed("prepare", trainer._generate_and_score_completions)


def _trl_steps(rec: dict, per_gen: int) -> list[dict]:
    """Per-generation step records (dcgrpo's shape) from TRL's optimiser-step clock and the timed calls."""
    opt_steps = [b - a_ for a_, b in zip(rec["step_end"], rec["step_end"][1:], strict=False)]
    steps = []
    for i, st in enumerate(group_steps(opt_steps, per_gen)):
        steps.append({"step_s": st, "tokens": rec["tokens"][i], "responses": rec["responses"][i],
                      "reward_mean": rec["reward_mean"][i], "rollout_s": rec["rollout"][i], "reward_s": rec["reward"][i],
                      "recompute_s": rec["prepare"][i] - rec["rollout"][i] - rec["reward"][i],
                      "update_s": st - rec["prepare"][i], "sync_s": 0.0, "other_s": 0.0})  # fmt: skip
    return steps


def _rollout_batches(cfg) -> list[tuple[str, int, int, int, bool]]:
    """(label, prompts, group size, max tokens, forced length) of the engine-only comparison."""
    G, T = cfg.train.group_size, cfg.rollout.max_response_length
    P = cfg.train.prompts_per_batch
    return [(f"one step: {P} prompts x {G}, <= {T} tokens", P, G, T, False),
            (f"4 steps' prompts: {4 * P} x {G}, <= {T} tokens", 4 * P, G, T, False),
            (f"{P} prompts x {G}, exactly 128 tokens", P, G, 128, True)]  # fmt: skip


def _best_of(fn, n: int = 3) -> tuple[float, int]:
    fn()  # warm-up
    best = None
    for _ in range(n):
        t = time.perf_counter()
        toks = fn()
        dt = time.perf_counter() - t
        best = min(best or (dt, toks), (dt, toks))
    return best


def worker_rollout_vllm(a) -> dict:
    quiet_worker()
    from dcgrpo.config import load_config
    from dcgrpo.engines.vllm_engine import apply_chat_template
    from dcgrpo.train.rl import make_engine

    cfg = load_config(overrides=run_overrides(a.method, 1, a.group_size, 128))  # engine sized for 128 tokens
    base = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    data = json.loads(Path(a.prompts).read_text())
    engine = make_engine(cfg, a.model_dir)
    forced = False
    out = []
    try:
        for label, P, G, T, force in _rollout_batches(base):
            if force and not forced:
                _force_min_tokens(engine)
                forced = True
            prompts = [apply_chat_template(engine.tokenizer, r["prompt"]) for r in data[:P]]

            def call(prompts=prompts, G=G, T=T):
                groups = engine.generate(prompts, n=G, temperature=1.0, top_p=1.0, max_tokens=T)
                return sum(len(g.token_ids) for grp in groups for g in grp)

            dt, toks = _best_of(call)
            out.append({"batch": label, "s": dt, "tokens": toks, "tokens_per_s": toks / dt})
    finally:
        engine.close()
    return {"engine": "vllm", "batches": out}


def worker_rollout_hf(a) -> dict:
    """HF generate as TRL 1.16's GRPOTrainer calls it (use_vllm=False): each prompt repeated G times, left-padded,
    fp32 training model, GenerationConfig(do_sample, temperature, top_p, top_k=0, disable_compile)."""
    quiet_worker()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dcgrpo.config import load_config
    from dcgrpo.engines.vllm_engine import apply_chat_template, encode_prompt

    base = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    data = json.loads(Path(a.prompts).read_text())
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    out = []
    for label, P, G, T, force in _rollout_batches(base):
        ids = [encode_prompt(tok, apply_chat_template(tok, r["prompt"])) for r in data[:P] for _ in range(G)]
        L = max(len(x) for x in ids)
        input_ids = torch.tensor([[tok.pad_token_id] * (L - len(x)) + list(x) for x in ids])
        attn = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
        gen_kw = dict(max_new_tokens=T, do_sample=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=[tok.eos_token_id], temperature=base.rollout.temperature, top_p=base.rollout.top_p,
                      top_k=0, min_p=None, repetition_penalty=1.0, cache_implementation=None)  # fmt: skip
        if force:
            gen_kw["min_new_tokens"] = T
        gcfg = GenerationConfig(**gen_kw, disable_compile=True)

        def call(input_ids=input_ids, attn=attn, gcfg=gcfg, L=L):
            with torch.no_grad():
                seqs = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gcfg)
            comp = seqs[:, L:]
            is_eos = comp == tok.eos_token_id
            first = torch.where(
                is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], comp.shape[1], dtype=torch.long)
            )
            return int(torch.clamp(first + 1, max=comp.shape[1]).sum())  # TRL's mask: up to and including EOS

        dt, toks = _best_of(call)
        out.append({"batch": label, "s": dt, "tokens": toks, "tokens_per_s": toks / dt})
    return {"engine": "hf", "batches": out}


def worker_eval(a) -> dict:
    """Greedy held-out accuracy of each model, one evaluation path: dcgrpo's vLLM engine (bf16), 256 problems."""
    quiet_worker()
    from dcgrpo.config import load_config
    from dcgrpo.data.synthetic import read_rows
    from dcgrpo.train.rl import heldout_accuracy, make_engine

    cfg = load_config(overrides=run_overrides(a.method, 1, a.group_size, a.max_len))
    val_rows = read_rows(a.val_path)
    acc = {}
    for name, model_dir in json.loads(a.models).items():
        engine = make_engine(cfg, model_dir)
        try:
            acc[name] = heldout_accuracy(engine, val_rows, cfg.rollout.max_response_length)
        finally:
            engine.close()
    return {"accuracy": acc, "problems": len(val_rows)}


WORKERS = {"dcgrpo": worker_dcgrpo, "trl": worker_trl, "rollout-vllm": worker_rollout_vllm,
           "rollout-hf": worker_rollout_hf, "eval": worker_eval}  # fmt: skip
