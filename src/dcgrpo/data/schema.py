"""The row rules of verl's math parquet schema, in one place.

``dcgrpo prepare`` drops (and counts) rows that break these rules; every
reader of a prepared or synthetic parquet (the RL loop, the SFT warm start,
held-out accuracy) refuses them up front. Both go through ``row_problem`` so a
file ``prepare`` wrote is always one training accepts, and a file training
refuses names the same reason ``prepare`` would have reported::

    train.parquet: row 3: reward_model.ground_truth is null

A row is usable when its prompt has at least one message, every message has
a non-empty string ``content``, and ``reward_model.ground_truth`` is a
non-empty string (the reward compares answer strings).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from dcgrpo.errors import DataError

REQUIRED_COLUMNS = ("prompt", "reward_model")
"""Columns every consumer reads; the others (data_source, ability, extra_info) are optional."""


def text_problem(value: Any, field: str) -> str | None:
    """Why ``value`` is not a usable text field, or None when it is."""
    if value is None:
        return f"{field} is null"
    if not isinstance(value, str):
        return f"{field} is {type(value).__name__}, expected a string"
    if not value.strip():
        return f"{field} is empty"
    return None


def row_problem(n_messages: int | None, contents: list[Any], ground_truth: Any) -> str | None:
    """Why a row is unusable (``<field> is <what>``), or None when it is usable.

    Args:
        n_messages: messages in the prompt (None: the prompt itself is null).
        contents: the messages' ``content`` values to check (``prepare`` passes
            only the first, read column-wise for speed).
        ground_truth: ``reward_model.ground_truth`` (None also when
            ``reward_model`` itself is null).
    """
    if n_messages is None:
        return "prompt is null"
    if n_messages == 0:
        return "prompt is empty (no messages)"
    for j, content in enumerate(contents):
        problem = text_problem(content, f"prompt[{j}].content")
        if problem:
            return problem
    return text_problem(ground_truth, "reward_model.ground_truth")


def _dict_row_problem(row: Mapping[str, Any]) -> str | None:
    """``row_problem`` for a row read back as Python objects (messages may be of any shape)."""
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, list | tuple):
        return f"prompt is {type(prompt).__name__}, expected a list of {{role, content}} messages"
    contents = []
    for j, msg in enumerate(prompt or []):
        if not isinstance(msg, Mapping):
            return f"prompt[{j}] is {type(msg).__name__}, expected a {{role, content}} message"
        contents.append(msg.get("content"))
    rm = row.get("reward_model")
    if rm is not None and not isinstance(rm, Mapping):
        return f"reward_model is {type(rm).__name__}, expected {{style, ground_truth}}"
    return row_problem(None if prompt is None else len(prompt), contents, (rm or {}).get("ground_truth"))


def validate_verl_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """``rows`` unchanged if every one is usable; else ``DataError`` naming ``source``, the row and the field.

    An empty list is an error too: every consumer samples from the rows.
    """
    if not rows:
        raise DataError(f"{source}: no rows (an empty dataset cannot be trained or evaluated on)")
    for i, row in enumerate(rows):
        problem = _dict_row_problem(row)
        if problem:
            raise DataError(f"{source}: row {i}: {problem}")
    return rows


def read_verl_parquet(data: bytes, source: str) -> list[dict[str, Any]]:
    """Rows of a verl-schema parquet held in ``data``, validated by ``validate_verl_rows``.

    Anything that is not a readable parquet (a CSV, random bytes, an empty
    file) is a ``DataError`` naming ``source``, not a raw pyarrow error.
    """
    import pyarrow as pa  # pyarrow: `dcgrpo submit` runs without it
    import pyarrow.parquet as pq  # pyarrow: `dcgrpo submit` runs without it

    if not data:
        raise DataError(f"{source}: empty file (0 bytes), expected a parquet file")
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        why = str(exc).replace("Could not open Parquet input source '<Buffer>': ", "")  # names our buffer, not the file
        raise DataError(f"{source}: not a readable parquet file ({why})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing} (expected verl's math schema: "
            f"data_source, prompt, ability, reward_model, extra_info; got {table.column_names})"
        )
    return validate_verl_rows(table.to_pylist(), source)


def prompt_lengths(rows: list[Mapping[str, Any]], tokenizer) -> list[int]:
    """Tokens of each row's chat-formatted prompt, as both engines see it (the template plus its assistant
    opener, no extra special tokens)."""
    texts = [tokenizer.apply_chat_template(list(r["prompt"]), tokenize=False, add_generation_prompt=True) for r in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def check_prompt_lengths(rows: list[Mapping[str, Any]], tokenizer, limit: int, source: str) -> None:
    """``DataError`` naming ``source``, the rows and their lengths if a prompt exceeds ``data.max_prompt_length``:
    before any engine starts, not as the engine's refusal mid-round."""
    over = [(i, n) for i, n in enumerate(prompt_lengths(rows, tokenizer)) if n > limit]
    if over:
        shown = ", ".join(f"row {i}: {n} tokens" for i, n in over[:5])
        raise DataError(
            f"{source}: {len(over)} of {len(rows)} prompts are longer than data.max_prompt_length={limit} ({shown}"
            f"{', ...' if len(over) > 5 else ''}); prepare the data with this model's config (dcgrpo prepare drops "
            "them) or raise data.max_prompt_length"
        )
