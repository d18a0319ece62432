"""What a user reads when output goes to a file (nohup, a batch scheduler): whole lines, progress
within an epoch, no source locations; and the resolution a named model trains at."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import sret.train
from sret.train import LineProgress, resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(train_subset=128, val_subset=64, batch_size=32, epochs=2, warmup_epochs=0, threads=1, lr=2e-3)
METRICS = ("train loss", "acc", "val loss", "acc1", "acc5", "lr", "img/s")


def to_file(args: list[str], path: Path) -> str:
    """Run `python -m sret ARGS > path 2>&1` (no terminal, rich's default width) and return the text."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env["OMP_NUM_THREADS"] = "1"
    with path.open("w") as out:
        subprocess.run(
            [sys.executable, "-m", "sret", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    return path.read_text()


def test_train_into_a_file_writes_one_whole_line_per_epoch(tmp_path: Path) -> None:
    args = ["train", "--epochs", "2", "--output", str(tmp_path), "--name", "r", "--batch-size", "32"]
    args += ["--set", "train_subset=128", "--set", "val_subset=64", "--set", "warmup_epochs=0"]
    text = to_file(args, tmp_path / "log.txt")
    lines = text.splitlines()
    epochs = [line for line in lines if line.startswith("epoch ") and "train loss" in line]
    assert len(epochs) == 2, text
    for line in epochs:
        assert all(name in line for name in METRICS), line
        assert re.search(r"\d+\.\ds$", line), line  # the epoch's time ends the same line
    assert lines[0].startswith("run ") and "validation images" in lines[0]  # the start line, unbroken
    assert lines[-1].startswith("done: best val acc1") and str(tmp_path / "r") in lines[-1]
    assert not any(line.strip() == "" for line in lines), text  # no blank line left by a progress bar


def test_progress_lines_within_an_epoch_when_not_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sret.train, "PROGRESS_SECONDS", 0.0)  # a line after every step
    buffer = io.StringIO()
    train(resolve_config("digits", output=str(tmp_path), name="r", **TINY), console=Console(file=buffer))
    lines = buffer.getvalue().splitlines()
    steps = [line for line in lines if " step " in line]
    expected = [f"epoch {e}/2  step {s}/4  loss " for e in (1, 2) for s in (1, 2, 3, 4)]
    assert [line[: len(expected[0])] for line in steps] == expected
    assert all(re.search(r"acc \d\.\d{4}  \d+ img/s  \d+:\d\d:\d\d left$", line) for line in steps), steps
    summary = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2  train"))
    assert lines.index(steps[3]) < summary < lines.index(steps[4])  # an epoch's steps, then its summary


def test_line_progress_prints_once_per_interval_of_its_clock() -> None:
    ticks = iter(range(0, 1000, 4))  # every call of the clock is 4 s later
    buffer = io.StringIO()
    progress = LineProgress(Console(file=buffer, width=40), True, 10.0, clock=lambda: next(ticks))
    with progress:
        task = progress.add_task("epoch 1/3", total=9, completed=0, loss=0.0, acc=0.0, rate=0.0)
        for step in range(9):
            progress.update(task, advance=1, loss=1.0 / (step + 1), acc=0.5, rate=32.0)
        progress.remove_task(task)
    lines = buffer.getvalue().splitlines()
    # the task starts at 4 s and step k ends at 4 + 4k s: a line at 16 s (step 3), 28 (6) and 40 (9)
    assert [line.split("  ")[1] for line in lines] == ["step 3/9", "step 6/9", "step 9/9"]
    assert lines[0] == "epoch 1/3  step 3/9  loss 0.3333  acc 0.5000  32 img/s  0:00:24 left"  # unwrapped
    silent = io.StringIO()
    quiet = LineProgress(Console(file=silent), False, 0.0)  # other ranks under torchrun print nothing
    quiet.update(quiet.add_task("epoch 1/1", total=2, loss=0.0, acc=0.0, rate=0.0), loss=1.0)
    assert silent.getvalue() == ""


def test_bench_output_names_no_source_location(tmp_path: Path) -> None:
    args = ["bench", "sret_nano", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    text = to_file([*args, "--no-memory", "--no-reference"], tmp_path / "bench.txt")
    assert "building sret_nano" in text and "sret_nano" in text.split("matmul peak")[-1], text
    assert not re.search(r"\w+\.py:\d+", text), text
    assert not re.search(r"^\s+\S", text.split("matmul peak")[0], re.M), text  # no log line wrapped
    notes = [line for line in text.splitlines() if line.startswith("SReT: sret.kernels")]
    assert notes and notes[0].rstrip().endswith("torch's default kernels"), text  # one line, not wrapped


def test_a_named_model_trains_at_its_own_resolution_with_the_default_recipe() -> None:
    assert resolve_config("digits").img_size == 32  # sret_nano's
    assert resolve_config("digits", model="sret_t").img_size == 224
    assert resolve_config("digits", ["model=sret_s_noslice_384"]).img_size == 384
    assert resolve_config("digits", ["img_size=64"], model="sret_t").img_size == 64  # asked for: kept
    assert resolve_config("cifar10", model="sret_t").img_size == 32  # a recipe's own size: kept
