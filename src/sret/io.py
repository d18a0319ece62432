"""The bottom floor: the user-error type, atomic file writes and YAML reading.

Every other module may import this one, and it imports nothing of SReT's, so no two modules above it
need each other for these.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, unreadable file); shown as one line."""


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(tmp_path)` and rename the result over `path` only once it is complete."""
    atomic_writes([(path, write)])


def atomic_writes(files: list[tuple[str | os.PathLike, Any]]) -> None:
    """Write several files so that all of them change or none does: each `write(tmp_path)` first, then
    the renames. A failed write (a full disk, say) is a UserError naming the file and the cause, and
    every destination keeps its previous content; so a checkpoint's weights and training state on
    disk always come from the same step. Writers that serialise in memory and write the bytes (see
    `write_bytes`) report the operating system's own cause ("No space left on device").

    The files get the mode an ordinary `open` would (0666 less the umask), not the temporary file's
    0600, so colleagues on a shared machine can read a checkpoint.
    """
    mode = 0o666 & ~current_umask()
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in files:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            try:
                write(tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(tmp, mode)
            except OSError as e:
                cause = e.strerror or str(e)
                raise UserError(f"cannot write {path}: {cause}; the previous file is kept") from None
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def write_bytes(data: bytes) -> Any:
    """A writer for :func:`atomic_writes` of bytes serialised beforehand."""
    return lambda tmp: Path(tmp).write_bytes(data)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files that writes killed mid-way left in `folder`; returns how many."""
    stale = list(Path(folder).glob(".*.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def read_yaml(text: str, what: str) -> Any:
    """`yaml.safe_load`, with a syntax error turned into one line that names `what` and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise UserError(f"cannot parse {what}: {problem}{where}") from None


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file that must hold `option: value` pairs (empty file: no options)."""
    values = read_yaml(path.read_text(), f"{what} {path}") or {}
    if not isinstance(values, dict):
        raise UserError(f"{what} {path} must be a mapping of option: value")
    return values
