"""The driver layer: composes the stages (data, model, run, train, export, evaluate, register, promote).

The CLI subcommands, ``dcgrpo train``, the demo and every KFP component call these functions; nothing else builds a
stage. Each stage rebuilds the one config from ``(preset, overrides)`` when it runs as a pipeline step
(``run.step_config``), so a step fails on a bad value before doing work.
"""
