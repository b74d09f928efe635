from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train_round(
    preset: str,
    overrides: list,
    method: str,
    round_index: int,
    rounds: int,
    mlflow_uri: str,
    kfp_run_id: str,
    dataset: Input[Dataset],
    model_in: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """One DC-GRPO (or baseline) round resuming ``model_in``'s checkpoint: the single-machine loop in this pod,
    or verl (a RayJob, or in this pod) when ``train.backend=verl`` (``dcgrpo.steps.train_round_step``).

    The pipeline schedules round tasks only up to ``rounds`` (one If/Elif/Else branch per count in
    ``pipelines/dc_grpo.py``), so one compiled pipeline serves any count up to the number compiled in.
    """
    from dcgrpo.steps import train_round_step

    meta, scalars = train_round_step(
        preset, overrides, method, round_index, rounds, mlflow_uri, kfp_run_id,
        dataset.path, model_in.path, dict(model_in.metadata), model.path,
    )  # fmt: skip
    model.metadata.update(meta)
    for key, value in scalars.items():
        metrics.log_metric(key, value)


def train_round_launcher(
    preset: str,
    overrides: list,
    method: str,
    round_index: int,
    rounds: int,
    mlflow_uri: str,
    kfp_run_id: str,
    dataset: Input[Dataset],
    model_in: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """The same round with ``train.backend=verl`` and ``verl.launch=rayjob``: this pod only submits and follows
    the RayJob that holds the GPUs, so it runs on the light image without a GPU (issue 12, point 9).

    A component of its own name, not a second ``train_round``, so the compiled YAML gives it its own executor
    and pod size; the body is ``train_round``'s (the images install ``dcgrpo.components``).
    """
    from dcgrpo.components.train_round import train_round as run_round

    run_round(preset, overrides, method, round_index, rounds, mlflow_uri, kfp_run_id, dataset, model_in, model,
              metrics)  # fmt: skip
