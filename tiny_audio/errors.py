"""Errors a user can cause: the CLI prints them as one line and exits with their code, no traceback.

Exit code 2: a mistake to fix (config, token, a full or read-only volume, ...). Errors the code causes keep
their traceback (exit 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config, missing token, unreadable input). Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The experiment configuration is invalid."""


class DiskFull(UserError):
    """The volume (or a quota) has no room for what the run must write; the message names the folder, the free
    space and what was needed. Exit code 2: free space or use a larger volume."""
