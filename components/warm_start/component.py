from kfp.dsl import Dataset, Input, Model, Output


def warm_start(
    preset: str, overrides: list, model_uri: str, dataset: Input[Dataset], model: Output[Model], kfp_run_id: str = ""
):
    """The base policy: the model at ``model_uri``, or a tiny model with an SFT warm start (on a cluster the
    artifact references the weights on the model-cache or checkpoint volume)."""
    from dcgrpo.stages.model import warm_start_step  # inside: KFP runs only the function body

    model.metadata.update(warm_start_step(preset, overrides, model_uri, dataset.path, model.path, kfp_run_id))
