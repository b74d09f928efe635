from kfp.dsl import Input, Model, OutputPath


def register_model(
    preset: str,
    overrides: list,
    mlflow_uri: str,
    model_name: str,
    model: Input[Model],
    fp8_model: Input[Model],
    version: OutputPath(str),
    reason: OutputPath(str),
    force_promotion: bool = False,
) -> bool:
    """Register the FP8 (and bf16) model as MLflow versions, alias `challenger`,
    and evaluate the promotion gate against the current champion; returns whether promote should run
    (the gate passed, or `force_promotion`).

    (The gate is the single return value, the version and reason output
    parameters: kfp.local cannot branch on one field of a NamedTuple output.)
    """
    from pathlib import Path

    from dcgrpo.steps import register_step

    result = register_step(preset, overrides, mlflow_uri, model_name, dict(model.metadata), model.path, fp8_model.path,
                           force_promotion)  # fmt: skip
    Path(version).write_text(result.version)
    Path(reason).write_text(result.reason)
    return result.passes_gate
