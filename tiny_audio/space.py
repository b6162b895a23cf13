"""A write that finds the disk full or the folder read-only ends in one line; the folders a run writes, measured.

`volume.py` uses these to check, before any download, that the run fits.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tiny_audio.errors import DiskFull, UserError
from tiny_audio.progress import format_bytes

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})

# --- errors ---------------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _errnos(exc: BaseException) -> Iterator[int]:
    """The errno of every OSError in `exc`'s chain, and those Rust-backed libraries (safetensors, tokenizers)
    write into their own errors' text as `(os error 28)`."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            yield e.errno
        elif not isinstance(e, OSError):
            yield from (int(n) for n in _RUST_OS_ERROR.findall(str(e)))


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write refused for lack of space: ENOSPC, or EDQUOT (a quota)."""
    return any(n in DISK_FULL_ERRNOS for n in _errnos(exc))


def is_not_writable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write refused by a read-only file system or permissions."""
    return any(n in NOT_WRITABLE_ERRNOS for n in _errnos(exc))


def disk_full(
    *,
    folder: Path,
    doing: str,
    need: str | None,
    fix: str,
    cleaned: str | None = None,
    last_good: str | None = None,
) -> DiskFull:
    """The one line for a write that found no space: the folder, its free space now, roughly what was needed
    (`need`, e.g. "the download needs ~1.5 GB"), what was cleaned up, the last good checkpoint, what to do."""
    parts = [f"no space left on the volume at {folder} while {doing}: {format_bytes(free_bytes(folder))} free"]
    parts[0] += f", {need}" if need else ""
    if cleaned:
        parts.append(cleaned)
    if last_good:
        parts.append(f"the last good checkpoint is {last_good}, and a restart resumes from it")
    return DiskFull("; ".join(parts) + f": {fix}")


@contextmanager
def disk_full_is_one_line(output_dir: Path, *, last_saved: Callable[[], Path | None]) -> Iterator[None]:
    """While training, a write that finds the disk full (a checkpoint, metrics.jsonl, W&B's offline files) ends
    the run with ONE line: the first DiskFull raised, or one made here naming the file's folder and the last good
    checkpoint (`last_saved()`). A later failure of the same cause (W&B closing its logs on the full volume
    while the run is cleaned up) does not replace it, and log handlers that cannot write do not print
    tracebacks of their own."""
    raising = logging.raiseExceptions
    logging.raiseExceptions = False
    try:
        yield
    except Exception as exc:
        first = next((e for e in reversed(list(_chain(exc))) if isinstance(e, DiskFull)), None)
        if first is not None:
            raise first from None
        if not is_disk_full(exc):
            raise
        name = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None)
        last = last_saved()
        raise disk_full(
            folder=Path(os.fsdecode(name)).parent if name else output_dir,
            doing=f"writing {Path(os.fsdecode(name)).name}" if name else "training",
            need=None,
            last_good=last.name if last else None,
            fix="free space or use a larger volume",
        ) from None
    finally:
        logging.raiseExceptions = raising


@contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """An OSError raised without a file name (a buffered write failing at close) gets `path` as its name."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


# --- measuring ------------------------------------------------------------------------------------------


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent (where it would be created)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds (or would hold) `path`, for this user."""
    return shutil.disk_usage(existing_ancestor(path)).free


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when absent); files that vanish while counting are skipped."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (e.g. /workspace for a RunPod volume)."""
    path = existing_ancestor(path)
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


# --- folders a run writes -------------------------------------------------------------------------------


def prepare_output_dir(output_dir: Path) -> None:
    """Create OUTPUT_DIR and prove a file can be written there; a UserError naming it and the fix if not."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(
                folder=output_dir, doing="creating OUTPUT_DIR", need=None, fix="free space or use a larger volume"
            ) from None
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"OUTPUT_DIR {output_dir} cannot be written ({reason}): set OUTPUT_DIR to a writable folder, e.g. "
            "on the mounted volume"
        ) from None


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (or in the parent it would be created in)."""
    return os.access(existing_ancestor(folder), os.W_OK)
