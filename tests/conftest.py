"""Shared fixtures: a real ComfyUI in-process and as a server, with this pack installed.

Both are session-scoped (ComfyUI's import and node init are process-global and take seconds).
"""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.support.comfy_runtime import ComfyServer, InProcessComfy  # noqa: E402
from tests.support.real_weights import shared_model_paths_args  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI imported into the test process (--cpu), pack and test nodes loaded."""
    return InProcessComfy(tmp_path_factory.mktemp("comfy_inprocess"))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """`main.py --cpu --listen 127.0.0.1 --port <free>` with the pack symlinked into custom_nodes."""
    base = tmp_path_factory.mktemp("comfy_server")
    server = ComfyServer(base, extra_args=shared_model_paths_args(base)).start()
    yield server
    server.stop()
