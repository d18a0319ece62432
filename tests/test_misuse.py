"""What a careless user does: each is refused with one line that says what to do (or reported, or
kept), and nothing already saved is lost or overwritten unasked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import sret
from sret.checkpoint import save_weights
from sret.cli import app
from sret.train import STATE_FILE


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code: int = 1) -> str:
    """The single `error:` line of a refused command (and no traceback)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- a run that cannot resume ------------------------------------------------------------------------
def test_a_resume_without_its_training_state_refuses_and_overwrites_nothing(run_copy: Path) -> None:
    (run_copy / STATE_FILE).unlink()
    before = snapshot(run_copy)
    error = one_error_line(invoke("train", "--resume", run_copy))
    assert f"cannot resume {run_copy}: its training state last_state.pt is missing" in error
    assert "best.safetensors" in error and "metrics.jsonl" in error
    assert snapshot(run_copy) == before  # the best weights and every metrics line are still there
    new = invoke("train", "--output", run_copy.parent, "--name", run_copy.name, "--epochs", "1")
    assert "holds the outputs of a run" in one_error_line(new)
    assert snapshot(run_copy) == before


def test_a_run_folder_takes_one_process_at_a_time(run_copy: Path) -> None:
    from sret.io import LOCK_FILE, folder_lock

    stale = run_copy / ".last.safetensors.abc123.tmp"  # the other process's write in progress
    stale.write_bytes(b"half a checkpoint")
    with folder_lock(run_copy, "sret train"):  # held as another `sret train` holds it
        error = one_error_line(invoke("train", "--resume", run_copy))
        assert f"{run_copy} is in use by another sret train (process {os.getpid()})" in error
    assert stale.exists()  # the refused process cleaned up nothing
    with folder_lock(run_copy, "sret train"):  # and once released, the folder is free again
        pass
    assert (run_copy / LOCK_FILE).exists()


# ---- sizes no machine of this kind can hold ----------------------------------------------------------
def test_impossible_sizes_are_refused_before_any_work(tmp_path: Path) -> None:
    train_cmd = invoke("train", "--output", tmp_path, "--epochs", "1", "--set", "img_size=100000")
    error = one_error_line(train_cmd)
    assert "training sret_nano at img_size 100000 with batch_size 64 needs at least" in error
    assert "more than this machine's memory" in error and "lower img_size or batch_size" in error
    assert not list(tmp_path.iterdir())  # no run folder, no data read
    info = one_error_line(invoke("info", "sret_nano", "--img-size", "100000"), code=2)
    assert "sret_nano at img_size 100000 needs at least" in info
    export = invoke("export", "sret_nano", "--random-init", "--img-size", "100000", "-o", tmp_path / "x.onnx")
    assert "exporting sret_nano at img_size 100000 with batch 2 needs at least" in one_error_line(export)
    assert not list(tmp_path.iterdir())


# ---- where outputs go --------------------------------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    model = sret.create_model("sret_nano", num_classes=10, shuffle="fixed")
    save_weights(model, path, "sret_nano", {"num_classes": 10, "shuffle": "fixed"})
    return path


def test_export_destinations_are_checked_before_the_export(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "existing"
    folder.mkdir()
    error = one_error_line(invoke("export", checkpoint, "-o", folder))
    assert error == f"error: cannot write {folder}: it is a folder; name a file inside it"
    error = one_error_line(invoke("export", checkpoint, "-o", "/proc/x.onnx"))
    assert error.startswith("error: cannot write /proc/x.onnx: ")  # the target, not a temporary
    existing = tmp_path / "model.torchscript.pt"
    existing.write_bytes(b"a file that must survive")
    args = ("export", checkpoint, "--format", "torchscript", "-o", existing)
    assert "model.torchscript.pt exists: pass --overwrite to replace it" in one_error_line(invoke(*args))
    assert existing.read_bytes() == b"a file that must survive"
    assert invoke(*args, "--overwrite").exit_code == 0
    assert torch.jit.load(str(existing))(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    error = one_error_line(invoke("export", checkpoint, "-o", checkpoint, "--overwrite"))
    assert "is the checkpoint itself" in error


def test_every_command_that_writes_a_file_refuses_an_existing_one(checkpoint: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    png = tmp_path / "taken.png"
    png.write_bytes(b"keep me too")
    commands = [
        ("export", checkpoint, "-o", taken),
        ("recursify", checkpoint, "-L", "2", "-o", taken),
        ("distill-logits", taken, "--teacher", checkpoint),
        ("eval", checkpoint, "--dataset", "digits", "--confusion", png),
    ]
    for command in commands:
        error = one_error_line(invoke(*command))
        assert "exists: pass --overwrite to replace it" in error, command
    assert taken.read_bytes() == b"keep me" and png.read_bytes() == b"keep me too"


# ---- the advice given works ------------------------------------------------------------------------
def test_the_advice_for_weights_without_metadata_is_an_option_that_works(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pth"
    torch.save(sret.create_model("sret_nano", num_classes=10).state_dict(), plain)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    commands = [
        ("eval", plain, "--dataset", "digits", "--confusion", tmp_path / "cm.png"),
        ("predict", plain, image),
        ("export", plain, "--shuffle", "fixed", "--format", "torchscript"),
    ]
    for command in commands:
        error = one_error_line(invoke(*command))
        assert "does not say which model it holds: name the architecture (--model NAME)" in error
        done = invoke(*command, "--model", "sret_nano")
        assert done.exit_code == 0, done.output
    recursify = invoke("recursify", plain, "-L", "2", "--model", "sret_nano")  # accepted, then judged
    assert "does not say which model" not in recursify.output and "No such option" not in recursify.output
    assert "recursify needs a model whose blocks each run once" in one_error_line(recursify)


# ---- predict: nothing vanishes ---------------------------------------------------------------------
def test_predict_reports_what_it_cannot_read_in_a_folder_and_by_name(
    trained_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (32, 32), "white").save(folder / "a.png")
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:])
    os.mkfifo(folder / "pipe.png")
    os.symlink("loop.png", folder / "loop.png")
    (folder / "notes.txt").write_text("not an image")
    weights = trained_run / "best.safetensors"
    error = one_error_line(invoke("predict", weights, folder))
    assert f"cannot read image {folder / 'loop.png'}: it is a symbolic link loop" in error
    result = invoke("predict", weights, folder, "--skip-bad-images", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {str(folder / n) for n in ("a.png", "moving.gif", "pipe.png", "loop.png")}
    assert doc[str(folder / "pipe.png")] is None and doc[str(folder / "loop.png")] is None
    assert doc[str(folder / "moving.gif")]  # its first frame, as `predict moving.gif` gives
    assert result.stderr.count("warning: skipped unreadable image") == 2
    for name, why in (
        ("pipe.png", "it is a FIFO, not an image file"),
        ("loop.png", "it is a symbolic link loop"),
    ):
        error = one_error_line(invoke("predict", weights, folder / name))
        assert f"cannot read image {folder / name}: {why}" in error


# ---- formats -----------------------------------------------------------------------------------------
def test_an_export_given_as_a_checkpoint_says_what_it_is(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([], "g", [], [])
    model = onnx.helper.make_model(graph, producer_name="pytorch")
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "renamed.safetensors").write_bytes(model.SerializeToString())  # a suffix that lies
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "model.torchscript.pt"))
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    kinds = {
        "model.onnx": "an ONNX model",
        "renamed.safetensors": "an ONNX model",
        "model.torchscript.pt": "a TorchScript archive",
        "a.png": "a PNG image",
    }
    for name, kind in kinds.items():
        path = tmp_path / name
        for command in (("recursify", path, "-L", "2"), ("eval", path), ("predict", path, image)):
            error = one_error_line(invoke(*command, "--model", "sret_nano"))
            assert f"cannot read checkpoint {path}: it is {kind}" in error
            assert "not weights; expected our .safetensors" in error


# ---- Ctrl-C ----------------------------------------------------------------------------------------
def test_ctrl_c_in_predict_keeps_the_predictions_made(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sret.data import RGBLoader

    for i in range(8):
        Image.new("RGB", (32, 32), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    read, calls = RGBLoader.__call__, []

    def interrupted(self, path: str):
        calls.append(path)
        if len(calls) == 5:  # in the third batch of two
            raise KeyboardInterrupt
        return read(self, path)

    monkeypatch.setattr(RGBLoader, "__call__", interrupted)
    for json_out in ((), ("--json",)):
        calls.clear()
        args = ("predict", trained_run / "best.safetensors", tmp_path, "--batch-size", "2", "--topk", "1")
        result = invoke(*args, *json_out)
        assert result.exit_code == 130, result.output
        shown = list(json.loads(result.stdout)) if json_out else result.stdout.split()[::3]
        assert shown == [str(tmp_path / f"{i}.png") for i in range(4)]  # two whole batches
        assert "interrupted: the 4 prediction(s) made are printed; 4 image(s) were not classified" in (
            result.stderr
        )


def test_ctrl_c_in_eval_and_export_says_nothing_was_written(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sret.evaluate
    import sret.export

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sret.evaluate, "collect_logits", interrupt)
    monkeypatch.setattr(sret.export, "max_abs_diff", interrupt)  # mid-export, its file half made
    before = sorted(tmp_path.iterdir())
    for command in (
        ("eval", checkpoint, "--dataset", "digits"),
        ("export", checkpoint, "--format", "torchscript"),
    ):
        result = invoke(*command)
        assert result.exit_code == 130 and result.stderr == "interrupted: nothing written\n", result.output
    assert sorted(tmp_path.iterdir()) == before  # no confusion matrix, no export, no temporaries


def test_grid_seeds_are_one_clear_error_from_the_command_line(tmp_path: Path) -> None:
    for value, shown in (("null", "None"), ("three", "'three'"), ("1.9", "1.9")):
        grid = tmp_path / "grid.yaml"
        grid.write_text(f"variants: {{x: {{}}}}\nseeds: {value}\n")
        error = one_error_line(invoke("ablate", grid, "--out", tmp_path / "out"))
        assert error == f"error: grid {grid}: seeds must be a whole number >= 1, got {shown}"


def test_a_fifo_among_training_images_is_a_bad_image_not_a_hang(tmp_path: Path) -> None:
    from sret.data import BadImageError, RGBLoader, SkippedImage

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(BadImageError, match=r"cannot read image .*pipe\.png: not a regular file"):
        RGBLoader(strict=True)(str(fifo))
    with pytest.raises(SkippedImage):
        RGBLoader(strict=False)(str(fifo))
