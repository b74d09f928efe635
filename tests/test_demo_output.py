"""What a newcomer reads (issue 27): the demo's console filter, its summary's reasons, the MLflow UI command it
prints, and the training-curve plot's panels. Pure functions on made-up inputs; the demo itself runs in
tests/test_pipeline_local.py."""

import io
import shlex

import pytest

from dcgrpo.config import load_config
from dcgrpo.demo import _not_selected, mlflow_ui_command
from dcgrpo.pipeline import _TaskLogFilter
from dcgrpo.plots import _series, curve_panels, plot_curves


def test_task_log_filter_drops_the_executor_input_json_and_keeps_the_rest():
    out = io.StringIO()
    f = _TaskLogFilter(out)
    f.write("    [KFP Executor 2026 INFO]: Looking for component `x` in ...\n")
    f.write('    [KFP Executor 2026 INFO]: Got executor_input:\n    {\n        "inputs": {\n')
    f.write('            "a": 1\n        }\n    }\n    step 1/8: reward 0.5\n')
    f.write("    }\n")  # a brace after the JSON ended is ordinary output
    f.write("tail without newline")
    f.flush()
    assert out.getvalue() == "    step 1/8: reward 0.5\n    }\ntail without newline"


def _row(method, gate, d, version="-", status="FINISHED"):
    return {"method": method, "gate": gate, "discrepancy": d, "version": version, "status": status}


def test_a_method_that_lost_on_a_tie_is_told_so():
    cfg = load_config()
    chosen = _row("grpo", 0.6875, 3.0e-4, version="1")
    why = _not_selected(_row("dc-grpo", 0.6875, 3.3e-4), chosen, cfg)
    assert "a tie on eval/synthetic/avg_1 (0.6875 each)" in why and "lower mean d" in why
    assert "0.5 < grpo's 0.6875" in _not_selected(_row("dc-grpo", 0.5, 3.3e-4), chosen, cfg)
    assert "outside the limit" in _not_selected(_row("dc-grpo", 0.9, 5e-3), chosen, cfg)
    assert "FAILED" in _not_selected(_row("dc-grpo", float("nan"), 1e-4, status="FAILED"), chosen, cfg)


def test_the_mlflow_ui_command_shows_artifacts_from_any_directory(tmp_path):
    argv = shlex.split(mlflow_ui_command(tmp_path / "outputs"))
    assert argv[0].startswith("/") and argv[0].endswith("/mlflow") and argv[1] == "ui"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/outputs/mlflow/mlflow.db"
    assert argv[argv.index("--artifacts-destination") + 1] == f"{tmp_path}/outputs/mlflow/artifacts"


HISTORY = [{"step": 0, "val/accuracy": 0.75}] + [
    {"step": s, "dc/lambda": 0.0, "dc/discrepancy_mean": 3e-4, "dc/discrepancy_p99": 2e-3, "reward/mean": 0.6}
    for s in (1, 2, 3)
]


def test_curves_draw_measured_points_only():
    assert _series(HISTORY, "reward/mean") == ([1, 2, 3], [0.6, 0.6, 0.6])  # step 0 measured only val/accuracy
    assert _series(HISTORY, "val/accuracy") == ([0], [0.75])


@pytest.mark.parametrize(
    "method, panels, eps",
    [
        ("grpo", ["discrepancy", "reward"], False),  # no lambda panel, no budget line: neither applies
        ("tis", ["discrepancy", "reward"], False),
        ("dual-grpo", ["lambda", "discrepancy", "reward"], False),  # a fixed lambda: no budget to meet
        ("dc-grpo", ["lambda", "discrepancy", "reward"], True),
    ],
)
def test_curves_show_lambda_and_eps_only_where_they_apply(method, panels, eps, tmp_path):
    assert curve_panels(HISTORY, 3e-4, method) == (panels, eps)
    assert plot_curves(HISTORY, tmp_path / f"{method}.png", 3e-4, method).stat().st_size > 0
