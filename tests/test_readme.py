"""README.md's commands run as written. Every line of its bash blocks, every inline `sret ...` command
with an argument and every Python block is a case here: the cheap ones run in one fresh folder, in
README order, in this process (the `sret` command through its typer app); the expensive ones are
skipped with the reason, so a new command is run unless it is classified here."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from sret.cli import app
from sret.train import resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT.parent / "shared" / "reference" / "official_sret_t.pth"
SETUP = (
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]' && .venv/bin/sret train"
)
TESTS = ".venv/bin/python -m pytest -q"

# Command prefix -> why the test leaves it out (each one is pasted and run by hand, or by CI).
EXPENSIVE = {
    "python3 -m venv": "installs the locked stack into a new virtual environment (what .ci/run does)",
    ".venv/bin/python -m pytest": "the test suite itself (CI runs exactly this)",
    ".venv/bin/ruff": "lint, in the virtual environment the setup command makes (CI's concern)",
    ".venv/bin/pip install clang-format": "installs a package",
    "bash .ci/lock": "installs into a fresh virtual environment",
    "sret eval sret_t.safetensors --dataset imagefolder": "needs ImageNet",
    "sret train --model sret_t": "sret_t at 224 px for 40 epochs: hours on a CPU",
    "sret train -r": "needs a data set or image folder that a fresh clone does not have",
    "torchrun": "ImageNet on 8 GPUs",
    "sret train --resume": "needs an interrupted run",
    "sret train --name demo": "the 40-epoch quick start again (runs/demo is trained here for one epoch)",
    "sret train --set": "a 40-epoch training",
    "sret ablate": "24 CIFAR-10 trainings",
}


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.M | re.S)


def cases() -> list[pytest.param]:
    out = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(pytest.param(shlex.join(words), id=shlex.join(words)[:60]))
    for span in re.findall(r"`(sret [^`]+)`", README.read_text()):
        if len(span.split()) >= 3:  # a command, not a command's name in a sentence
            out.append(pytest.param(span, id=span[:60]))
    for i, block in enumerate(readme_blocks("python")):
        out.append(pytest.param(block, id=f"python-block-{i + 1}"))
    return out


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as a user has it after the quick start: runs/demo (trained for one epoch, not 40),
    photos/ with two images and, where this checkout has the authors' reference checkpoint, SReT_T.pth."""
    folder = tmp_path_factory.mktemp("clone")
    tiny = dict(epochs=1, train_subset=128, val_subset=64, batch_size=32, warmup_epochs=0)
    train(resolve_config("digits", output=str(folder / "runs"), name="demo", **tiny))
    (folder / "photos").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 30), (60 * i, 120, 200)).save(folder / "photos" / f"{i}.png")
    if REFERENCE.is_file():
        (folder / "SReT_T.pth").symlink_to(REFERENCE)
    return folder


def needs_reference(text: str) -> bool:
    return "SReT_T.pth" in text or "sret_t.safetensors" in text


def run_python(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
    return out.getvalue()


@pytest.mark.parametrize("command", cases())
def test_readme_command_runs(command: str, clone: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = next((why for prefix, why in EXPENSIVE.items() if command.startswith(prefix)), None)
    if reason:
        pytest.skip(reason)
    if needs_reference(command) and not REFERENCE.is_file():
        pytest.skip("needs ../shared/reference, a checkpoint in the authors' layout, as SReT_T.pth")
    monkeypatch.chdir(clone)
    if "\n" in command:  # a Python block: each `print(...)  # EXPECTED` must print EXPECTED
        printed = run_python(command)
        for expected in re.findall(r"^print\(.*\)  # (.+)$", command, re.M):
            assert expected in printed, printed
        return
    words = shlex.split(command)
    if words[:2] == ["python", "-c"]:
        run_python(words[2])
        return
    assert words[0] == "sret", f"no way to run {command!r} here: classify it in EXPENSIVE"
    result = CliRunner().invoke(app, words[1:])
    assert result.exit_code == 0, result.output


def test_readme_keeps_its_setup_and_test_commands_and_its_length() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250
    assert SETUP in lines and TESTS in lines
    assert TESTS in (ROOT / ".ci" / "run").read_text().splitlines()  # CI runs exactly README's command
