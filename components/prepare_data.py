from kfp.dsl import Dataset, Output


def prepare_data(
    preset: str, overrides: list, data_uri: str, mlflow_uri: str, kfp_run_id: str, dataset: Output[Dataset]
):
    """Prepare the training data: DAPO-Math-17K (or any prepared parquet) from
    ``data_uri``, or the synthetic arithmetic task when it is empty."""
    from dcgrpo.steps import prepare_data_step

    dataset.metadata.update(prepare_data_step(preset, overrides, data_uri, dataset.path, mlflow_uri, kfp_run_id))
