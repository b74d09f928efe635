from typing import NamedTuple

from kfp.dsl import Input, Model


def register_model(
    preset: str,
    overrides: list,
    mlflow_uri: str,
    model_name: str,
    model: Input[Model],
    fp8_model: Input[Model],
) -> NamedTuple("Registered", [("version", str), ("passes_gate", bool), ("reason", str)]):
    """Register the FP8 (and bf16) model as MLflow versions, alias `challenger`,
    and evaluate the promotion gate against the current champion."""
    from dcgrpo.steps import register_step

    return register_step(preset, overrides, mlflow_uri, model_name, dict(model.metadata), model.path, fp8_model.path)
