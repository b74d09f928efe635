def promote(preset: str, overrides: list, mlflow_uri: str, model_name: str, version: str, force: bool) -> str:
    """Move alias `champion` to ``version`` (one alias move, after all checks)."""
    from dcgrpo.stages.publish import promote_step  # inside: KFP runs only the function body

    return promote_step(preset, overrides, mlflow_uri, model_name, version, force)
