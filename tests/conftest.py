"""What the test files share: tiny training configurations, one tiny run trained per session, and
`sret` run as a separate process (where a test needs a process to die: see the FAULT_* variables of
sret.train, which make a run exit hard or take a Ctrl-C at a chosen point, deterministically)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sret.train import TrainConfig, resolve_config, train

ROOT = Path(__file__).resolve().parents[1]

# Two epochs of 4 steps on 128 digits: seconds, and enough to checkpoint, resume and compare.
TINY = dict(train_subset=128, val_subset=64, batch_size=32, epochs=2, warmup_epochs=0, threads=1, lr=2e-3)
# The same data and batch as `sret train` options.
TINY_ARGS = (
    "--batch-size",
    "32",
    "--set",
    "train_subset=128",
    "--set",
    "val_subset=64",
    "--set",
    "threads=1",
)


def sret_process(
    *args: str, env: dict[str, str] | None = None, limit_kib: int | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m sret ARGS` in a process of its own (one thread), with `env` added to the environment
    and, with `limit_kib`, files larger than that refused by the system (`ulimit -f`)."""
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "sret", *args))
    if limit_kib is not None:
        command = f"ulimit -f {limit_kib}; {command}"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=timeout
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`sret_process`, for tests that need a process that can die."""
    return sret_process


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., TrainConfig]:
    """A TINY digits run under tmp_path: `tiny(name="run", **overrides)`."""

    def make(name: str = "run", **overrides) -> TrainConfig:
        return resolve_config("digits", output=str(tmp_path), name=name, **{**TINY, **overrides})

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run of sret_nano trained once per session (3 epochs on 512 images, well above chance),
    for the tests that read a finished run. Tests that change a run use `run_copy`."""
    out = tmp_path_factory.mktemp("session_runs")
    return train(resolve_config("digits", output=str(out), name="r", epochs=3, train_subset=512, threads=1))


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A copy of the session's run folder, for a test to change."""
    return Path(shutil.copytree(trained_run, tmp_path / "r"))
