from kfp.dsl import Input, Model, Output


def export_fp8(preset: str, overrides: list, model: Input[Model], fp8_model: Output[Model]):
    """Export the trained policy to an FP8 (compressed-tensors) checkpoint vLLM loads."""
    from dcgrpo.stages.evaluate import export_fp8_step  # inside: KFP runs only the function body

    fp8_model.metadata.update(export_fp8_step(preset, overrides, model.path, dict(model.metadata), fp8_model.path))
