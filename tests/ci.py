"""Tests that need external tools (espeak-ng, podman, ...) or rights (mounting a tmpfs): skipped where they are
missing, FAILED under CI=true, since `.ci/run` installs every tool and runs as root."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tools(*tools: str, hint: str) -> None:
    """Skip (fail under CI=true) when any of `tools` is not on PATH; `hint` says how to install them."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} ({hint})")


def unavailable(message: str) -> None:
    """What a test does when the machine lacks what it needs: skip, or fail under CI=true (where `.ci/run` has
    installed and allowed everything)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
