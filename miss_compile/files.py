"""Files written atomically: staged beside their target, then moved into place with os.replace."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def stage_beside(path: Path) -> Path:
    """A new empty file next to `path` (same filesystem, so os.replace is atomic), with the mode a
    plain open() gives (0o666 less the umask): tempfile.mkstemp's 0o600 would survive the replace
    and hide the file from a server running as another user."""
    for _ in range(100):
        staged = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(staged, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return staged
    raise FileExistsError(f"could not create a staging file beside {path}; remove the stale .{path.name}.*.tmp files")
