"""DAPO-Math-17K -> verl-schema train/validation parquet.

Accepted inputs: a local path, an ``s3://`` URI, ``hub`` (the published Hugging Face
dataset ``BytedTsinghua-SIA/DAPO-Math-17k``) or ``hf://<owner>/<name>[/<file>]``, cached
under ``HF_HOME`` (``dcgrpo.data.hub``; ``HF_HUB_OFFLINE=1`` reads the cache only). Forms:

- the published parquet: every problem repeated 100x, the prompt wrapped in
  the DAPO "Answer:" template, UUID ``extra_info.index``;
- the de-duplicated original-schema parquet (the SvS copy; a 406-row slice ships as
  ``dcgrpo/data/samples/dapo_math_17k.sample.parquet``: template stripped, integer indexes);
- the normalised JSONL (``{"id", "problem", "answer"}`` per line).

Steps, each counted in the summary:

    rows_in -> bad rows (reported by row index, dropped)
            -> exact duplicates (same problem text and answer; keep first)
            -> conflicts (same problem text, different answers: every row dropped)
            -> rows_out, split train/val by a seeded shuffle of unique problems

A file that is not one of the schemas above fails with ``DapoSchemaError``
naming the file and the column. Outputs are written atomically through
``dcgrpo.storage`` only after everything has been validated.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dcgrpo import storage
from dcgrpo.data import hub
from dcgrpo.data.schema import prompt_lengths, row_problem, text_problem
from dcgrpo.errors import DataError

log = logging.getLogger(__name__)

HUB_REPO = "BytedTsinghua-SIA/DAPO-Math-17k"
HUB_FILE = "data/dapo-math-17k.parquet"
DATA_SOURCE = "math_dapo"
"""verl routes ``math_dapo`` to its DAPO reward; our reward reads ``reward_model.ground_truth``."""

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
PROMPT_TEMPLATES = {
    "dapo": DAPO_PREFIX + "{problem}" + DAPO_SUFFIX,
    "boxed": "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
}
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class DapoSchemaError(DataError):
    """The input is not a DAPO-Math file of a known schema (names the file and the field)."""


@dataclass
class PrepSummary:
    source: str
    form: str
    """``published`` (templated prompts / UUID indexes), ``original`` (stripped) or ``jsonl``."""
    rows_in: int = 0
    bad_rows: int = 0
    duplicates: int = 0
    """Rows dropped as exact duplicates (same problem text and answer) of an earlier row."""
    conflict_groups: int = 0
    """Problem texts that appear with more than one distinct answer."""
    conflict_rows: int = 0
    """Rows dropped because their problem is in a conflict group (after exact de-duplication)."""
    too_long: int = 0
    """Rows dropped because their chat-formatted prompt exceeds ``data.max_prompt_length`` tokens."""
    max_prompt_length: int | None = None
    rows_out: int = 0
    train_rows: int = 0
    val_rows: int = 0
    template: str = "dapo"
    seed: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    """The first bad rows as ``row <i>: <reason>``."""
    train_path: str | None = None
    val_path: str | None = None

    def metrics(self) -> dict[str, float]:
        keys = ("rows_in", "bad_rows", "duplicates", "conflict_groups", "conflict_rows", "too_long", "rows_out")
        return {f"data/{k}": float(getattr(self, k)) for k in (*keys, "train_rows", "val_rows")}

    def table(self) -> str:
        lines = [f"DAPO-Math-17K preparation of {self.source} ({self.form} form, template {self.template})"]
        for k in ("rows_in", "bad_rows", "duplicates", "conflict_groups", "conflict_rows", "too_long", "rows_out"):
            lines.append(f"  {k:<16} {getattr(self, k):>9,}")
        if self.max_prompt_length is not None:
            lines.append(f"  (too_long: prompts over data.max_prompt_length={self.max_prompt_length} tokens)")
        lines.append(f"  {'train / val':<16} {self.train_rows:>9,} / {self.val_rows:,}")
        lines += [f"  bad {ex}" for ex in self.bad_row_examples]
        return "\n".join(lines)


def _drop_too_long(name: str, kept: list, template: str, tokenizer, limit: int, summary: PrepSummary) -> list:
    """The rows whose chat-formatted prompt fits ``limit`` tokens; the others counted in ``summary.too_long``."""

    lengths = prompt_lengths([to_verl_row(r, template, "train", 0) for r in kept], tokenizer)
    fits = [r for r, n in zip(kept, lengths, strict=True) if n <= limit]
    summary.too_long, summary.max_prompt_length = len(kept) - len(fits), limit
    if summary.too_long:
        log.warning("%s: %d of %d prompts are longer than data.max_prompt_length=%d tokens (dropped)",
                    name, summary.too_long, len(kept), limit)  # fmt: skip
    if not fits:
        raise DapoSchemaError(
            f"{name}: every prompt is longer than data.max_prompt_length={limit} tokens (shortest {min(lengths)}, "
            f"longest {max(lengths)} with this model's tokenizer): raise data.max_prompt_length within the model's "
            "context, or prepare for a model with a longer one (model.path)"
        )
    return fits


@dataclass
class _Row:
    problem: str
    answer: str
    orig_index: str


# ----------------------------------------------------------------------------- reading


def strip_template(content: str) -> str:
    """The bare problem of a DAPO-templated prompt (unchanged when not templated)."""
    if content.startswith(DAPO_PREFIX) and content.endswith(DAPO_SUFFIX):
        return content[len(DAPO_PREFIX) : -len(DAPO_SUFFIX)]
    return content


def _read_input(source: str) -> tuple[str, bytes]:
    """(display name, bytes) of a path, an s3:// URI or a Hugging Face dataset (``hub``, ``hf://...``)."""
    if source not in ("hub", "hf") and not source.startswith("hf://"):
        return source, storage.read_bytes(source)
    parts = source[len("hf://") :].strip("/").split("/") if source.startswith("hf://") else HUB_REPO.split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DapoSchemaError(f"{source}: expected hf://<owner>/<name>[/<file>]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if not filename and repo == HUB_REPO:
        filename = HUB_FILE
    if filename:
        path = hub.download_file(repo, filename)
    else:
        files = hub.split_files(repo, "train")
        if len(files) > 1:
            names = ", ".join(p.name for p in files)
            raise DapoSchemaError(f"{source}: {len(files)} train files ({names}); name one: hf://{repo}/<file>")
        path = files[0]
    return f"hf://{repo}/{filename or path.name}", path.read_bytes()


def _parquet_rows(name: str, data: bytes, bad: list[tuple[int, str]]) -> tuple[list[_Row | None], str]:
    """Rows from a verl/DAPO parquet, via column-level arrow ops (1.8M rows of the published file)."""
    import pyarrow as pa  # pyarrow: `dcgrpo submit` runs without it
    import pyarrow.compute as pc  # pyarrow: `dcgrpo submit` runs without it
    import pyarrow.parquet as pq  # pyarrow: `dcgrpo submit` runs without it

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DapoSchemaError(f"{name}: not a readable parquet file ({exc})") from None
    missing = {"prompt", "reward_model"} - set(table.column_names)
    if missing:
        raise DapoSchemaError(
            f"{name}: missing column(s) {sorted(missing)}; expected DAPO-Math's verl schema "
            f"(data_source, prompt, ability, reward_model, extra_info), got {table.column_names}"
        )
    prompt_t, rm_t = table.schema.field("prompt").type, table.schema.field("reward_model").type
    if not (pa.types.is_list(prompt_t) or pa.types.is_large_list(prompt_t)) or not pa.types.is_struct(
        prompt_t.value_type
    ):
        raise DapoSchemaError(f"{name}: column 'prompt' has type {prompt_t}, expected list<struct<content, role>>")
    if "content" not in [f.name for f in prompt_t.value_type]:
        raise DapoSchemaError(f"{name}: column 'prompt' items have no 'content' field ({prompt_t})")
    if not pa.types.is_struct(rm_t) or "ground_truth" not in [f.name for f in rm_t]:
        raise DapoSchemaError(f"{name}: column 'reward_model' has type {rm_t}, expected struct<ground_truth, style>")
    gt_t = rm_t.field("ground_truth").type
    if not (pa.types.is_string(gt_t) or pa.types.is_large_string(gt_t)):
        raise DapoSchemaError(f"{name}: field 'reward_model.ground_truth' has type {gt_t}, expected string")

    prompt = table.column("prompt").combine_chunks()
    lengths = pc.list_value_length(prompt).to_pylist()
    if all(lengths):  # fast path: every prompt has a first message
        contents = pc.struct_field(pc.list_element(prompt, 0), "content").to_pylist()
    else:  # some prompts empty or null: row by row (rare)
        contents = [((p[0] or {}).get("content") if p else None) for p in prompt.to_pylist()]
    answers = pc.struct_field(table.column("reward_model").combine_chunks(), "ground_truth").to_pylist()
    indexes: list[Any] = [None] * len(answers)
    if "extra_info" in table.column_names and pa.types.is_struct(table.schema.field("extra_info").type):
        ei_t = table.schema.field("extra_info").type
        if "index" in [f.name for f in ei_t]:
            indexes = pc.struct_field(table.column("extra_info").combine_chunks(), "index").to_pylist()

    rows: list[_Row | None] = []
    templated = 0
    for i, (content, answer, idx) in enumerate(zip(contents, answers, indexes, strict=True)):
        why = row_problem(lengths[i], [content], answer)  # the rules training enforces
        if why:
            bad.append((i, why))
            rows.append(None)
            continue
        problem = strip_template(content)
        templated += problem is not content
        rows.append(_Row(problem.strip(), answer.strip(), str(i if idx is None else idx)))
    uuids = sum(1 for x in indexes[:1000] if isinstance(x, str) and _UUID_RE.match(x))
    form = "published" if templated > len(rows) // 2 or uuids > 500 else "original"
    return rows, form


def _jsonl_rows(name: str, data: bytes, bad: list[tuple[int, str]]) -> list[_Row | None]:
    rows: list[_Row | None] = []
    for i, line in enumerate(data.decode("utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DapoSchemaError(f"{name}: line {i + 1}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "problem" not in obj or "answer" not in obj:
            if i == 0:
                raise DapoSchemaError(f"{name}: expected JSONL objects with 'problem' and 'answer' fields")
            bad.append((len(rows), "missing 'problem' or 'answer' field"))
            rows.append(None)
            continue
        problem, answer = obj["problem"], obj["answer"]
        why = text_problem(problem, "problem") or text_problem(answer, "answer")  # the parquet rules, JSONL names
        if why:
            bad.append((len(rows), why))
            rows.append(None)
        else:
            rows.append(_Row(strip_template(problem).strip(), answer.strip(), str(obj.get("orig_index", len(rows)))))
    return rows


# ----------------------------------------------------------------------------- cleaning and output


def to_verl_row(r: _Row, template: str, split: str, index: int) -> dict[str, Any]:
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": PROMPT_TEMPLATES[template].format(problem=r.problem)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": r.answer},
        "extra_info": {"split": split, "index": index, "orig_index": r.orig_index, "problem": r.problem},
    }


def clean(rows: list[_Row], summary: PrepSummary) -> list[_Row]:
    """Exact-duplicate removal, then removal of every problem with conflicting answers."""
    seen: set[tuple[str, str]] = set()
    unique: list[_Row] = []
    for r in rows:
        key = (r.problem, r.answer)
        if key in seen:
            summary.duplicates += 1
            continue
        seen.add(key)
        unique.append(r)
    answers: dict[str, set[str]] = {}
    for r in unique:
        answers.setdefault(r.problem, set()).add(r.answer)
    conflicted = {p for p, a in answers.items() if len(a) > 1}
    summary.conflict_groups = len(conflicted)
    kept = [r for r in unique if r.problem not in conflicted]
    summary.conflict_rows = len(unique) - len(kept)
    return kept


def _split_and_write(kept: list[dict], template: str, val_fraction: float, seed: int, out_dir: str,
                     summary: PrepSummary) -> None:  # fmt: skip
    """A deterministic train/val split (a seeded shuffle of positions: problems are unique after cleaning), written
    as parquet; everything is serialised first, then each file written atomically, the summary last."""
    import pyarrow as pa  # pyarrow: `dcgrpo submit` runs without it
    import pyarrow.parquet as pq  # pyarrow: `dcgrpo submit` runs without it

    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(kept) * val_fraction))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    train = [to_verl_row(kept[j], template, "train", k) for k, j in enumerate(train_idx)]
    val = [to_verl_row(kept[j], template, "val", k) for k, j in enumerate(val_idx)]
    summary.train_rows, summary.val_rows = len(train), len(val)
    blobs = {}
    for split, rows in (("train", train), ("val", val)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        blobs[f"{split}.parquet"] = buf.getvalue()
    summary.train_path = storage.join(out_dir, "train.parquet")
    summary.val_path = storage.join(out_dir, "val.parquet")
    for fname, blob in blobs.items():
        storage.write_bytes(storage.join(out_dir, fname), blob)
    storage.write_text(storage.join(out_dir, "summary.json"), json.dumps(asdict(summary), indent=2))


def prepare_dapo(
    source: str,
    out_dir: str,
    *,
    template: str = "dapo",
    val_fraction: float = 0.02,
    seed: int = 0,
    max_bad_rows: int | None = None,
    tokenizer=None,
    max_prompt_length: int | None = None,
) -> PrepSummary:
    """Read, validate, clean, split and write ``train.parquet``, ``val.parquet``, ``summary.json`` under ``out_dir``.

    Bad rows are dropped and reported by row index; ``max_bad_rows`` (None = no
    limit) turns too many of them into an error before anything is written.
    With ``tokenizer`` (the run's model's, ``dcgrpo.models.run_tokenizer``) and ``max_prompt_length``, prompts
    longer than that many tokens are dropped and counted (``too_long``); if none is short enough, an error says
    how long the shortest is.
    """
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"template must be one of {sorted(PROMPT_TEMPLATES)}, got {template!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bad_rows is not None and max_bad_rows < 0:
        raise ValueError(f"max_bad_rows must be >= 0 (or None for no limit), got {max_bad_rows}")
    name, data = _read_input(source)
    bad: list[tuple[int, str]] = []
    if name.endswith((".jsonl", ".json")):
        raw, form = _jsonl_rows(name, data, bad), "jsonl"
    else:
        raw, form = _parquet_rows(name, data, bad)
    summary = PrepSummary(source=name, form=form, rows_in=len(raw), template=template, seed=seed)
    summary.bad_rows = len(bad)
    summary.bad_row_examples = [f"row {i}: {why}" for i, why in bad[:20]]
    for i, why in bad[:20]:
        log.warning("%s: row %d: %s (dropped)", name, i, why)
    if max_bad_rows is not None and len(bad) > max_bad_rows:
        raise DapoSchemaError(
            f"{name}: {len(bad)} bad rows (limit {max_bad_rows}); first: {summary.bad_row_examples[0]}"
        )
    kept = clean([r for r in raw if r is not None], summary)
    if not kept:
        raise DapoSchemaError(f"{name}: no usable rows after cleaning")
    if tokenizer is not None and max_prompt_length:
        kept = _drop_too_long(name, kept, template, tokenizer, max_prompt_length, summary)
    summary.rows_out = len(kept)
    _split_and_write(kept, template, val_fraction, seed, out_dir, summary)
    return summary
