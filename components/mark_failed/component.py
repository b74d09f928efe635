from kfp.dsl import PipelineTaskFinalStatus


def mark_failed(mlflow_uri: str, kfp_run_id: str, status: PipelineTaskFinalStatus):
    """Exit handler: when the pipeline failed, mark its MLflow runs FAILED."""
    from dcgrpo.stages.publish import mark_failed_step  # inside: KFP runs only the function body

    mark_failed_step(mlflow_uri, kfp_run_id, status.state, status.error_message)
