"""The `mark_failed` component (README.md beside this file)."""

from .component import mark_failed

__all__ = ["mark_failed"]
