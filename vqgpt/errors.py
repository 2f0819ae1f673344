"""User-facing errors: one line, exit status 2, no traceback.

Every error a user can fix derives from UserError. This module imports nothing of the project,
so any module can raise these without an import cycle.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """Input the user can fix; the message names the file or setting and what to do."""


class RunError(UserError, RuntimeError):
    """A run folder, resume or data combination that cannot be used."""


class ConfigError(UserError, ValueError):
    """A setting the user gave cannot be used; the message says which and why."""


class ShardError(UserError, ValueError):
    """A shard folder or manifest that cannot be used; the message names the file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class DataPrepError(UserError, RuntimeError):
    """The whole shardify run cannot go on (empty input, every file skipped, DEST in use)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when empty), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]


# OSError: a read-only run folder, a full disk, a file where a folder should be, LPIPS weights missing
# (models.perceptual.LPIPSWeightsMissing is one); its message names the path
USER_ERRORS = (UserError, OSError)


# how numpy and torch (CPU allocator, CUDA caching allocator, size arithmetic) say that an array cannot be had
ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "Storage size calculation overflowed",
                       "array is too big")


def allocation_failure(err: BaseException) -> str | None:
    """What could not be allocated, when `err` is an allocation too large for this machine (a size or count
    asked for that no bound known at parse time refuses, `sample.py --n 10**12`); None for any other error."""
    text = first_line(err, 400)
    if not isinstance(err, MemoryError) and not any(phrase in text for phrase in ALLOCATION_FAILURES):
        return None
    return text.split("DefaultCPUAllocator: ")[-1][:200]   # torch's CPU message opens with an assertion


def exit_on_user_error(main: Callable[[], int | None], program: str) -> int:
    """Run `main`; a known user error, or an allocation that cannot succeed, prints `program: error: ...` once
    and returns 2."""
    rank = os.environ.get("RANK", "0")
    try:
        return main() or 0
    except USER_ERRORS as err:
        message, every_rank = str(err), False   # torchrun's other ranks hit the same error: one line, not N
    except (MemoryError, RuntimeError, ValueError) as err:
        what = allocation_failure(err)
        if what is None:
            raise
        message = f"not enough memory for what was asked ({what}); ask for fewer or smaller (--batch-size, --n, sizes)"
        every_rank = True   # memory runs out per rank: the rank it ran out on must say so
        if rank != "0":
            message = f"rank {rank}: {message}"
    if every_rank or rank == "0":
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    return 2
