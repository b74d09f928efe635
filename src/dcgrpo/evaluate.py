"""avg@k on math benchmarks with the deploy engine (vLLM), plus greedy pass@1.

For each benchmark: ``k`` samples per problem at ``eval.temperature`` /
``eval.top_p`` / ``eval.max_tokens``, each scored 1/0 by ``dcgrpo.reward``;

    avg@k = mean over problems of (mean over the k samples)

with a 95% Wilson interval over the problems (per-problem means vary no more
than a Bernoulli proportion, so this is conservative for k > 1 and exact in
form for k = 1; it stays honest at 0 and 1). Greedy pass@1 is one
temperature-0 sample per problem.

Outputs under ``out_dir`` (local or s3://, written atomically after all
benchmarks finished): ``results.json``, ``results.md`` (benchmark, k, score,
95% interval) and ``samples.jsonl``; MLflow metrics ``eval/<bench>/avg_<k>`` (avg@k)
and ``eval/<bench>/pass_1_greedy`` (greedy pass@1), the one spelling of these names everywhere (MLflow forbids
``@`` in names), plus those files as artifacts.

Every benchmark is loaded (and validated) before the engine starts, so bad
input fails in seconds with the file, line and field named.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dcgrpo import reward, storage
from dcgrpo.config import RunConfig
from dcgrpo.data.benchmarks import canonical_name, load_benchmark
from dcgrpo.data.dapo import PROMPT_TEMPLATES
from dcgrpo.models import check_model_files

log = logging.getLogger(__name__)


def mlflow_key(metric: str) -> str:
    """MLflow metric names allow only ``[/\\w.\\- :]``: any other character becomes ``_`` (the metric names of
    ``BenchResult.metrics`` are valid already; ``eval.gate_metric`` takes the old ``avg@32`` spelling this way).

    Same rule as ``dcgrpo.registry``'s tag keys.
    """
    return re.sub(r"[^/\w.\- :]", "_", metric)


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``mean`` over ``n`` problems."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class BenchResult:
    benchmark: str
    problems: int
    k: int
    avg_at_k: float
    ci95: tuple[float, float]
    pass1_greedy: float | None = None
    pass1_greedy_ci95: tuple[float, float] | None = None
    too_long: int = 0
    """Problems whose prompt + max_tokens does not fit ``eval.max_model_len`` (scored 0)."""
    generated_tokens: int = 0
    truncated: int = 0
    """Samples that hit max_tokens."""
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        m = {
            f"eval/{self.benchmark}/avg_{self.k}": self.avg_at_k,
            f"eval/{self.benchmark}/avg_{self.k}_ci_low": self.ci95[0],
            f"eval/{self.benchmark}/avg_{self.k}_ci_high": self.ci95[1],
            f"eval/{self.benchmark}/problems": float(self.problems),
        }
        if self.pass1_greedy is not None:
            m[f"eval/{self.benchmark}/pass_1_greedy"] = self.pass1_greedy
        return m


@dataclass
class EvalReport:
    model: str
    precision: str
    results: list[BenchResult] = field(default_factory=list)
    wall_s: float = 0.0
    generate_s: float = 0.0
    generated_tokens: int = 0
    config_hash: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.results:
            out.update(r.metrics())
        out["eval/wall_s"] = self.wall_s
        out["eval/tokens_per_s"] = self.tokens_per_s
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        d["metrics"] = self.metrics()
        return json.dumps(d, indent=2)

    def table(self) -> tuple[list[str], list[list[Any]]]:
        """(header, rows) of the results table, scores in percent rounded to 0.1: what ``markdown`` and the
        pipeline's HTML report (``dcgrpo.plots.write_report``) show."""
        header = ["benchmark", "problems", "k", "avg@k (%)", "95% interval", "greedy pass@1 (%)", "too long"]
        rows: list[list[Any]] = []
        for r in self.results:
            greedy = "-" if r.pass1_greedy is None else round(100 * r.pass1_greedy, 1)
            interval = f"[{100 * r.ci95[0]:.1f}, {100 * r.ci95[1]:.1f}]"
            rows.append([r.benchmark, r.problems, r.k, round(100 * r.avg_at_k, 1), interval, greedy, r.too_long])
        return header, rows

    def settings_line(self) -> str:
        return (
            f"Model {self.model} ({self.precision}); T={self.settings.get('temperature')}, "
            f"top-p={self.settings.get('top_p')}, max tokens={self.settings.get('max_tokens')}"
        )

    def throughput_line(self) -> str:
        return (
            f"{self.generated_tokens:,} tokens generated in {self.generate_s:.1f}s "
            f"({self.tokens_per_s:,.0f} tok/s); wall {self.wall_s:.1f}s."
        )

    def markdown(self) -> str:
        header, rows = self.table()
        align = ["---", "---:", "---:", "---:", "---", "---:", "---:"]
        lines = [self.settings_line(), "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")
        lines += ["", self.throughput_line()]
        return "\n".join(lines) + "\n"


def build_prompt(row: dict[str, Any], template: str) -> str:
    """The user message: a benchmark's own prompt (synthetic) or the problem in the run's template."""
    return row.get("prompt") or PROMPT_TEMPLATES[template].format(problem=row["problem"])


def load_benchmarks(cfg: RunConfig, names: list[str], benchmark_dir: str | None) -> dict[str, list[dict]]:
    source = benchmark_dir or cfg.eval.benchmark_dir
    out = {}
    for name in names:
        rows = load_benchmark(name, source, data_cfg=cfg.data)
        if cfg.eval.max_problems is not None:
            rows = rows[: cfg.eval.max_problems]  # the first N: the same problems every run
        out[canonical_name(name)] = rows
    return out


def _generate_scored(engine, prompts, answers, *, n, temperature, cfg, progress) -> tuple[list[list[float]], int, int]:
    """Scores (problems x n), generated tokens, samples cut at max_tokens."""
    scores: list[list[float]] = []
    tokens = truncated = 0
    step = cfg.eval.batch_prompts
    for start in range(0, len(prompts), step):
        groups = engine.generate(
            prompts[start : start + step],
            n=n,
            temperature=temperature,
            top_p=cfg.eval.top_p,
            max_tokens=cfg.eval.max_tokens,
        )
        texts, gts = [], []
        for g, ans in zip(groups, answers[start : start + step], strict=True):
            for gen in g:
                texts.append(gen.text)
                gts.append(ans)
                tokens += len(gen.token_ids)
                truncated += gen.finish_reason == "length"
        flat = reward.score_batch(texts, gts, cfg.reward)
        scores += [flat[i * n : (i + 1) * n] for i in range(len(groups))]
        if progress is not None:
            progress.update(len(groups) * n)
    return scores, tokens, truncated


def evaluate(
    model_path: str,
    cfg: RunConfig,
    out_dir: str,
    *,
    benchmarks: list[str] | None = None,
    benchmark_dir: str | None = None,
    engine=None,
    run=None,
    progress: bool = True,
) -> EvalReport:
    """Evaluate ``model_path`` (HF directory, local or s3://) on ``benchmarks``; write and log the report.

    ``engine``: an open ``VLLMEngine`` to reuse (else one is started and closed
    here). ``run``: a ``dcgrpo.tracking`` run to log metrics and artifacts to.
    """
    from tqdm import tqdm  # tqdm: `dcgrpo submit` runs without it

    t0 = time.perf_counter()
    names = benchmarks or cfg.eval.benchmarks
    data = load_benchmarks(cfg, names, benchmark_dir)  # fail on bad input before any engine work
    report = EvalReport(
        model=str(model_path),
        precision=cfg.rollout.precision,
        config_hash=cfg.config_hash(),
        settings={
            "temperature": cfg.eval.temperature,
            "top_p": cfg.eval.top_p,
            "max_tokens": cfg.eval.max_tokens,
            "k": {b: cfg.eval.k_for(b) for b in data},
            "max_problems": cfg.eval.max_problems,
            "prompt_template": cfg.data.prompt_template,
        },
    )
    samples: list[dict[str, Any]] = []
    with _engine_for(model_path, cfg, engine) as eng:
        total = sum(len(rows) * (cfg.eval.k_for(b) + cfg.eval.greedy_pass1) for b, rows in data.items())
        bar = tqdm(total=total, desc="evaluate", unit="sample", disable=not progress, dynamic_ncols=True)
        for bench, rows in data.items():
            res, generate_s = _evaluate_benchmark(eng, cfg, bench, rows, bar, samples)
            report.results.append(res)
            report.generate_s += generate_s
            report.generated_tokens += res.generated_tokens
        bar.close()
    report.wall_s = time.perf_counter() - t0
    _write_outputs(report, samples, out_dir, run)
    return report


def _evaluate_benchmark(eng, cfg: RunConfig, bench: str, rows: list[dict], bar, samples: list[dict]):
    """avg@k (and greedy pass@1) of one benchmark; problems whose prompt does not fit score 0. Appends each
    problem's scores to ``samples``; returns (its ``BenchResult``, seconds spent generating)."""
    from dcgrpo.engines.vllm_engine import apply_chat_template, encode_prompt  # torch: not on the light image

    tb = time.perf_counter()
    k = cfg.eval.k_for(bench)
    bar.set_postfix_str(bench)
    prompts, answers, fits = [], [], []
    for r in rows:
        p = apply_chat_template(eng.tokenizer, [{"role": "user", "content": build_prompt(r, cfg.data.prompt_template)}])
        ok = len(encode_prompt(eng.tokenizer, p)) + cfg.eval.max_tokens <= cfg.eval.max_model_len
        fits.append(ok)
        if ok:
            prompts.append(p)
            answers.append(r["answer"])
    too_long = len(rows) - len(prompts)
    if too_long:
        log.warning("%s: %d of %d prompts do not fit max_model_len=%d; scored 0", bench, too_long, len(rows),
                    cfg.eval.max_model_len)  # fmt: skip
        bar.update(too_long * (k + cfg.eval.greedy_pass1))
    tg = time.perf_counter()
    sampled, tokens, truncated = _generate_scored(
        eng, prompts, answers, n=k, temperature=cfg.eval.temperature, cfg=cfg, progress=bar
    )
    greedy = None
    if cfg.eval.greedy_pass1:
        greedy, gtok, _ = _generate_scored(eng, prompts, answers, n=1, temperature=0.0, cfg=cfg, progress=bar)
        tokens += gtok
    generate_s = time.perf_counter() - tg
    # Problems that did not fit score 0 (keeps the denominator = all problems).
    it = iter(range(len(prompts)))
    per_problem, greedy_problem = [], []
    for r, ok in zip(rows, fits, strict=True):
        j = next(it) if ok else None
        per_problem.append(sum(sampled[j]) / k if ok else 0.0)
        g = greedy[j][0] if (ok and greedy is not None) else 0.0
        greedy_problem.append(g)
        samples.append({"benchmark": bench, "id": r["id"], "answer": r["answer"], "fits": ok,
                        "scores": sampled[j] if ok else [], "greedy": g if greedy is not None else None})  # fmt: skip
    n = len(rows)
    avg = sum(per_problem) / n
    res = BenchResult(bench, n, k, avg, wilson_interval(avg, n), too_long=too_long,
                      generated_tokens=tokens, truncated=truncated)  # fmt: skip
    if greedy is not None:
        res.pass1_greedy = sum(greedy_problem) / n
        res.pass1_greedy_ci95 = wilson_interval(res.pass1_greedy, n)
    res.seconds = time.perf_counter() - tb
    return res, generate_s


class _engine_for:
    """Context manager: the given engine (left open) or a fresh one (closed on exit)."""

    def __init__(self, model_path: str, cfg: RunConfig, engine) -> None:
        self.model_path, self.cfg, self.engine, self._owned = model_path, cfg, engine, engine is None
        self._tmp = None

    def __enter__(self):
        if self.engine is not None:
            return self.engine
        from dcgrpo.engines.vllm_engine import engine_from_config  # torch: not on the light image

        path = str(self.model_path)
        if storage.is_s3(path):
            self._tmp = tempfile.TemporaryDirectory(prefix="dcgrpo-eval-model-")
            path = str(storage.download_dir(path, Path(self._tmp.name) / "model"))
        elif not Path(path).is_dir():
            raise FileNotFoundError(f"model {path}: no such directory")
        check_model_files(path, str(self.model_path))  # a corrupt shard fails here, named, not inside vLLM
        self.engine = engine_from_config(self.cfg, path, self.cfg.eval.max_model_len)
        return self.engine

    def __exit__(self, *exc) -> None:
        if self._owned and self.engine is not None:
            self.engine.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _write_outputs(report: EvalReport, samples: list[dict], out_dir: str, run) -> None:
    files = {
        "results.json": report.to_json(),
        "results.md": report.markdown(),
        "samples.jsonl": "".join(json.dumps(s) + "\n" for s in samples),
    }
    for name, text in files.items():
        storage.write_text(storage.join(out_dir, name), text)
    if run is not None:
        run.log_metrics({mlflow_key(k): v for k, v in report.metrics().items()})
        run.set_tags({"eval.model": report.model})
        for name, text in files.items():
            run.log_text(text, f"eval/{name}")
