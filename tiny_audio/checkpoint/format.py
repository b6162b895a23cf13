"""The on-disk format of one checkpoint's resume files: writing them, verifying them, reading them back.

    last-checkpoint/
        projector.safetensors   optimizer.pt   scheduler.pt   rng.safetensors   rng.json
        train_state.json   data_state.json   config.json   manifest.json (names, sizes, sha256)
        ranks.json   (several processes: every rank's data position and Python/numpy RNG; their torch
                      RNG states are in rng.safetensors as rank<r>.torch_cpu / rank<r>.cuda_<i>)

Everything is plain data (safetensors, JSON, tensors-only torch files read with weights_only), so a checkpoint
from a Hub repo cannot run code when loaded. The manifest is written last: a checkpoint without one, or with a
file of another size or sha256, is refused with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tiny_audio.config import PROJECTOR_SETTINGS
from tiny_audio.errors import UserError
from tiny_audio.hub import describe
from tiny_audio.model.lora import has_adapters, load_adapters, save_adapters
from tiny_audio.redact import redact

log = logging.getLogger(__name__)

RESUME_DIR = "last-checkpoint"

MANIFEST = "manifest.json"

PROJECTOR_FILE = "projector.safetensors"

MODEL_CONFIG_FILE = "tiny_audio_config.json"

RANKS_FILE = "ranks.json"

# Settings that change the projector's parameters or the models it sits between: a checkpoint trained
# with other values cannot be resumed.
COMPATIBILITY_KEYS = (
    ("model", "encoder_id"),
    ("model", "encoder_type"),
    ("model", "decoder_id"),
    ("projector", "type"),
    ("projector", "stack"),
    ("projector", "hidden_dim"),
    ("projector", "num_experts"),
    ("projector", "router_hidden_dim"),
    ("projector", "match_embedding_rms"),
    ("lora", "enabled"),
    ("lora", "rank"),
    ("lora", "target_modules"),
)

START_FRESH = "to start fresh set training.resume=false, or use a new training.hub_model_id / OUTPUT_DIR"


def write_checkpoint(
    directory: Path,
    *,
    projector: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None,
    train_state: dict[str, Any],
    data_state: dict[str, Any],
    config: dict[str, Any],
    export_files: dict[str, Path] | None = None,
    ranks: list[RankState] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    decoder: torch.nn.Module | None = None,
) -> None:
    """Write everything resuming needs into `directory` (created), ending with its manifest.

    projector: the projector module only (its whole state_dict: the trainable weights, never the frozen
    encoder/decoder). train_state: JSON (step, tracker_run_id, metrics, ...). data_state: the data pipeline's
    JSON state. config: the resolved config dict; secrets are scrubbed before writing. export_files: extra
    files copied in as {name in the checkpoint: source path}. ranks: on a multi-process run, every rank's
    `RankState` (gathered to the main process, rank order); None is this process alone. optimizer_state:
    written instead of `optimizer.state_dict()` (DeepSpeed: every rank's ZeRO partition). decoder: given when it
    carries LoRA adapters, whose weights go to adapters.safetensors.
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_projector(projector, directory / PROJECTOR_FILE)
    if decoder is not None and has_adapters(decoder):
        save_adapters(decoder, directory)
    save_torch(optimizer.state_dict() if optimizer_state is None else optimizer_state, directory / "optimizer.pt")
    if scheduler is not None:
        save_torch(scheduler.state_dict(), directory / "scheduler.pt")
    _write_rng(directory, ranks=ranks)
    write_json(directory / "train_state.json", redact(train_state))
    write_json(directory / "data_state.json", ranks[0].data if ranks else data_state)
    if ranks and len(ranks) > 1:
        write_json(directory / RANKS_FILE, {"world_size": len(ranks), "data": [r.data for r in ranks]})
    write_json(directory / "config.json", redact(config))
    for name, source in (export_files or {}).items():
        shutil.copyfile(source, directory / name)
    write_manifest(directory, step=int(train_state.get("step", 0)))


def read_checkpoint(
    directory: Path,
    *,
    projector: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    config: dict[str, Any] | None = None,
    rank: int = 0,
    decoder: torch.nn.Module | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate `directory` and restore projector weights, optimizer, scheduler and RNG states from it (and the
    decoder's LoRA adapters, when `decoder` carries them).

    config: the current run's resolved config; when given, a checkpoint trained with an incompatible one
    (other models, other projector shape) is refused with a UserError saying how to start fresh.
    rank: this process's rank; it gets that rank's RNG states and data position when the checkpoint holds them
    (a rank the checkpoint's run did not have keeps its seeded RNG and starts from the last saved rank's
    data position, which the data stream re-splits for the new world size).
    Returns (train_state, data_state). Raises UserError naming the file when anything is missing or corrupt.
    """
    verify_checkpoint(directory)
    if config is not None:
        check_compatible(stored=read_json(directory / "config.json"), current=config, where=str(directory))
    try:
        # load_state_dict copies into the parameters in place (under DeepSpeed ZeRO they are views into a
        # flat buffer, which safetensors' load_model refuses)
        weights = load_file(str(directory / PROJECTOR_FILE))
        missing, unexpected = unwrap(projector).load_state_dict(weights, strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise UserError(
            f"{directory / PROJECTOR_FILE} does not fit this projector ({describe(exc)}); {START_FRESH}"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{directory / PROJECTOR_FILE} does not fit this projector (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}); {START_FRESH}"
        )
    if decoder is not None and has_adapters(decoder):
        load_adapters(decoder, directory)
    if optimizer is not None:
        optimizer.load_state_dict(load_torch(directory / "optimizer.pt"))
    if scheduler is not None:
        scheduler.load_state_dict(load_torch(directory / "scheduler.pt"))
    _restore_rng(directory, rank=rank)
    data_state = read_json(directory / "data_state.json")
    if (directory / RANKS_FILE).is_file():
        per_rank = read_json(directory / RANKS_FILE)["data"]
        data_state = per_rank[min(rank, len(per_rank) - 1)]
    return read_json(directory / "train_state.json"), data_state


def write_manifest(directory: Path, *, step: int) -> dict[str, Any]:
    """Record every file under `directory` (name, size, sha256) in manifest.json: the completeness check."""
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }
    manifest = {"format": 1, "step": step, "files": files}
    write_json(directory / MANIFEST, manifest)
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check every file the manifest lists is present, of its size and sha256; the manifest. UserError if not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {directory} is incomplete: {manifest_path} is missing; {START_FRESH}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"checkpoint manifest {manifest_path} is corrupt; {START_FRESH}") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"checkpoint {directory} is incomplete: {path} is missing; {START_FRESH}")
        size = path.stat().st_size
        if size != expected["size"]:
            raise UserError(
                f"checkpoint file {path} is truncated or corrupt ({size} bytes, expected {expected['size']}); "
                f"{START_FRESH}"
            )
        if _sha256(path) != expected["sha256"]:
            raise UserError(f"checkpoint file {path} is corrupt (sha256 differs from the manifest); {START_FRESH}")
    return manifest


def check_compatible(*, stored: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """UserError when a stored config differs from the current one in a setting that shapes the model."""
    differences = []
    kind = current.get("projector", {}).get("type")
    read = {"type", "match_embedding_rms", *PROJECTOR_SETTINGS.get(kind, ())}
    for section, key in COMPATIBILITY_KEYS:
        if section == "projector" and key not in read:
            continue  # a setting this projector type does not read cannot make its weights differ
        old = stored.get(section, {}).get(key)
        new = current.get(section, {}).get(key)
        if old != new:
            differences.append(f"{section}.{key}: checkpoint {old!r}, this run {new!r}")
    if differences:
        raise UserError(
            f"the checkpoint in {where} was trained with another model or projector "
            f"({'; '.join(differences)}); {START_FRESH}"
        )


def save_projector(projector: torch.nn.Module, path: Path) -> None:
    """The projector's weights as safetensors, each tensor copied out on its own: under DeepSpeed ZeRO the
    parameters are views into one flat buffer, which safetensors refuses to save as they are."""
    weights = unwrap(projector).state_dict()
    state = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in weights.items()}
    save_file(state, str(path), metadata={"format": "pt"})


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper: its weights are saved without the `_orig_mod.` prefix, so a
    checkpoint loads the same into a compiled or a plain projector."""
    return getattr(module, "_orig_mod", module)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {describe(exc)}") from None


def manifest_step(directory: Path) -> int | None:
    """The step a checkpoint's manifest records, None when there is no readable manifest."""
    try:
        return int(json.loads((directory / MANIFEST).read_text())["step"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_torch(value: Any, path: Path) -> None:
    # through a Python file: a full disk is then an OSError (ENOSPC), where torch.save(value, path) reports
    # only "unexpected pos" from its zip writer
    with path.open("wb") as f:
        torch.save(value, f)


def load_torch(path: Path) -> Any:
    # weights_only: a checkpoint from a Hub repo must not be able to run code when loaded
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {describe(exc)}; {START_FRESH}") from None


@dataclass
class RankState:
    """What one process must save for itself: its RNG states and its data stream's position."""

    rng: dict[str, Any]  # capture_rng()
    data: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) generator states (picklable, for gathering)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch_cpu": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def _write_rng(directory: Path, *, ranks: list[RankState] | None = None) -> None:
    """Python/numpy generator states as JSON, torch CPU/CUDA states as tensors (no pickle either way).

    The top-level entries are rank 0's (this process's when `ranks` is None); with several ranks, each one's
    states are stored too (`ranks` in rng.json, `rank<r>.` tensors).
    """
    states = [r.rng for r in ranks] if ranks else [capture_rng()]
    first = states[0]
    document: dict[str, Any] = {"python": first["python"], "numpy": first["numpy"]}
    tensors = {"torch_cpu": first["torch_cpu"]}
    tensors.update({f"cuda_{i}": t for i, t in enumerate(first["cuda"])})
    if len(states) > 1:
        document["ranks"] = [{"python": st["python"], "numpy": st["numpy"]} for st in states]
        for r, st in enumerate(states):
            tensors[f"rank{r}.torch_cpu"] = st["torch_cpu"]
            tensors.update({f"rank{r}.cuda_{i}": t for i, t in enumerate(st["cuda"])})
    write_json(directory / "rng.json", document)
    save_file({k: v.clone() for k, v in tensors.items()}, str(directory / "rng.safetensors"))


def _restore_rng(directory: Path, *, rank: int = 0) -> None:
    state = read_json(directory / "rng.json")
    tensors = load_file(str(directory / "rng.safetensors"))
    saved_ranks = state.get("ranks")
    prefix = ""
    if saved_ranks is not None:
        if rank >= len(saved_ranks):
            log.warning(
                "checkpoint holds RNG states for %d processes; rank %d keeps its seeded RNG", len(saved_ranks), rank
            )
            return
        state, prefix = saved_ranks[rank], f"rank{rank}."
    elif rank > 0:
        log.warning("checkpoint was saved by one process; rank %d keeps its seeded RNG", rank)
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors[f"{prefix}torch_cpu"])
    cuda_prefix = f"{prefix}cuda_"
    cuda = [
        tensors[k]
        for k in sorted((k for k in tensors if k.startswith(cuda_prefix)), key=lambda k: int(k[len(cuda_prefix) :]))
    ]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    elif cuda and torch.cuda.is_available():
        log.warning(
            "checkpoint has CUDA RNG states for %d devices, this run has %d: not restored",
            len(cuda),
            torch.cuda.device_count(),
        )
