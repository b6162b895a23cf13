"""Tests that need external tools (espeak-ng, podman, ...): skipped where a tool is missing, FAILED under CI=true,
since `.ci/run` installs every one of them."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tools(*tools: str, hint: str) -> None:
    """Skip (fail under CI=true) when any of `tools` is not on PATH; `hint` says how to install them."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"missing {', '.join(missing)} ({hint})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
