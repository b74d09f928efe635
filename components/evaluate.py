from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output


def evaluate(
    preset: str,
    overrides: list,
    mlflow_uri: str,
    dataset: Input[Dataset],
    model: Input[Model],
    fp8_model: Input[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> float:
    """avg@k per benchmark with the deploy engine on the FP8 export; returns the gate metric."""
    from dcgrpo.steps import evaluate_step

    scalars, gate_value = evaluate_step(
        preset, overrides, mlflow_uri, dataset.path, dict(model.metadata), model.path, fp8_model.path, report.path
    )
    for key, value in scalars.items():
        metrics.log_metric(key, value)
    return gate_value
