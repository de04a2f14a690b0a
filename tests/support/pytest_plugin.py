"""pytest plugin (loaded from pyproject): the repository root is a ComfyUI custom-node package whose __init__.py needs ComfyUI's
`comfy_api`; collect it as a plain directory so pytest never imports it outside ComfyUI."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
