"""Nothing silent: a classifier that does not fit is an error (or the file's own), never a random one."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARGS
from typer.testing import CliRunner

import sret
from sret.checkpoint import create_model, load_state, model_from_weights, save_weights
from sret.cli import app
from sret.io import UserError
from sret.train import (
    FAULT_EXIT_AFTER_CHECKPOINT,
    FAULT_EXIT_CODE,
    FAULT_EXIT_IN_CHECKPOINT,
    FAULT_INTERRUPT_AFTER_STEP,
)


@pytest.fixture
def ten_classes(tmp_path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    return sret.create_model("sret_nano", num_classes=10).eval()


def test_a_mismatched_classifier_is_an_error_naming_both_shapes(ten_classes, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(ten_classes, path)  # no metadata
    with pytest.raises(
        ValueError, match=r"classifier head.weight of shape \(10, 128\), the model \(1000, 128\)"
    ):
        create_model("sret_nano", checkpoint_path=path)  # 1000 classes by default: not silently random
    kept = create_model("sret_nano", checkpoint_path=path, num_classes=10).eval()
    new = create_model("sret_nano", checkpoint_path=path, num_classes=3)  # asked for: a new head
    assert new.head.out_features == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), ten_classes(x))


def test_weights_whose_head_differs_from_their_metadata_are_refused(ten_classes, tmp_path: Path) -> None:
    path = tmp_path / "best.safetensors"
    save_weights(ten_classes, path, "sret_nano", {"num_classes": 5, "img_size": 32})
    with pytest.raises(UserError, match=r"shape \(10, 128\), the model \(5, 128\)"):
        model_from_weights(path)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    for args in (["predict", str(path), str(image)], ["export", str(path), "--shuffle", "fixed"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (1, 2), result.output
        assert "classifier head.weight of shape (10, 128), the model (5, 128)" in result.output
        assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.onnx"))  # nothing written


def test_a_plain_state_dict_keeps_its_own_classifier(ten_classes, tmp_path: Path) -> None:
    pth = tmp_path / "digits.pth"
    torch.save({"model": ten_classes.state_dict()}, pth)
    model, meta = model_from_weights(pth, "sret_nano")
    assert meta == {} and model.head.out_features == 10
    result = CliRunner().invoke(
        app, ["export", str(pth), "--model", "sret_nano", "--format", "torchscript", "--shuffle", "fixed"]
    )
    assert result.exit_code == 0, result.output
    exported = torch.jit.load(str(tmp_path / "digits.torchscript.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = sret.create_model("sret_nano", num_classes=10, shuffle="fixed")
        expected.load_state_dict(ten_classes.state_dict())
        torch.testing.assert_close(exported(x), expected.eval()(x), atol=1e-4, rtol=1e-4)


def test_a_teacher_without_its_own_classifier_is_refused(ten_classes, tmp_path: Path) -> None:
    from sret.train import resolve_config, train

    path = tmp_path / "teacher.safetensors"
    save_weights(sret.create_model("sret_nano", num_classes=4), path)
    cfg = resolve_config(
        "digits",
        teacher="sret_nano",
        teacher_checkpoint=str(path),
        epochs=1,
        train_subset=64,
        val_subset=32,
        batch_size=32,
        output=str(tmp_path),
        name="r",
    )
    with pytest.raises(ValueError, match=r"shape \(4, 128\), the model \(10, 128\)"):
        train(cfg)
    with pytest.raises(UserError, match="checkpoint not found"):
        model_from_weights(tmp_path / "missing.safetensors")


def test_non_finite_images_give_non_finite_logits_whatever_the_batch() -> None:
    model = sret.create_model("sret_t").eval()  # its stem is large enough for the fused convolutions
    x = torch.randn(3, 3, 224, 224)
    x[1, 0, 5, 5], x[2, 1, 3, 3] = float("nan"), float("inf")
    with torch.no_grad():
        batch, alone = model(x), model(x[:1])
    assert torch.isnan(batch[1:]).all() and torch.isfinite(batch[0]).all()
    torch.testing.assert_close(batch[:1], alone, rtol=1e-4, atol=1e-5)


def consistent_pair(run: Path) -> int:
    """The step of the checkpoint on disk, after checking weights and training state belong together."""
    state = torch.load(run / "last_state.pt", weights_only=True)
    weights = load_state(run / "last.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())
    return state["global_step"]


def metrics_rows(run: Path) -> list[dict]:
    """Every column of metrics.jsonl but the timings, which differ between identical runs."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "img_per_s")} for line in lines]


def test_a_save_on_a_full_disk_is_one_line_and_keeps_the_previous_pair(tmp_path: Path, cli) -> None:
    run = tmp_path / "r"
    args = ["train", "--output", str(tmp_path), "--name", "r", "--epochs", "2", "--save-every-steps", "2"]
    died = cli(*args, *TINY_ARGS, env={FAULT_EXIT_AFTER_CHECKPOINT: "1"})
    assert died.returncode == FAULT_EXIT_CODE, died.stderr
    step = consistent_pair(run)
    # the weights file (1.8 MB) still fits under 3 MB, the training state (5.4 MB) does not; the lock
    # of the process that died holding it is gone with it
    full = cli("train", "--resume", str(run), limit_kib=3000)
    assert full.returncode == 1, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot write {run / 'last_state.pt'}: File too large; the previous file is kept"
    ]
    assert "Traceback" not in full.stderr
    assert consistent_pair(run) == step  # nothing changed: the weights were not switched alone
    assert not list(run.glob(".*.tmp"))
    resumed = cli("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert consistent_pair(run) == 8


# A checkpoint every step; mixup and cutmix (numpy's generator), drop path and token shuffles (torch's),
# the EMA and a warm-up: everything a resume must restore exactly.
RESUMABLE = (
    *TINY_ARGS,
    "--epochs",
    "3",
    "--save-every-steps",
    "1",
    "--model-ema",
    *("--set", "model_ema_decay=0.9", "--set", "warmup_epochs=1", "--set", "drop_path=0.1"),
    *("--set", "mixup=0.8", "--set", "cutmix=1.0"),
)


def test_killed_at_each_kind_of_moment_then_resumed_equals_an_uninterrupted_run(tmp_path: Path, cli) -> None:
    straight = cli("train", "--output", str(tmp_path), "--name", "straight", *RESUMABLE)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    # (fault, count): where each process of the killed run dies, 4 steps an epoch, one checkpoint a step
    faults = [
        (FAULT_EXIT_AFTER_CHECKPOINT, 2),  # mid-epoch, after its second checkpoint: step 2 on disk
        (FAULT_EXIT_IN_CHECKPOINT, 1),  # in its first, step 3's files written, not switched: step 2 stays
        (FAULT_EXIT_AFTER_CHECKPOINT, 6),  # right after epoch 2's checkpoint (step 8), before its log line
    ]
    command = ["train", "--output", str(tmp_path), "--name", "killed", *RESUMABLE]
    on_disk, logged = [], []
    for fault, count in faults:
        died = cli(*command, env={fault: str(count)})
        assert died.returncode == FAULT_EXIT_CODE, died.stderr
        on_disk.append(consistent_pair(run))
        logged.append(len(metrics_rows(run)) if (run / "metrics.jsonl").exists() else 0)
        if fault == FAULT_EXIT_IN_CHECKPOINT:
            assert list(run.glob(".*.tmp"))  # killed mid-write: its temporaries are left
        command = ["train", "--resume", str(run)]
    assert on_disk == [2, 2, 8]
    assert logged == [0, 0, 1]  # epoch 2's line is written by the next resume, from the checkpoint
    finished = cli(*command)
    assert finished.returncode == 0, finished.stderr
    assert not list(run.glob(".*.tmp"))
    assert metrics_rows(tmp_path / "straight") == metrics_rows(run)  # lr, EMA scores: all of them
    assert "ema_val_acc1" in metrics_rows(run)[-1]
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, b = load_state(tmp_path / "straight" / name), load_state(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_files_are_written_with_the_umask_and_stale_temporaries_go(tmp_path: Path) -> None:
    from sret.io import atomic_write, remove_stale_temporaries

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    (tmp_path / ".curves.png.abc123.tmp").write_text("left by a kill")
    assert remove_stale_temporaries(tmp_path) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_a_decompression_bomb_is_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from sret.data import BadImageError, RGBLoader, SkippedImage

    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 400 x 400 is then a "bomb", as 20000 x 20000 is
    with pytest.raises(BadImageError, match=r"bomb\.png"):
        RGBLoader(strict=True)(str(path))
    with pytest.raises(SkippedImage):
        RGBLoader(strict=False)(str(path))


def test_the_start_line_says_what_runs_and_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_INTERRUPT_AFTER_STEP, "1")  # the start line is all this test reads
    args = ["train", "--output", str(tmp_path), "--epochs", "2", "--model", "sret_t", *TINY_ARGS]
    result = CliRunner().invoke(app, [*args, "--set", "img_size=32", "--set", "val_subset=32"])
    assert result.exit_code == 130, result.output
    said = " ".join(result.stderr.split())
    assert "sret_t at 32 px on digits (10 classes, 128 training / 32 validation images), 2 epochs" in said
    assert "warning: warmup_epochs (3) >= epochs (2)" in said
    assert "warning: sret_t is built for 224 px and trains here at 32 px" in said


def test_a_one_class_folder_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32)).save(tmp_path / split / "only" / f"{i}.png")
    data = ["--dataset", "imagefolder", "--data-dir", str(tmp_path)]
    result = CliRunner().invoke(
        app, ["train", *data, "--output", str(tmp_path / "runs"), "--batch-size", "2"]
    )
    assert result.exit_code == 1
    assert result.stderr == "error: imagefolder has 1 class: a classifier needs at least two\n"


def flip_header_bit(data: bytes, header_end: int, rng: random.Random) -> bytes:
    """One bit flipped inside the JSON header so that it no longer parses.

    safetensors writes its metadata in a per-process order, so a fixed position can land in a
    harmless place (a class name) on one run and break the file on the next; drawing until the
    header is really broken keeps the test about broken files.
    """
    while True:
        flipped = bytearray(data)
        flipped[rng.randrange(8, header_end)] ^= 1 << rng.randrange(8)
        try:
            json.loads(flipped[8:header_end].decode())
        except (UnicodeDecodeError, ValueError):
            return bytes(flipped)


def bad_checkpoints(folder: Path, seed: int = 0) -> list[Path]:
    """Truncated, empty, random, bit-flipped, crafted-metadata, pickled and foreign checkpoints."""
    import timm
    from safetensors.torch import save_file

    rng = random.Random(seed)
    model = sret.create_model("sret_nano", num_classes=10)
    info = {"classes": [str(i) for i in range(10)], "preprocess": {"img_size": 32}, "dataset": "digits"}
    good = folder / "good.safetensors"
    save_weights(model, good, "sret_nano", {"num_classes": 10, "img_size": 32}, info)
    data = good.read_bytes()
    out: list[Path] = []

    def put(name: str, content: bytes) -> None:
        (folder / name).write_bytes(content)
        out.append(folder / name)

    for i in range(3):
        put(f"truncated{i}.safetensors", data[: rng.randrange(1, len(data))])
    put("empty.safetensors", b"")
    for i in range(2):
        put(f"random{i}.safetensors", rng.randbytes(rng.randrange(8, 4096)))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for i in range(2):
        put(f"flipped{i}.safetensors", flip_header_bit(data, header_end, rng))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    crafted = {
        "args_list": {"model_name": "sret_nano", "model_args": json.dumps([1, 2])},
        "few_classes": {"model_name": "sret_nano", "info": json.dumps({"classes": ["a", "b"]})},
        "bad_preprocess": {"model_name": "sret_nano", "info": json.dumps({"preprocess": {"img_sizzle": 3}})},
        "not_json": {"model_name": "sret_nano", "model_args": "{not json"},
        "unknown_model": {"model_name": "sret_huge"},
    }
    for name, meta in crafted.items():
        save_file(state, folder / f"{name}.safetensors", metadata=meta)
        out.append(folder / f"{name}.safetensors")
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, depth=1)
    save_file(
        {k: v.contiguous() for k, v in vit.state_dict().items()},
        folder / "foreign.safetensors",
        metadata={"model_name": "sret_nano"},
    )
    out.append(folder / "foreign.safetensors")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Payload()}, folder / "pickled.pth")
    out.append(folder / "pickled.pth")
    return out


def test_fuzzed_checkpoints_give_one_line_naming_the_file_and_write_nothing(tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    checkpoints = bad_checkpoints(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    runner = CliRunner()
    for path in checkpoints:
        name = ["--model", "sret_nano"] if path.suffix == ".pth" else []
        for args in (
            ["eval", str(path), "--dataset", "digits", *name],
            ["predict", str(path), str(image)],
            ["export", str(path), "--format", "torchscript", "--shuffle", "fixed", *name],
        ):
            if args[0] in ("eval", "predict") and name:
                args = [a for a in args if a not in name]  # eval and predict take the file's own model
            result = runner.invoke(app, args)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 1, (args, result.output)
            assert len(lines) == 1 and lines[0].startswith("error:") and path.name in lines[0], (args, lines)
            assert "Traceback" not in result.output and "this must never run" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporaries


def test_resume_after_editing_the_model_in_config_yaml_is_one_line(run_copy: Path) -> None:
    from sret.train import train

    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("model: sret_nano", "model: sret_t"))
    with pytest.raises(
        UserError, match=r"last_state\.pt does not fit the run's sret_t \(was .*config\.yaml edited\?\)"
    ):
        train(resume=run_copy)
