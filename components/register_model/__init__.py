"""The `register_model` component (README.md beside this file)."""

from .component import register_model

__all__ = ["register_model"]
