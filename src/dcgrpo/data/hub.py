"""Data sets from the Hugging Face Hub, as users load them: a dataset id, cached under ``HF_HOME``.

``huggingface_hub`` downloads the dataset repository's data files (parquet / JSONL / JSON) into the
standard hub cache (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``), so a second run, another tool
(``datasets``, ``huggingface-cli download``) and an offline machine (``HF_HUB_OFFLINE=1``) share one
copy. The environment is read at call time, not at import, so a process that sets ``HF_HOME`` or
``HF_HUB_OFFLINE`` after importing dcgrpo is honoured.

Errors are one line (``HubError``) naming the dataset id and how to fix it: an offline cache miss,
an unreachable hub, a repository without a file for the split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dcgrpo.errors import DataError

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")


class HubError(DataError):
    """A Hub dataset cannot be read (names the dataset id and the fix)."""


def cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` uses, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _fetch(repo_id: str, revision: str | None, filename: str | None) -> Path:
    """A file (``filename``) or the data files of the repository's snapshot, local paths in the cache."""
    from huggingface_hub import hf_hub_download, snapshot_download  # huggingface_hub: `dcgrpo submit` runs without it

    kw = dict(repo_type="dataset", revision=revision, cache_dir=cache_dir(), local_files_only=offline())
    where = f"{repo_id}/{filename}" if filename else repo_id
    try:
        if filename:
            return Path(hf_hub_download(repo_id, filename, **kw))
        return Path(snapshot_download(repo_id, allow_patterns=[f"*{s}" for s in DATA_SUFFIXES], **kw))
    except Exception as exc:  # noqa: BLE001  (offline miss, no network, auth, renamed repository)
        if offline():
            raise HubError(
                f"Hugging Face dataset {where} is not in the cache {cache_dir()} and HF_HUB_OFFLINE=1: "
                "download it once with network access (same HF_HOME), or pass a local path or s3:// copy"
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(
            f"cannot download Hugging Face dataset {where} ({type(exc).__name__}: {reason}); "
            "check the id and network access (HF_TOKEN for gated sets), or pass a local path or s3:// copy"
        ) from None


def download_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """One file of a dataset repository, from the cache or the Hub."""
    return _fetch(repo_id, revision, filename)


def split_files(repo_id: str, split: str, revision: str | None = None) -> list[Path]:
    """The data files of one split, in the Hub's own naming convention.

    A file belongs to ``split`` when a folder of its path is named ``split`` or its name starts with
    ``split`` followed by ``.``, ``-`` or ``_`` (``test.jsonl``, ``data/train-00000-of-00001.parquet``).
    A repository with a single data file serves every split.
    """
    root = _fetch(repo_id, revision, None)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
    if not files:
        raise HubError(f"Hugging Face dataset {repo_id}: no parquet/JSONL data files in {root}")

    def in_split(p: Path) -> bool:
        rel = p.relative_to(root)
        return split in rel.parts[:-1] or any(rel.name.startswith(split + sep) for sep in ".-_")

    chosen = [p for p in files if in_split(p)] or (files if len(files) == 1 else [])
    if not chosen:
        names = ", ".join(str(p.relative_to(root)) for p in files)
        raise HubError(f"Hugging Face dataset {repo_id}: no file for split {split!r} among {names}")
    return chosen


def read_records(path: Path) -> list[dict]:
    """Rows of a parquet, JSONL or JSON (a list of objects) file; a bad file or line is named."""

    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq  # pyarrow: `dcgrpo submit` runs without it

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
    except Exception as exc:  # noqa: BLE001  (truncated download, not parquet, not UTF-8)
        raise HubError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise HubError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HubError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
    return rows
