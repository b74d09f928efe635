from kfp.dsl import OutputPath


def register_model(
    preset: str,
    overrides: list,
    mlflow_uri: str,
    model_name: str,
    reference: dict,
    version: OutputPath(str),
    reason: OutputPath(str),
    force_promotion: bool = False,
) -> bool:
    """Register the FP8 (and bf16) model as MLflow versions, alias `challenger`,
    and evaluate the promotion gate against the current champion; returns whether promote should run
    (the gate passed, or `force_promotion`).

    ``reference`` is select_best's (``dcgrpo.model_refs.model_reference``): on a cluster the versions point at the
    artifact URIs and no weights pass through this pod; under kfp.local the paths are uploaded to MLflow.
    (The gate is the single return value, the version and reason output
    parameters: kfp.local cannot branch on one field of a NamedTuple output.)
    """
    from pathlib import Path  # inside: KFP runs only the function body

    from dcgrpo.stages.publish import register_step  # inside: KFP runs only the function body

    result = register_step(preset, overrides, mlflow_uri, model_name, reference["metadata"], reference["model_uri"],
                           reference["fp8_uri"], force_promotion)  # fmt: skip
    Path(version).write_text(result.version)
    Path(reason).write_text(result.reason)
    return result.passes_gate
