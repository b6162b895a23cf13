"""Tests that need external tools (espeak-ng, podman, ...): skipped where a tool is missing, FAILED under CI=true,
since `.ci/run` installs every one of them."""

from __future__ import annotations

import os

import pytest


def require_tools(missing: list[str], *, hint: str) -> None:
    """Skip (fail under CI=true) when `missing` names tools the test needs; `hint` says how to install them."""
    if missing:
        message = f"missing {', '.join(missing)} ({hint})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
