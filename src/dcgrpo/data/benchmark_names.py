"""The benchmark names: the table of public math benchmarks and their aliases, and ``canonical_name``.

Below both the config (which canonicalises ``eval.benchmarks`` at load time) and ``dcgrpo.data.benchmarks``
(which loads the rows); it imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from dcgrpo.errors import DataError


class BenchmarkError(DataError):
    """A benchmark cannot be found or a row is malformed (names file, line, field)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    file: str
    """JSONL file name inside the benchmark directory."""
    hub_id: str
    """Public Hugging Face dataset id (source ``hub``)."""
    hub_split: str
    hub_fields: tuple[str, str]
    """(problem field, answer field) in the hub dataset."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec("aime24.jsonl", "HuggingFaceH4/aime_2024", "train", ("problem", "answer")),
    "aime25": BenchmarkSpec("aime25.jsonl", "yentinglin/aime_2025", "train", ("problem", "answer")),
    "amc23": BenchmarkSpec("amc23.jsonl", "math-ai/amc23", "test", ("question", "answer")),
    "math500": BenchmarkSpec("math500.jsonl", "HuggingFaceH4/MATH-500", "test", ("problem", "answer")),
    "minerva_math": BenchmarkSpec("minerva_math.jsonl", "math-ai/minervamath", "test", ("question", "answer")),
    "olympiadbench": BenchmarkSpec("olympiadbench.jsonl", "math-ai/olympiadbench", "test", ("question", "answer")),
}
ALIASES = {"minerva": "minerva_math", "math-500": "math500", "olympiad": "olympiadbench", "amc": "amc23"}
SYNTHETIC = "synthetic"


def canonical_name(name: str) -> str:
    """``math-500`` -> ``math500``; ``BenchmarkError`` listing the choices for an unknown name."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key != SYNTHETIC and key not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; choose from {', '.join([*BENCHMARKS, SYNTHETIC])}")
    return key
