"""Secrets out of logs and saved files: known secret values, Hub-token-shaped strings, and keys that name a secret.

Settings are never redacted. A key's value is hidden only when the key NAMES a secret (`HF_TOKEN`, `token`,
`WANDB_API_KEY`, `password`, ...); a setting that merely ends in "token" (`model.audio_token`, `max_new_tokens`,
a tokenizer's `pad_token`) keeps its value, so a saved config reloads as it was written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

REDACTED = "<redacted>"
# Hub user tokens look like hf_XXXX (30+ characters): hidden even when nobody told us the value.
_HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
# Key names that hold a secret: `token` itself, the Hub's token variables, and anything ending in api_key,
# secret, password or authorization.
_SECRET_KEY = re.compile(
    r"^(?:token|(?:hf|hub|access|auth|bearer|refresh)_token|hugging_?face_hub_token)$"
    r"|(?:^|_)(?:api_?key|secret|password|authorization)$",
    re.IGNORECASE,
)


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a secret (`HF_TOKEN`, `api_key`), as opposed to a setting (`audio_token`)."""
    return _SECRET_KEY.search(key) is not None


def redact(value: T, *, secrets: Iterable[str | None] = ()) -> T:
    """A copy of `value` (str, or dicts/lists/tuples of them) with every secret replaced by `<redacted>`.

    Removed: the given secret values wherever they occur, anything shaped like a Hub token (`hf_...`), and the
    values of keys that name a secret (see `is_secret_key`).
    """
    known = sorted({s for s in secrets if s}, key=len, reverse=True)
    return _redact(value, known)


def _redact(value: Any, known: list[str]) -> Any:
    if isinstance(value, str):
        for secret in known:
            value = value.replace(secret, REDACTED)
        return _HUB_TOKEN.sub(REDACTED, value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_key(k) and v else _redact(v, known))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(v, known) for v in value)
    return value


class RedactFilter(logging.Filter):
    """A logging filter that removes secrets from every record's message (attach it to the handlers)."""

    def __init__(self, *, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, secrets=self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True
