"""Kubeflow pipelines of dcgrpo (``dc_grpo.build_pipeline``) and their compiled YAML."""
