from typing import NamedTuple


def select_best(
    preset: str,
    overrides: list,
    methods: list,
    gate_values: list,
    references: list,
) -> NamedTuple("Best", [("method", str), ("gate_value", float), ("reference", dict)]):
    """Pick the method with the highest gate metric among those within the discrepancy budget.

    Takes each method's model reference (artifact URIs and metadata from evaluate), not its Model
    artifacts: a task downloads every input artifact, and the weights are many GB.
    """
    from dcgrpo.stages.publish import select_best_step  # inside: KFP runs only the function body

    return select_best_step(preset, overrides, methods, gate_values, references)
