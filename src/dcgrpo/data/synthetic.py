"""A synthetic arithmetic task in verl's math parquet schema.

Rows look exactly like prepared DAPO-Math-17K rows, so every consumer (the
built-in loop, verl, evaluation) reads both the same way::

    {"data_source": "synthetic/arith-d1",
     "prompt": [{"role": "user", "content": "What is 12 + 7? ..."}],
     "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "19"},
     "extra_info": {"split": "train", "index": 0, "difficulty": 1,
                    "solution": "12 + 7 = 19. \\boxed{19}"}}

``extra_info.solution`` is the reference completion the SFT warm start
imitates. Difficulty knob (``data.synthetic_difficulty``):

    1  a + b                 a, b in [0, 50)
    2  a + b or a - b        a, b in [0, 100), results >= 0
    3  a + b - c             a, b, c in [0, 100)
    4  a * b + c             a, b in [0, 13), c in [0, 50)
    5  a word problem: has a, buys b, gives away c, shares among k

Deterministic by seed (``random.Random(seed)`` only). The held-out split is
disjoint from the training split by question text.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from dcgrpo import storage
from dcgrpo.data.schema import read_verl_parquet

ABILITY = "math"

# How the answer is asked for; the reward (math-verify) parses either form.
TEMPLATES = {
    "boxed": "{question} Put the final answer in \\boxed{{}}.",
    "dapo": "{question} The last line of your response should be of the form Answer: $Answer.",
}


def _answer_suffix(answer: int, template: str) -> str:
    return f"\\boxed{{{answer}}}" if template == "boxed" else f"Answer: {answer}"


def _problem(rng: random.Random, difficulty: int) -> tuple[str, str, int]:
    """One problem: (question, worked expression, integer answer)."""
    if difficulty == 1:
        a, b = rng.randrange(50), rng.randrange(50)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b
    if difficulty == 2:
        a, b = rng.randrange(100), rng.randrange(100)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", f"{a} + {b} = {a + b}", a + b
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}", a - b
    if difficulty == 3:
        a, b, c = rng.randrange(100), rng.randrange(100), rng.randrange(100)
        c = min(c, a + b)
        return f"What is {a} + {b} - {c}?", f"{a} + {b} = {a + b}, {a + b} - {c} = {a + b - c}", a + b - c
    if difficulty == 4:
        a, b, c = rng.randrange(13), rng.randrange(13), rng.randrange(50)
        return f"What is {a} * {b} + {c}?", f"{a} * {b} = {a * b}, {a * b} + {c} = {a * b + c}", a * b + c
    name = rng.choice(["Tom", "Ana", "Li", "Sam", "Mia", "Ravi"])
    item = rng.choice(["apples", "books", "coins", "pens"])
    k = rng.randrange(2, 5)
    a, b = rng.randrange(5, 40), rng.randrange(0, 30)
    c = rng.randrange(0, a + b)
    total = a + b - c
    total -= total % k  # divisible by k
    c = a + b - total
    q = f"{name} has {a} {item}, buys {b} more, gives away {c} and shares the rest equally among {k} friends. How many {item} does each friend get?"
    work = f"{a} + {b} - {c} = {total}, {total} / {k} = {total // k}"
    return q, work, total // k


def make_synthetic(
    n: int,
    difficulty: int = 1,
    seed: int = 0,
    template: str = "boxed",
    *,
    split: str = "train",
    exclude: set[str] | None = None,
) -> list[dict[str, Any]]:
    """``n`` arithmetic problems as verl-schema rows (see module docstring).

    Args:
        n: number of rows.
        difficulty: 1 (easiest) .. 5.
        seed: the only source of randomness.
        template: ``boxed`` or ``dapo`` (how the answer is requested and written).
        split: written to ``extra_info.split``.
        exclude: question texts to skip (keeps the held-out split disjoint).
    """
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    rng = random.Random(seed)
    exclude = exclude or set()
    rows: list[dict[str, Any]] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(
                f"cannot draw {n} problems of difficulty {difficulty} avoiding {len(exclude)} excluded ones"
            )
        question, work, answer = _problem(rng, difficulty)
        if question in exclude:
            continue
        rows.append(
            {
                "data_source": f"synthetic/arith-d{difficulty}",
                "prompt": [{"role": "user", "content": TEMPLATES[template].format(question=question)}],
                "ability": ABILITY,
                "reward_model": {"style": "rule", "ground_truth": str(answer)},
                "extra_info": {
                    "split": split,
                    "index": len(rows),
                    "difficulty": difficulty,
                    "question": question,
                    "solution": f"{work}. {_answer_suffix(answer, template)}",
                },
            }
        )
    return rows


def synthetic_val_rows(data_cfg) -> list[dict[str, Any]]:
    """The held-out split of ``data_cfg``'s synthetic task (drawn first, with seed + 1)."""
    return make_synthetic(
        data_cfg.synthetic_val_size,
        data_cfg.synthetic_difficulty,
        data_cfg.seed + 1,
        data_cfg.prompt_template,
        split="val",
    )


def write_synthetic_splits(data_cfg, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``val.parquet`` for ``data_cfg`` (a ``DataConfig``).

    The validation split is drawn first (seed + 1) and its questions are
    excluded from training, so held-out accuracy is measured on unseen problems.
    """
    import pandas as pd  # pandas: `dcgrpo submit` runs without it

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    val = synthetic_val_rows(data_cfg)
    seen = {r["extra_info"]["question"] for r in val}
    train = make_synthetic(
        data_cfg.synthetic_train_size,
        data_cfg.synthetic_difficulty,
        data_cfg.seed,
        data_cfg.prompt_template,
        split="train",
        exclude=seen,
    )
    train_path, val_path = out_dir / "train.parquet", out_dir / "val.parquet"
    for rows, path in ((train, train_path), (val, val_path)):
        tmp = path.with_name(f".{path.name}.tmp")
        pd.DataFrame(rows).to_parquet(tmp, index=False)
        tmp.replace(path)  # atomic: a reader never sees half a file
    return train_path, val_path


def read_rows(path: str | Path, endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Read a verl-schema parquet (local or s3://) back into row dicts, every row validated up front.

    The RL loop, the SFT warm start and held-out accuracy all read here, so a
    bad file (not parquet, empty, a null prompt or answer) fails before any
    engine starts, with ``DataError`` naming the file, row and field
    (``dcgrpo.data.schema``: the rules ``dcgrpo prepare`` applies).
    """

    return read_verl_parquet(storage.read_bytes(path, endpoint_url), str(path))
