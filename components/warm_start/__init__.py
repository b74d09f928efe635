"""The `warm_start` component (README.md beside this file)."""

from .component import warm_start

__all__ = ["warm_start"]
