"""User-facing errors: one line, exit status 2, no traceback."""
from __future__ import annotations

import sys
from typing import Callable

from vqgpt.checkpoint import CheckpointError
from vqgpt.config import ConfigError
from vqgpt.shards import ShardError


class RunError(RuntimeError):
    """A run folder, resume or data combination that cannot be used."""


def user_errors() -> tuple[type[BaseException], ...]:
    from models.perceptual import LPIPSWeightsMissing  # late: keeps `import vqgpt` free of lpips

    # OSError: a read-only run folder, a full disk, a file where a folder should be; its message names the path
    return (CheckpointError, ConfigError, ShardError, RunError, LPIPSWeightsMissing, OSError)


def exit_on_user_error(main: Callable[[], int | None], program: str) -> int:
    """Run `main`; a known user error prints `program: error: ...` once and returns 2."""
    try:
        return main() or 0
    except user_errors() as err:
        import os

        if os.environ.get("RANK", "0") == "0":
            print(f"{program}: error: {err}", file=sys.stderr, flush=True)
        return 2
