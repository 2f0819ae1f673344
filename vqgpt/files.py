"""Atomic file writes and hashing: an artifact is either complete or absent, never half-written."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

from vqgpt.errors import UserError


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds."""
    final_path = Path(final_path)
    tmp_path = _create_exclusive(final_path)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, final_path)
        _fsync_folder(final_path.parent)
    finally:
        if os.path.lexists(tmp_path):
            tmp_path.unlink()


def _create_exclusive(final_path: Path) -> Path:
    """A new empty file `.name.PID.RANDOM.tmp` beside `final_path`: never an existing file or a planted link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp_path = final_path.with_name(f".{final_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp_path, flags, 0o666))   # 0o666 & ~umask, like a plain open()
            return tmp_path
        except FileExistsError:
            continue


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON: a NaN or infinity (an FID of a degenerate set, say) is written as null, which every parser
    reads, not as Python's bare NaN, which most refuse."""
    atomic_write_bytes(path, (json.dumps(_finite_or_null(obj), indent=2, allow_nan=False) + "\n").encode())


def _finite_or_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite_or_null(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(value) for value in obj]
    return obj


# a file name a manifest, receipt or run folder may name: no folder part, no leading dot or dash
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def file_inside(folder: str | os.PathLike, name, error: type[UserError] = UserError, named_in: str = "") -> Path:
    """`folder / name` for a file a manifest names or a run folder holds: a plain name, and no link out of `folder`
    (a link to a file inside it is fine). Whether the file exists is the caller's to check."""
    folder = Path(folder)
    where = f"{named_in}: " if named_in else ""
    if not isinstance(name, str) or not PLAIN_NAME.match(name):
        raise error(f"{where}{str(name)[:80]!r} is not a plain file name inside {folder}")
    path = folder / name
    if path.is_symlink() and not os.path.realpath(path).startswith(os.path.realpath(folder) + os.sep):
        raise error(f"{path}: is a link pointing outside {folder}; remove it (nothing is read through it)")
    return path


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# `_create_exclusive`'s names exactly, random part included: a user's `.notes.4000000.tmp` is not ours to delete.
# lazy `.+?`: the first number that leaves a valid tail is the PID, so a random part of 8 digits is not taken for it
_TEMPORARY = re.compile(r"^\..+?\.(\d+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete `.name.PID.RANDOM.tmp` leftovers of writers that died (kill -9); a live writer's are kept."""
    for leftover in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(leftover.name)
        if match and not _process_alive(int(match.group(1))):
            leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False   # ours from an earlier call that died mid-write: nothing of ours is writing now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
