"""The `export_fp8` component (README.md beside this file)."""

from .component import export_fp8

__all__ = ["export_fp8"]
