"""The one family of errors a user can fix.

Every exception that means "your input, config or environment is wrong" (a bad
config value, a missing or malformed file, a bad dataset row, an unreachable
server, a registry conflict) derives from ``DcgrpoError``. The CLI's single
error boundary (``dcgrpo.cli.main``) prints such an error as one line and
exits 2; anything else is a bug and keeps its traceback.

Messages name what to fix: the file, the row and field, the server, the
config field.
"""

from __future__ import annotations


class DcgrpoError(Exception):
    """A failure caused by input or environment, reported without a traceback (exit 2)."""


class DataError(DcgrpoError, ValueError):
    """A dataset file or row is unusable (names the file, the row index and the field)."""


class ServiceUnavailable(DcgrpoError, ConnectionError):
    """A server the run needs (MLflow, S3, KFP) cannot be reached or refuses us (names the URI)."""
