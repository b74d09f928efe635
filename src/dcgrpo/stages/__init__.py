"""The driver layer: composes the stages (data, model, run, round, export, evaluate, register, promote); the CLI, the demo and every component call it."""
