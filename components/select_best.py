from typing import NamedTuple

from kfp.dsl import Input, Model, Output


def select_best(
    methods: list,
    gate_values: list,
    models: Input[list[Model]],
    fp8_models: Input[list[Model]],
    best_model: Output[Model],
    best_fp8_model: Output[Model],
) -> NamedTuple("Best", [("method", str), ("gate_value", float)]):
    """Pick the method with the highest gate metric (ties: the earlier method)."""
    from dcgrpo.steps import select_best_step

    return select_best_step(methods, gate_values, models, fp8_models, best_model, best_fp8_model)
