"""The `evaluate` component (README.md beside this file)."""

from .component import evaluate

__all__ = ["evaluate"]
