"""The mismatch lab's pure parts (benchmarks/lab.py): paired gains across deploy formats and the study plan.

Its intervals and paired differences are the harness's (tests/test_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dcgrpo.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lab  # noqa: E402


def test_gains_are_compared_across_deploy_formats():
    done = {("g", 0): {"acc": 0.80, "acc_start": 0.70}, ("q", 0): {"acc": 0.76, "acc_start": 0.72},
            ("g", 1): {"acc": 0.82, "acc_start": 0.70}, ("q", 1): {"acc": 0.75, "acc_start": 0.70}}  # fmt: skip
    m, _, n = lab.paired_gain(done, "q", "g")
    assert n == 2 and m == pytest.approx(((0.04 - 0.10) + (0.05 - 0.12)) / 2)


@pytest.mark.parametrize("quick", [True, False])
def test_every_run_of_the_plan_is_a_valid_config_and_every_reference_is_in_its_study(quick):
    for study, entries in lab.studies(quick).items():
        labels = [label for label, _, _ in entries]
        assert len(labels) == len(set(labels)), study
        for label, run, ref in entries:
            assert not ref or ref in labels, (study, label, ref)
            cfg = load_config(overrides=[f"method.name={run['method']}", *lab.DEPLOYS[run["deploy"]], *run["extra"]])
            assert cfg.method.name == run["method"]
            want_grid = run["deploy"] if run["deploy"] in ("int4_g32", "int4_g128", "mxfp4", "nvfp4") else "none"
            assert cfg.rollout.weight_grid == want_grid
