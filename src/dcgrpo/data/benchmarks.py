"""Evaluation benchmarks normalised to ``{"id", "problem", "answer"}`` rows.

Six public math benchmarks (AIME24, AIME25, AMC23, MATH-500, Minerva Math,
OlympiadBench) load from one of three sources (``eval.benchmark_dir``):

- ``samples``: the first rows of each, shipped in the package (``dcgrpo/data/samples``, with their
  PROVENANCE.md) so the demo and the tests run on a fresh clone;
- ``hub``: each benchmark's public Hugging Face dataset, cached under ``HF_HOME`` (``dcgrpo.data.hub``);
- a directory of ``<name>.jsonl`` files, local or ``s3://``.
 ``synthetic`` is the
held-out split of the synthetic arithmetic task (``dcgrpo.data.synthetic``);
its rows also carry the exact ``prompt`` the tiny model was trained on.

Bad files fail with ``BenchmarkError`` naming the file, line and field.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.config import DataConfig
from dcgrpo.data import hub
from dcgrpo.data.benchmark_names import (  # their home: below config
    BENCHMARKS,
    SYNTHETIC,
    BenchmarkError,
    canonical_name,
)
from dcgrpo.data.synthetic import synthetic_val_rows

SAMPLES = "samples"
"""Source name of the samples shipped in the package."""
HUB = "hub"
"""Source name of the Hugging Face Hub."""


def samples_dir() -> Path:
    """The samples shipped in the package (benchmarks and a DAPO-Math-17K slice; see its PROVENANCE.md)."""
    return Path(str(resources.files("dcgrpo.data") / "samples"))


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):  # OlympiadBench final_answer lists
        parts = [_answer_text(v) for v in value]
        return ", ".join(p for p in parts if p) or None
    if isinstance(value, str):
        value = value.strip()
        if len(value) >= 2 and value[0] == "$" and value[-1] == "$":
            value = value.strip("$").strip()
        return value or None
    return None


def normalise_row(raw: dict[str, Any], where: str, fallback_id: str) -> dict[str, Any]:
    """``{"id", "problem", "answer"}`` (+ the source's extra fields) or BenchmarkError naming ``where``."""
    if not isinstance(raw, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    problem = raw.get("problem", raw.get("question"))
    if not isinstance(problem, str) or not problem.strip():
        raise BenchmarkError(f"{where}: field 'problem' is missing or empty")
    answer = None
    for field in ("answer", "final_answer", "final_answer_list"):
        if field in raw:
            answer = _answer_text(raw[field])
            if answer is not None:
                break
    if answer is None:
        raise BenchmarkError(f"{where}: field 'answer' is missing, empty or not a string/number")
    row = {k: v for k, v in raw.items() if k not in ("id", "problem", "answer")}
    row.update(id=str(raw.get("id", raw.get("unique_id", fallback_id))), problem=problem.strip(), answer=answer)
    return row


def read_jsonl(uri: str, name: str) -> list[dict[str, Any]]:
    try:
        text = storage.read_text(uri)
    except UnicodeDecodeError as exc:
        raise BenchmarkError(f"{uri}: not UTF-8 text ({exc})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{uri}: line {lineno}: not valid JSON ({exc.msg})") from None
        rows.append(normalise_row(raw, f"{uri}: line {lineno}", f"{name}-{lineno - 1}"))
    if not rows:
        raise BenchmarkError(f"{uri}: no rows")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BenchmarkError(f"{uri}: duplicate id {dup!r}")
    return rows


def _load_hub(name: str) -> list[dict[str, Any]]:
    spec = BENCHMARKS[name]
    pfield, afield = spec.hub_fields
    rows = []
    try:
        paths = hub.split_files(spec.hub_id, spec.hub_split)
        records = [(path, hub.read_records(path)) for path in paths]
    except hub.HubError as exc:
        raise BenchmarkError(f"benchmark {name} (eval.benchmark_dir=hub): {exc}") from None
    for path, recs in records:
        for i, r in enumerate(recs):
            where = f"{spec.hub_id} ({path.name}) row {i}"
            rows.append(
                normalise_row({**r, "problem": r.get(pfield), "answer": r.get(afield)}, where, f"{name}-{len(rows)}")
            )
    if not rows:
        raise BenchmarkError(
            f"benchmark {name}: Hugging Face dataset {spec.hub_id} split {spec.hub_split!r} has no rows"
        )
    return rows


def load_synthetic(data_cfg) -> list[dict[str, Any]]:
    """The held-out synthetic split, the same rows ``write_synthetic_splits`` writes to val.parquet."""

    rows = synthetic_val_rows(data_cfg)
    return [
        {
            "id": f"synthetic-{r['extra_info']['index']}",
            "problem": r["extra_info"]["question"],
            "answer": r["reward_model"]["ground_truth"],
            "prompt": r["prompt"][0]["content"],
        }
        for r in rows
    ]


def load_benchmark(name: str, source: str | Path | None = SAMPLES, data_cfg=None) -> list[dict[str, Any]]:
    """Rows of one benchmark from ``source``: ``samples``, ``hub`` or a directory (local or s3://).

    ``data_cfg`` (a ``DataConfig``) is needed only for ``synthetic``, which is generated, not loaded.
    """
    name = canonical_name(name)
    if name == SYNTHETIC:
        if data_cfg is None:
            data_cfg = DataConfig()
        return load_synthetic(data_cfg)
    if source is None or str(source) == HUB:
        return _load_hub(name)
    if str(source) == SAMPLES:
        source = samples_dir()
    uri = storage.join(source, BENCHMARKS[name].file)
    if not storage.exists(uri):
        raise BenchmarkError(f"benchmark {name}: {uri} does not exist")
    return read_jsonl(uri, name)
