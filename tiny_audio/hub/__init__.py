"""Every call to the Hugging Face Hub. Nothing else in the project imports `huggingface_hub` for network I/O: the
checkpoint store, `eval` and `transcribe` go through `HubRepo`, the models through `download_model` /
`download_model_part`, and everything past them sees local paths.

- `repo`:   one repo, every call retried (tiny_audio.retry); the token rule; `check_access` for `check`
- `models`: base models into the Hugging Face cache, with progress and one-line errors
- `parts`:  only some tensors of a checkpoint (the encoder's tower), by HTTP range requests
"""

from tiny_audio.hub.models import download_model, model_size
from tiny_audio.hub.parts import download_model_part, part_size
from tiny_audio.hub.repo import (
    HubRepo,
    bound_http_timeouts,
    check_access,
    describe,
    is_hub_repo,
    is_retryable,
    repo_id_of,
    require_token,
)
from tiny_audio.retry import RetryPolicy

__all__ = [
    "HubRepo",
    "RetryPolicy",
    "bound_http_timeouts",
    "check_access",
    "describe",
    "download_model",
    "download_model_part",
    "is_hub_repo",
    "is_retryable",
    "model_size",
    "part_size",
    "repo_id_of",
    "require_token",
]
