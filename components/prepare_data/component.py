from typing import NamedTuple

from kfp.dsl import Dataset, Output


def prepare_data(
    preset: str,
    overrides: list,
    data_uri: str,
    model_uri: str,
    mlflow_uri: str,
    kfp_run_id: str,
    rounds: int,
    model_name: str,
    max_rounds: int,
    dataset: Output[Dataset],
) -> NamedTuple("RunParameters", [("rounds", int), ("model_name", str), ("round_pod", str)]):
    """Resolve the run's parameters (0 rounds / empty model name = the preset's; more rounds than compiled in
    fail here, before any GPU pod; ``round_pod`` picks the GPU or the launcher round task), then prepare the training data: DAPO-Math-17K (or any prepared parquet)
    from ``data_uri``, or the synthetic arithmetic task when it is empty."""
    from dcgrpo.stages.parameters import resolve_run_parameters
    from dcgrpo.steps import prepare_data_step

    resolved = resolve_run_parameters(preset, overrides, rounds, model_name, max_rounds)
    prepared = prepare_data_step(preset, overrides, data_uri, dataset.path, mlflow_uri, kfp_run_id, model_uri)
    dataset.metadata.update(prepared)
    return resolved
