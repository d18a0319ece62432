"""Which implementation each of SReT's entry points runs, and when: one table, in code.

Every choice in :mod:`sret.kernels` between ways of computing one thing is a tuple of :class:`Path`
rows, tried in order: the first whose condition holds is taken, and the last row, "otherwise", when
none does. A condition has two parts: `ready`, what holds or not for the whole process in its
present context (a library built, oneDNN switched on, autocast), and `takes`, what depends on the
call's inputs (dtype, shapes, sizes, the module). The rows are the code that chooses and the
description of it: `sret.kernels.PATHS` gathers them, `sret bench` and `sret train` print them, and
docs/architecture.md shows them (`tests/test_architecture.py` compares the two).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple


def always(*_: Any) -> bool:
    return True


class Path(NamedTuple):
    entry: str  # the entry point that chooses
    runs: str  # what runs
    when: str  # the condition, in words
    why: str  # what it was measured to be worth, or why it is there
    run: Callable[..., Any] | None = None  # the implementation, given the entry's inputs
    takes: Callable[..., bool] = always  # the condition on the entry's inputs
    ready: Callable[[], bool] = always  # the condition on the process and its context


def first(paths: Sequence[Path], *inputs: Any) -> Path:
    """The row of `paths` taken for `inputs`: the first whose condition holds, else the last."""
    for path in paths[:-1]:
        if path.ready() and path.takes(*inputs):
            return path
    return paths[-1]


def choose(paths: Sequence[Path], *inputs: Any) -> Any:
    """Run the implementation of the row of `paths` taken for `inputs`."""
    return first(paths, *inputs).run(*inputs)
