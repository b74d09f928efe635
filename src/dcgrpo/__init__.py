"""dcgrpo: Discrepancy-Constrained GRPO (arXiv 2606.08779) as an MLOps workflow."""

__version__ = "0.1.0"
