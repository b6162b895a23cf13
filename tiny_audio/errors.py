"""Errors a user can cause: the CLI prints them as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing token, unreadable input). Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The experiment configuration is invalid."""
