"""Checkpoints in parts, one owner each (the training loop only asks to save and to resume):

- `format`:    what one checkpoint's resume files hold, written, verified (manifest) and read back
- `store`:     local checkpoints (atomic save, rotation, the latest), the backend mirror, the resume handshake
- `uploader`:  the background thread that mirrors each save to the backend
- `backends`:  a Hub repo (`user/name`) or a directory (`file:///abs/path`)
- `run_state`: what the training loop saves and resumes over every process (DeepSpeed partitions included)

One saved checkpoint is a folder shaped like the Hub repo it is pushed to: the loadable model at its root
(`tiny_audio.export` writes it: projector.safetensors, tiny_audio_config.json, tokenizer, feature extractor,
README.md) and `last-checkpoint/` with what resuming needs.
"""

from tiny_audio.checkpoint.format import (
    MANIFEST,
    MODEL_CONFIG_FILE,
    PROJECTOR_FILE,
    RESUME_DIR,
    RankState,
    capture_rng,
    check_compatible,
    manifest_step,
    read_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from tiny_audio.checkpoint.run_state import RunParts, resume_run, save_run
from tiny_audio.checkpoint.store import CHECKPOINTS_DIR, CheckpointStore, find_checkpoint

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "MODEL_CONFIG_FILE",
    "PROJECTOR_FILE",
    "RESUME_DIR",
    "CheckpointStore",
    "RankState",
    "RunParts",
    "capture_rng",
    "check_compatible",
    "find_checkpoint",
    "manifest_step",
    "read_checkpoint",
    "resume_run",
    "save_run",
    "verify_checkpoint",
    "write_checkpoint",
]
