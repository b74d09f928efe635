from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output, OutputPath


def evaluate(
    preset: str,
    overrides: list,
    mlflow_uri: str,
    dataset: Input[Dataset],
    model: Input[Model],
    fp8_model: Input[Model],
    metrics: Output[Metrics],
    report: Output[HTML],
    reference: OutputPath(dict),
) -> float:
    """avg@k per benchmark with the deploy engine on the FP8 export; returns the gate metric. ``reference``:
    where the evaluated models are (``dcgrpo.model_refs.model_reference``), what select_best and register_model take."""
    import json  # inside: KFP runs only the function body

    from dcgrpo.model_refs import model_reference  # inside: KFP runs only the function body
    from dcgrpo.stages.evaluate import evaluate_step  # inside: KFP runs only the function body

    result = evaluate_step(
        preset, overrides, mlflow_uri, dataset.path, dict(model.metadata), model.path, fp8_model.path, report.path
    )
    for key, value in result.scalars.items():
        metrics.log_metric(key, value)
    meta = dict(model.metadata) | result.reference_meta  # the eval results travel on to register_model
    with open(reference, "w") as f:
        json.dump(model_reference(model.uri, model.path, meta, fp8_model.uri), f)
    return result.gate_value
