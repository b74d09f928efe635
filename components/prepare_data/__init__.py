"""The `prepare_data` component (README.md beside this file)."""

from .component import prepare_data

__all__ = ["prepare_data"]
