"""Bad data, bad config values and corrupt model files, as a user meets them.

Each case is a real file in tmp_path read by the real reader, or the real
`dcgrpo` CLI in a subprocess: a clear error naming the file, row and field
(exit 2, no traceback), raised before any engine starts, and nothing written.
None of these start vLLM: every check runs before an engine would.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcgrpo.config import RunConfig
from dcgrpo.data import dapo
from dcgrpo.data.synthetic import make_synthetic, read_rows
from dcgrpo.errors import DataError, DcgrpoError

DCGRPO = str(Path(sys.executable).with_name("dcgrpo"))


def run(*args, cwd, timeout=300):
    return subprocess.run([DCGRPO, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def assert_user_error(proc, *needles):
    """Exit 2, one `dcgrpo <cmd>: error:` line naming every needle, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-3000:]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from dcgrpo.models import build_tiny_model

    return build_tiny_model(RunConfig().model, tmp_path_factory.mktemp("tiny"))


# ----------------------------------------------------------------------------- training / held-out parquet rows


def _null_ground_truth(rows):
    rows[3]["reward_model"]["ground_truth"] = None


def _null_prompt(rows):
    rows[1]["prompt"] = None


def _no_messages(rows):
    rows[2]["prompt"] = []


def _blank_content(rows):
    rows[4]["prompt"][0]["content"] = "  "


def _empty_answer(rows):
    rows[0]["reward_model"]["ground_truth"] = ""


@pytest.mark.parametrize(
    "breaks, message",
    [
        (_null_ground_truth, "train.parquet: row 3: reward_model.ground_truth is null"),
        (_null_prompt, "train.parquet: row 1: prompt is null"),
        (_no_messages, "train.parquet: row 2: prompt is empty (no messages)"),
        (_blank_content, "train.parquet: row 4: prompt[0].content is empty"),
        (_empty_answer, "train.parquet: row 0: reward_model.ground_truth is empty"),
    ],
)
def test_read_rows_names_file_row_and_field(tmp_path, breaks, message):
    rows = make_synthetic(6)
    breaks(rows)
    path = write_parquet(tmp_path / "train.parquet", rows)
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value) == f"{path.parent}/{message}"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file (0 bytes)"),
        (b"data_source,prompt,reward_model\nx,What is 1+1?,2\n", "not a readable parquet file"),
        (os.urandom(4096), "not a readable parquet file"),
        ("zero-rows", "no rows"),
        ("wrong-columns", "missing column(s) ['prompt', 'reward_model']"),
    ],
)
def test_unreadable_or_empty_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "train.parquet"
    if content == "zero-rows":
        pq.write_table(pa.Table.from_pylist(make_synthetic(2)).slice(0, 0), path)
    elif content == "wrong-columns":
        write_parquet(path, [{"question": "q", "label": "1"}])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}: {message}"), err.value
    assert "\n" not in str(err.value)


def test_prepare_and_training_apply_the_same_rules(tmp_path):
    """A row `prepare` drops is the row training refuses, with the same reason; what it writes trains."""
    good = [
        {"prompt": [{"content": f"What is {i} + 1?", "role": "user"}],
         "reward_model": {"ground_truth": str(i + 1), "style": "rule"}}
        for i in range(8)
    ]  # fmt: skip
    breaks = [_null_ground_truth, _null_prompt, _no_messages, _blank_content, _empty_answer]
    for i, brk in enumerate(breaks):
        rows = copy.deepcopy(good)
        brk(rows)
        src = write_parquet(tmp_path / f"bad{i}.parquet", rows)
        summary = dapo.prepare_dapo(str(src), str(tmp_path / f"out{i}"))
        assert summary.bad_rows == 1, summary.bad_row_examples
        with pytest.raises(DataError) as err:
            read_rows(src)
        assert str(err.value) == f"{src}: {summary.bad_row_examples[0]}"
        assert len(read_rows(summary.train_path)) == summary.train_rows  # prepare's output is accepted


# ----------------------------------------------------------------------------- the CLI: train, prepare, config


def _train(tmp_path, model, data_path):
    return run(
        "train", "--set", f"model.path={model}", "--set", f"data.train_path={data_path}",
        "--set", f"storage.root={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip


def test_train_refuses_a_null_ground_truth_before_starting(tmp_path, tiny_model):
    rows = make_synthetic(8)
    _null_ground_truth(rows)
    path = write_parquet(tmp_path / "train.parquet", rows)
    assert_user_error(_train(tmp_path, tiny_model, path), f"{path}: row 3: reward_model.ground_truth is null")
    assert not list((tmp_path / "out").rglob("checkpoints"))


@pytest.mark.parametrize("kind", ["zero-rows", "csv"])
def test_train_refuses_an_empty_or_non_parquet_file(tmp_path, tiny_model, kind):
    path = tmp_path / "train.parquet"
    if kind == "zero-rows":
        pq.write_table(pa.Table.from_pylist(make_synthetic(2)).slice(0, 0), path)
    else:
        path.write_text("prompt,answer\nWhat is 1+1?,2\n")
    needle = "no rows" if kind == "zero-rows" else "not a readable parquet file"
    assert_user_error(_train(tmp_path, tiny_model, path), f"{path}: {needle}")


@pytest.mark.parametrize("value, needle", [("-1", "must be >= 0, got -1"), ("many", "expected an integer >= 0")])
def test_prepare_max_bad_rows_must_be_a_count(tmp_path, value, needle):
    src = tmp_path / "in.jsonl"
    src.write_text('{"problem": "What is 1+1?", "answer": "2"}\n')
    proc = run("prepare", "--source", str(src), "--out", str(tmp_path / "out"), "--max-bad-rows", value,
               "--no-track", cwd=tmp_path)  # fmt: skip
    assert_user_error(proc, "--max-bad-rows", needle)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max_bad_rows must be >= 0"):
        dapo.prepare_dapo(str(src), str(tmp_path / "out"), max_bad_rows=-1)


@pytest.mark.parametrize(
    "override, needles",
    [
        ("eval.benchmarks=[aime99]", ["eval.benchmarks", "unknown benchmark 'aime99'", "aime24", "synthetic"]),
        ("eval.gate_metric=eval/foo/avg_1", ["eval.gate_metric", "eval/foo/avg_1", "eval/synthetic/avg_1"]),
        ("eval.k={aime99: 4}", ["eval.k", "unknown benchmark 'aime99'"]),
    ],
)
def test_config_refuses_values_evaluate_cannot_run(tmp_path, override, needles):
    assert_user_error(run("config", "--set", override, cwd=tmp_path, timeout=120), *needles)


# ----------------------------------------------------------------------------- corrupt model files


def _corrupt_copy(src: Path, dest: Path, how: str) -> Path:
    shutil.copytree(src, dest)
    shard = dest / "model.safetensors"
    if how == "truncated":  # a half-finished copy
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.write_bytes(b"<html>404 Not Found</html>" * 40)
    return dest


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_export_of_a_corrupt_shard_names_it_and_writes_nothing(tmp_path, tiny_model, how):
    model = _corrupt_copy(tiny_model, tmp_path / "model", how)
    out = tmp_path / "fp8"
    proc = run("export", "--source", str(model), "--dest", str(out), cwd=tmp_path)
    assert_user_error(proc, f"{model / 'model.safetensors'}: not a readable safetensors file")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists()


def test_engines_refuse_a_corrupt_shard_by_name(tmp_path, tiny_model):
    from dcgrpo.engines.hf_engine import HFEngine
    from dcgrpo.models import load_model_dir

    model = _corrupt_copy(tiny_model, tmp_path / "model", "truncated")
    shard = f"{model / 'model.safetensors'}: not a readable safetensors file"
    with pytest.raises(DcgrpoError, match=shard):
        HFEngine(str(model))
    with pytest.raises(DcgrpoError, match=shard):
        load_model_dir(model, tmp_path / "cache")
    # `dcgrpo evaluate` checks the files before vLLM starts.
    proc = run("evaluate", "--model", str(model), "--benchmarks", "synthetic", "--no-track",
               "--out", str(tmp_path / "eval"), cwd=tmp_path)  # fmt: skip
    assert_user_error(proc, shard)
    assert not (tmp_path / "eval").exists()
