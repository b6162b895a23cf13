"""Room on the volume: what a run writes, checked against the free space before anything is downloaded.

A run writes three things: the base models into the Hugging Face cache (HF_HOME; GLM-ASR's audio tower only,
and the decoder's files), `training.keep_checkpoints + 1` checkpoints in OUTPUT_DIR/checkpoints (the newest
is written before the oldest is removed), and W&B's offline files and metrics.jsonl. Sizes come from the
Hub's file metadata when it answers, else from a table of the public models' sizes; a checkpoint's size
follows from the projector's parameter count (computed on the meta device, as `check` does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from tiny_audio.config import Config
from tiny_audio.errors import DiskFull, UserError
from tiny_audio.progress import format_bytes
from tiny_audio.space import existing_ancestor, folder_bytes, free_bytes, mount_point, prepare_output_dir, writable

log = logging.getLogger(__name__)

# What `train` downloads of each public model the shipped experiments name, when the Hub cannot be asked: of
# GLM-ASR-Nano-2512 its audio tower's byte range (635M bf16 parameters) and small files; of a decoder its
# bf16 safetensors and tokenizer files.
KNOWN_DOWNLOAD_BYTES = {
    "zai-org/GLM-ASR-Nano-2512": 1_300_000_000,
    "Qwen/Qwen3-0.6B": 1_520_000_000,
    "Qwen/Qwen3-1.7B": 4_080_000_000,
    "Qwen/Qwen3-4B": 8_070_000_000,
}
TOKENIZER_BYTES = 12_000_000
"""A Qwen3 tokenizer's files, copied into every checkpoint (a local decoder's are measured instead)."""
CHECKPOINT_OVERHEAD_BYTES = 200_000
"""A checkpoint's small files: configs, RNG states, data position, manifest, model card."""
# W&B's offline files and metrics.jsonl: per logged step, per evaluation (its examples table), and a base
# for system metrics and logs.
TRACKING_BYTES_PER_LOG = 3_000
TRACKING_BYTES_PER_EVAL = 200_000
TRACKING_BASE_BYTES = 20_000_000
HEADROOM = 1.2
"""Free space below the estimate times this is tight: warned about, since the estimate is approximate."""


def _device(path: Path) -> int:
    return os.stat(existing_ancestor(path)).st_dev


@dataclass
class Need:
    """Bytes that will be written under `folder`, for a reason said in a word or two (+ how they add up)."""

    what: str
    bytes: int
    folder: Path
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.what} {format_bytes(self.bytes)}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SpacePlan:
    """What a run will write where, and how much is free there. `lines` say what could not be sized."""

    needs: list[Need]
    notes: list[str] = field(default_factory=list)

    def volumes(self) -> list[tuple[Path, int, int, list[Need]]]:
        """(its mount point, bytes needed, bytes free, the needs) per file system: one holding both HF_HOME and
        OUTPUT_DIR is counted once."""
        groups: dict[int, list[Need]] = {}
        for need in self.needs:
            groups.setdefault(_device(need.folder), []).append(need)
        return [
            (mount_point(needs[0].folder), sum(n.bytes for n in needs), free_bytes(needs[0].folder), needs)
            for needs in groups.values()
        ]

    def describe(self) -> str:
        """`needs ~3.5 GB on /workspace (models 2.8 GB, ...), 41 GB free`, one part per file system."""
        parts = []
        volumes = self.volumes()
        for where, needed, free, needs in volumes:
            if not needed and len(volumes) > 1:
                continue  # a file system this run adds nothing to (models already cached, say)
            detail = ", ".join(str(n) for n in needs if n.bytes) or "nothing new"
            parts.append(f"needs ~{format_bytes(needed)} on {where} ({detail}), {format_bytes(free)} free")
        return "; ".join(parts + self.notes)

    def refusal(self) -> str | None:
        """The one line refusing the run when a file system cannot hold what it will write; None when it fits."""
        for where, needed, free, needs in self.volumes():
            if needed > free:
                detail = ", ".join(str(n) for n in needs if n.bytes)
                return (
                    f"not enough space for this run on {where}: {format_bytes(free)} free, the run needs "
                    f"~{format_bytes(needed)} ({detail}): free {format_bytes(needed - free)} more, lower "
                    "training.keep_checkpoints, or use a larger volume"
                )
        return None

    def warning(self) -> str | None:
        """A line when space is tight (free below the estimate x HEADROOM) but the run fits."""
        for where, needed, free, _ in self.volumes():
            if needed <= free < needed * HEADROOM:
                return (
                    f"space is tight on {where}: {format_bytes(free)} free, the run needs ~{format_bytes(needed)} "
                    "(an estimate): a full disk would stop the run at a checkpoint"
                )
        return None


def plan_space(cfg: Config, *, output_dir: Path, token: str | None, endpoint: str | None = None) -> SpacePlan:
    """What `train` would write for `cfg`: models not yet in HF_HOME, checkpoints, tracking files."""
    from huggingface_hub import constants as hub_constants

    from tiny_audio.model.loading import TOWER_PREFIXES

    m, t = cfg.model, cfg.training
    hf_home = Path(hub_constants.HF_HOME)
    plan = SpacePlan(needs=[])
    models = 0
    for ref, revision, prefixes in (
        (m.encoder_id, m.encoder_revision, TOWER_PREFIXES[m.encoder_type]),
        (m.decoder_id, m.decoder_revision, None),
    ):
        size = model_download_bytes(ref, revision=revision, token=token, prefixes=prefixes, endpoint=endpoint)
        if size is None:
            plan.notes.append(f"the size of {ref} is unknown (not counted)")
        else:
            models += size
    plan.needs.append(Need("models to download", models, hf_home))
    one = checkpoint_bytes(cfg)
    checkpoints = output_dir / "checkpoints"
    if one is None:
        plan.notes.append("a checkpoint's size is unknown (not counted)")
    else:
        on_disk = sum(folder_bytes(p) for p in checkpoints.glob("step-*")) if checkpoints.is_dir() else 0
        copies = t.keep_checkpoints + 1
        detail = f"{copies} x {format_bytes(one)}" + (f", {format_bytes(on_disk)} already there" if on_disk else "")
        plan.needs.append(Need("checkpoints", max(copies * one - on_disk, 0), output_dir, detail=detail))
    plan.needs.append(Need("W&B and metrics files", tracking_bytes(cfg), output_dir))
    return plan


def model_download_bytes(
    ref: str, *, revision: str | None, token: str | None, prefixes: tuple[str, ...] | None, endpoint: str | None
) -> int | None:
    """Bytes a run would download for model `ref`: 0 when shipped, local or cached; from the Hub's metadata
    when it answers, else from KNOWN_DOWNLOAD_BYTES; None when unknown."""
    from tiny_audio import hub
    from tiny_audio.assets import SCHEME as ASSET_SCHEME

    if ref.startswith(ASSET_SCHEME) or Path(ref).expanduser().is_dir() or is_cached(ref, revision, prefixes=prefixes):
        return 0
    if hub.check_access(ref, repo_type="model", token=token, endpoint=endpoint) != "ok":
        return KNOWN_DOWNLOAD_BYTES.get(ref)  # one quick question, no retries: an unreachable Hub costs no wait
    if prefixes:
        size = hub.part_size(ref, prefixes=prefixes, revision=revision, token=token, endpoint=endpoint)
    else:
        size = hub.model_size(ref, revision=revision, token=token, endpoint=endpoint)
    return size if size is not None else KNOWN_DOWNLOAD_BYTES.get(ref)


def is_cached(ref: str, revision: str | None, *, prefixes: tuple[str, ...] | None) -> bool:
    """Whether the HF cache already holds what a run would download of `ref` (an encoder's tower part, or a
    snapshot with weights of the revision)."""
    from huggingface_hub import constants as hub_constants

    folder_name = ref.replace("/", "--")
    if prefixes:
        parts = Path(hub_constants.HF_HOME) / "tiny-audio" / "parts" / folder_name
        return any((p / "model.safetensors").is_file() for p in parts.glob("*") if not p.name.endswith(".partial"))
    repo = Path(hub_constants.HF_HUB_CACHE) / f"models--{folder_name}"
    commit = revision if revision and len(revision) == 40 else None
    if commit is None:
        ref_file = repo / "refs" / (revision or "main")
        commit = ref_file.read_text().strip() if ref_file.is_file() else None
    snapshot = repo / "snapshots" / commit if commit else None
    return snapshot is not None and any(snapshot.glob("*.safetensors"))


def checkpoint_bytes(cfg: Config) -> int | None:
    """One checkpoint's size: the projector's fp32 weights x 4 (the resume copy, Adam's two moments, the
    exported copy; x 5 under DeepSpeed, whose optimizer keeps its own fp32 master copy), the tokenizer's
    files and small files. None when a model's width is unknown."""
    from tiny_audio.preflight import projector_parameters, width_of

    in_dim, out_dim = width_of(cfg.model.encoder_id), width_of(cfg.model.decoder_id)
    if not in_dim or not out_dim:
        return None
    params = projector_parameters(cfg, in_dim, out_dim)
    copies = 5 if cfg.training.deepspeed else 4
    return params * 4 * copies + tokenizer_bytes(cfg.model.decoder_id) + CHECKPOINT_OVERHEAD_BYTES


def tokenizer_bytes(decoder_ref: str) -> int:
    """The decoder's tokenizer files (measured when the decoder is local), which every checkpoint carries."""
    from tiny_audio.assets import SCHEME as ASSET_SCHEME
    from tiny_audio.assets import resolve_asset

    folder = Path(resolve_asset(decoder_ref)) if decoder_ref.startswith(ASSET_SCHEME) else Path(decoder_ref)
    if folder.is_dir():
        names = ("tokenizer*", "vocab*", "merges*", "special_tokens_map.json", "chat_template*", "added_tokens.json")
        return sum(p.stat().st_size for pattern in names for p in folder.glob(pattern) if p.is_file())
    return TOKENIZER_BYTES


def tracking_bytes(cfg: Config) -> int:
    """W&B's offline files (when tracking is on) and metrics.jsonl over the whole run, roughly."""
    t = cfg.training
    logs = t.max_steps // t.logging_steps + 1
    evals = t.max_steps // t.eval_steps + 1 if cfg.data.eval is not None else 0
    wandb = cfg.tracking.backend != "none" and cfg.tracking.mode != "disabled"
    per_log = TRACKING_BYTES_PER_LOG if wandb else TRACKING_BYTES_PER_LOG // 4
    return logs * per_log + evals * TRACKING_BYTES_PER_EVAL + (TRACKING_BASE_BYTES if wandb else 0)


def check_volume(cfg: Config, *, output_dir: Path, token: str | None, endpoint: str | None = None) -> SpacePlan:
    """At the start of `train`, before any download: OUTPUT_DIR writable, HF_HOME writable when something
    must be downloaded, and room for the run (a DiskFull line when not, a warning when tight)."""
    from huggingface_hub import constants as hub_constants

    prepare_output_dir(output_dir)
    plan = plan_space(cfg, output_dir=output_dir, token=token, endpoint=endpoint)
    hf_home = Path(hub_constants.HF_HOME)
    downloads = sum(n.bytes for n in plan.needs if n.folder == hf_home)
    if downloads and not writable(hf_home):
        raise UserError(
            f"the Hugging Face cache HF_HOME={hf_home} is not writable, and this run must download "
            f"~{format_bytes(downloads)} of models into it: point HF_HOME at a writable folder"
        )
    refusal = plan.refusal()
    if refusal:
        raise DiskFull(refusal)
    log.info("volume: %s", plan.describe())
    warning = plan.warning()
    if warning:
        log.warning("%s", warning)
    return plan
