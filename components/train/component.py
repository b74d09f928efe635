from kfp.dsl import Dataset, Input, Metrics, Model, Output


def train(
    preset: str,
    overrides: list,
    method: str,
    rounds: int,
    mlflow_uri: str,
    kfp_run_id: str,
    dataset: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Every round of one method (DC-GRPO or a baseline) from the warm start, in one MLflow run: the single-machine
    loop, or verl single-node, in this GPU pod (``dcgrpo.stages.train.train_step``). A retried or evicted task
    resumes from the newest complete checkpoint on the checkpoint volume; no point is logged twice."""
    from dcgrpo.stages.train import train_step  # inside: KFP runs only the function body

    meta, scalars = train_step(preset, overrides, method, rounds, mlflow_uri, kfp_run_id, dataset.path,
                               base_model.path, model.path)  # fmt: skip
    model.metadata.update(meta)
    for key, value in scalars.items():
        metrics.log_metric(key, value)


def train_launcher(
    preset: str,
    overrides: list,
    method: str,
    rounds: int,
    mlflow_uri: str,
    kfp_run_id: str,
    dataset: Input[Dataset],
    base_model: Input[Model],
    model: Output[Model],
    metrics: Output[Metrics],
):
    """The same training with ``train.backend=verl`` and ``verl.launch=rayjob``: this pod only submits and follows
    the one RayJob (all rounds) that holds the GPUs, so it runs on the light image without a GPU; a retried task
    re-attaches to that RayJob. A component of its own name, so the compiled YAML gives it its own executor and
    pod size; the body is ``train``'s (the images install ``dcgrpo.components``)."""
    from dcgrpo.components.train.component import train as run_train  # inside: KFP runs only the function body

    run_train(preset, overrides, method, rounds, mlflow_uri, kfp_run_id, dataset, base_model, model, metrics)
