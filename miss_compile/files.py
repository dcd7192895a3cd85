"""Files written atomically: staged beside their target, then moved into place with os.replace.

The one place the project writes files: a failed write (full disk, bad permissions, a value that
cannot be serialized, a validation that fails) changes no file and leaves no partial one."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["stage_beside", "write_atomically", "write_text_atomically", "write_files_atomically"]


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


def write_atomically(files: dict[Path, Callable[[str], object]]) -> None:
    """`write(staged_path)` for each target into a file staged beside it, then all moved into place."""
    staged: dict[Path, str] = {}
    try:
        for path, write in files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = str(stage_beside(Path(path)))
            staged[Path(path)] = tmp
            mode = os.stat(tmp).st_mode
            write(tmp)
            os.chmod(tmp, mode)  # safetensors and others write their file 0o600 whatever the umask
        for path, tmp in staged.items():
            os.replace(tmp, path)
    finally:
        for tmp in staged.values():
            Path(tmp).unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_atomically({Path(path).absolute(): lambda tmp: Path(tmp).write_text(text)})


def write_files_atomically(path: Path, write: Callable[[Path], object]) -> list[Path]:
    """For files that name each other (an .onnx and its external `.data`): `write(staged)` writes
    `staged` (named like `path`) and any companions into a temp folder beside `path`; every
    companion is then moved beside `path`, `path` last. Returns the final paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        write(staged)
        moved = []
        for companion in sorted(p for p in staging.iterdir() if p != staged):
            os.replace(companion, path.parent / companion.name)
            moved.append(path.parent / companion.name)
        os.replace(staged, path)
        return [*moved, path]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
