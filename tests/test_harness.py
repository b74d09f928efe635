"""benchmarks/harness.py, the plumbing every study shares: the resumable row cache, the worker per seed, intervals.

The workers here are a few lines of Python written to tmp_path (no torch, no vLLM): each counts the runs it
trains in a file, so a test can see what a second pass recomputes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402

WORKER = """
import argparse, json, sys
sys.path.insert(0, {bench!r})
from harness import add_worker_args, emit_row
ap = argparse.ArgumentParser()
add_worker_args(ap)
ap.add_argument("--fail-on")
ap.add_argument("--count")
a = ap.parse_args()
for r in json.loads(a.runs):
    if r["key"] == a.fail_on:
        print("boom", file=sys.stderr)
        sys.exit(3)
    with open(a.count, "a") as f:
        f.write(f"{{r['key']}} {{a.seed}}\\n")
    print("noise without a newline", end="")  # a library printing to stdout must not hide the row
    emit_row({{"key": r["key"], "seed": a.seed, "acc": 0.5 + a.seed}})
"""
RUNS = [{"key": "grpo"}, {"key": "dc-grpo"}, {"key": "grpo"}]  # a run shared by two rows is trained once


@pytest.fixture
def worker(tmp_path):
    script = tmp_path / "study.py"
    script.write_text(WORKER.format(bench=str(Path(harness.__file__).parent)))
    return script


def _key(row: dict) -> tuple[str, int]:
    return row["key"], row["seed"]


def _fill(cache, worker, seed, count, fail_on=""):
    return harness.fill_cache(cache, worker, seed, RUNS, lambda r: r["key"], [f"--count={count}", f"--fail-on={fail_on}"],
                              "study worker")  # fmt: skip


def test_cache_resumes_a_second_pass_computes_nothing(tmp_path, worker):
    count = tmp_path / "trained.txt"
    cache = harness.RowCache(tmp_path / "rows.jsonl", _key)
    for seed in (0, 1):
        assert [r["key"] for r in _fill(cache, worker, seed, count)] == ["grpo", "dc-grpo"]
    assert count.read_text().splitlines() == ["grpo 0", "dc-grpo 0", "grpo 1", "dc-grpo 1"]
    again = harness.RowCache(tmp_path / "rows.jsonl", _key)  # a new driver process reads the file
    assert set(again.rows) == {("grpo", 0), ("dc-grpo", 0), ("grpo", 1), ("dc-grpo", 1)}
    assert again.rows["grpo", 1]["acc"] == 1.5
    for seed in (0, 1):
        assert _fill(again, worker, seed, count) == []
    assert len(count.read_text().splitlines()) == 4  # no worker ran


def test_a_line_cut_short_is_skipped_with_a_warning_and_recomputed(tmp_path, worker):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"key": "grpo", "seed": 0, "acc": 0.5}) + '\n{"key": "dc-grpo", "seed": 0, "ac')
    with pytest.warns(UserWarning, match=r"rows.jsonl:2: skipped a row cut short"):
        cache = harness.RowCache(path, _key)
    assert list(cache.rows) == [("grpo", 0)]
    count = tmp_path / "trained.txt"
    assert [r["key"] for r in _fill(cache, worker, 0, count)] == ["dc-grpo"]  # only the lost row is trained again
    with pytest.warns(UserWarning):  # the cut line stays in the file, and is skipped again
        reread = harness.RowCache(path, _key)
    assert set(reread.rows) == {("grpo", 0), ("dc-grpo", 0)}  # the new row did not glue onto the cut one


def test_a_failed_worker_exits_non_zero_naming_its_seed_and_keeps_earlier_rows(tmp_path, worker):
    cache = harness.RowCache(tmp_path / "rows.jsonl", _key)
    with pytest.raises(SystemExit) as err:
        _fill(cache, worker, 2, tmp_path / "trained.txt", fail_on="dc-grpo")
    assert err.value.code != 0  # SystemExit(str): the interpreter prints it and exits 1
    assert "study worker for seed 2 failed (rc 3)" in str(err.value) and str(cache.path) in str(err.value)
    assert list(harness.RowCache(tmp_path / "rows.jsonl", _key).rows) == [("grpo", 2)]


def test_run_worker_with_a_log_keeps_the_output_and_quotes_it_on_failure(tmp_path, worker):
    log = tmp_path / "w.log"
    argv = ["--worker", "--seed=0", f"--runs={json.dumps([{'key': 'x'}])}", f"--count={tmp_path / 'c'}"]
    done = harness.run_worker(worker, argv, label="worker x", log=log)
    assert done.rows == [{"key": "x", "seed": 0, "acc": 0.5}] and done.usage.ru_maxrss > 0
    assert "noise without a newline" in log.read_text()
    with pytest.raises(SystemExit, match=r"(?s)worker x failed \(rc 3\); log .*w.log:.*boom"):
        harness.run_worker(worker, [*argv, "--fail-on=x"], label="worker x", log=log)


def test_interval_is_the_student_t_95_half_width():
    m, h = harness.interval([0.80, 0.84, 0.88])
    assert m == pytest.approx(0.84)
    assert h == pytest.approx(4.302653 * 0.04 / 3**0.5, rel=1e-5)  # t_{0.975, 2} * s / sqrt(n)
    assert harness.interval([0.5])[1] != harness.interval([0.5])[1]  # one seed: no interval (nan)


def test_paired_differences_use_only_seeds_both_runs_have():
    rows = {("a", 0): {"acc": 0.9}, ("a", 1): {"acc": 0.8}, ("a", 2): {"acc": 0.7},
            ("b", 0): {"acc": 0.85}, ("b", 1): {"acc": 0.70}}  # fmt: skip
    m, h, n = harness.paired(rows, "a", "b")
    assert n == 2 and m == pytest.approx((0.05 + 0.10) / 2)
    assert h == pytest.approx(12.706205 * 0.0353553 / 2**0.5, rel=1e-4)
    assert harness.paired(rows, "a", "missing")[2] == 0


def test_curve_helpers():
    assert harness.quarter_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], last=False) == 1.5
    assert harness.quarter_mean([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], last=True) == 7.5
    assert harness.quarter_mean([3.0], last=True) == 3.0  # at least one point
    assert harness.nanmean([1.0, float("nan"), 3.0]) == 2.0
    assert harness.nanmean([float("nan")]) != harness.nanmean([float("nan")])
    rows = [{"curve": {"d": [1.0, 2.0]}}, {"curve": {"d": [3.0, 6.0]}}]
    assert harness.mean_curves(rows) == {"d": [2.0, 4.0]}


def test_tables():
    assert harness.md_table(["a", "b"], [["x", 1234.5], ["y", None]]).splitlines() == [
        "| a | b |", "|---|---|", "| x | 1,234 |", "| y | - |"]  # fmt: skip
    assert harness.text_table(["m", "acc"], [["grpo", "0.5"]], [5, 4]).splitlines() == [
        "    m  acc", "----------", " grpo  0.5"]  # fmt: skip
