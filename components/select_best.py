from typing import NamedTuple

from kfp.dsl import Input, Model, Output


def select_best(
    preset: str,
    overrides: list,
    methods: list,
    gate_values: list,
    models: Input[list[Model]],
    fp8_models: Input[list[Model]],
    best_model: Output[Model],
    best_fp8_model: Output[Model],
) -> NamedTuple("Best", [("method", str), ("gate_value", float)]):
    """Pick the method with the highest gate metric among those within the discrepancy budget."""
    from dcgrpo.steps import select_best_step

    return select_best_step(preset, overrides, methods, gate_values, models, fp8_models, best_model, best_fp8_model)
