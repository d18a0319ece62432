"""The bottom floor: the user-error type, atomic file writes and YAML reading.

Every other module may import this one, and it imports nothing of SReT's, so no two modules above it
need each other for these.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
            try:  # a cause here is the destination's (a read-only folder, /proc), not the temporary's
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
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
            try:
                os.replace(tmp, path)
            except OSError as e:  # a folder where the file should go, say
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work is done, a file that a command could not write or must not replace: a
    folder, an existing file (unless `overwrite`: the `--overwrite` of every command that writes a
    file), or a place where no file can be created. The message names `path` itself."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; name a file inside it")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise UserError(f"cannot write {path}: it exists and is not a regular file")
        if not overwrite:
            raise UserError(f"{path} exists: pass --overwrite to replace it, or name another file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # atomic_writes creates the missing ones
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: {folder} is not a folder")
    try:  # the only test that holds everywhere (root, read-only mounts, /proc): create a file there
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)
    return path


LOCK_FILE = ".lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs; a second process asking for it gets a
    UserError at once. The lock is an flock, which the system drops when its process ends however it
    ends (SIGKILL included), so a killed holder never leaves the folder locked. `what` names the use
    (e.g. "sret train") in the message."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            by = f" (process {holder})" if holder else ""
            raise UserError(f"{folder} is in use by another {what}{by}: wait for it to end") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


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


def read_text(path: Path, what: str) -> str:
    """A text file's content; a file that is not text, or cannot be read, is one line naming it."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"cannot read {what} {path}: it is not a text file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


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
    values = read_yaml(read_text(path, what), f"{what} {path}") or {}
    if not isinstance(values, dict):
        raise UserError(f"{what} {path} must be a mapping of option: value")
    return values
