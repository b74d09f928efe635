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
    train_pod: str,
    dataset: Output[Dataset],
) -> NamedTuple("RunParameters", [("rounds", int), ("model_name", str)]):
    """Resolve and check the run's parameters (0 rounds / empty model name = the preset's; a training this package's
    train task cannot run fails here, before any GPU pod), then prepare the training data: DAPO-Math-17K (or any
    prepared parquet) from ``data_uri``, or the synthetic arithmetic task when it is empty."""
    from dcgrpo.stages.data import prepare_data_step  # inside: KFP runs only the function body
    from dcgrpo.stages.parameters import resolve_pipeline_run  # inside: KFP runs only the function body

    resolved = resolve_pipeline_run(preset, overrides, rounds, model_name, train_pod)
    prepared = prepare_data_step(preset, overrides, data_uri, dataset.path, mlflow_uri, kfp_run_id, model_uri)
    dataset.metadata.update(prepared)
    return resolved
