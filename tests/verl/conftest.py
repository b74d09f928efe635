import importlib.util
import os

import pytest


def require_verl() -> None:
    """Skip the module when verl is absent, unless DCGRPO_REQUIRE_VERL=1 (CI's verl run)."""
    if importlib.util.find_spec("verl") is not None:
        return
    if os.environ.get("DCGRPO_REQUIRE_VERL") == "1":
        raise RuntimeError("DCGRPO_REQUIRE_VERL=1 but verl is not installed in this environment")
    pytest.skip("verl is not installed here; these run in .venv-verl (make test)", allow_module_level=True)
