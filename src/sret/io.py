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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
