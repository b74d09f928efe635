"""The `select_best` component (README.md beside this file)."""

from .component import select_best

__all__ = ["select_best"]
