"""Nothing silent: a classifier that does not fit is an error (or the file's own), never a random one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sret
from sret.checkpoint import create_model, model_from_weights, save_weights
from sret.cli import app
from sret.io import UserError


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
    with pytest.raises(ValueError, match=r"shape \(10, 128\), the model \(5, 128\)"):
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
