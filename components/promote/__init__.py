"""The `promote` component (README.md beside this file)."""

from .component import promote

__all__ = ["promote"]
