"""Export: every format runs outside the Python model and matches it; a random shuffle is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sret
from sret.cli import app
from sret.export import ExportMismatch, ExportRefused, export_model
from sret.io import UserError

FORMATS = ("onnx", "torchscript", "exported-program")


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our safetensors of a trained-looking sret_nano (default shuffle: 'random')."""
    torch.manual_seed(0)
    model = sret.create_model("sret_nano")
    path = tmp_path_factory.mktemp("ckpt") / "nano.safetensors"
    sret.save_weights(model, path, "sret_nano", {"img_size": 32})
    return path


def run_artifact(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    """Load and run the artifact the way a consumer would, independently of sret.export."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    with open(path, "rb") as f:
        return torch.export.load(f).module()(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("shuffle", ["fixed", "none"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_pytorch(nano_checkpoint: Path, tmp_path: Path, fmt: str, shuffle: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"nano.{fmt}"
    result = export_model(nano_checkpoint, fmt, out, shuffle=shuffle)
    assert result.path == out and out.is_file()
    assert result.shuffle == shuffle and result.max_abs_diff <= 1e-4

    model = sret.create_model("sret_nano", checkpoint_path=nano_checkpoint, shuffle=shuffle).eval()
    x = torch.randn(3, 3, 32, 32)  # a batch size other than the example's: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x)
        got = run_artifact(fmt, out, x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_sret_t_structure_exports_to_onnx(tmp_path: Path) -> None:
    """sret_t's slicing (8 then 2 groups with a fixed permutation in stage 0) survives ONNX (~20-30 s)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "sret_t.onnx"
    torch.manual_seed(0)
    result = export_model("sret_t", "onnx", out, img_size=64, shuffle="fixed", random_init=True)
    assert result.max_abs_diff <= 1e-4 and result.img_size == 64
    torch.manual_seed(0)  # the same random initialisation as inside the export
    model = sret.create_model("sret_t", img_size=64, shuffle="fixed").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (run_artifact("onnx", out, x) - model(x)).abs().max().item() <= 1e-4


def test_random_shuffle_is_refused(nano_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "nano.onnx"
    with pytest.raises(ExportRefused, match=r"shuffle='random'.*torch\.randperm.*--shuffle fixed"):
        export_model(nano_checkpoint, "onnx", out)
    assert not out.exists()
    args = ["export", str(nano_checkpoint), "--format", "torchscript", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3
    assert "static graph" in result.output and "--shuffle fixed" in result.output


def test_mismatch_writes_nothing(nano_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "nano.pt"
    out.write_bytes(b"previous")
    with pytest.raises(ExportMismatch, match="differs from PyTorch"):  # even asked to replace it
        export_model(nano_checkpoint, "torchscript", out, shuffle="fixed", atol=-1.0, overwrite=True)
    assert out.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_cli_export_and_errors(nano_checkpoint: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "nano.torchscript.pt"
    args = ["export", str(nano_checkpoint), "--format", "torchscript", "--shuffle", "none", "-o", str(out)]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert out.is_file() and "max |exported - PyTorch|" in ok.output
    missing = runner.invoke(app, ["export", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "not found" in missing.output
    bad = runner.invoke(app, ["export", str(nano_checkpoint), "--format", "tflite", "--shuffle", "none"])
    assert bad.exit_code == 2 and "format must be one of" in bad.output


def test_pth_checkpoint_needs_and_takes_model_name(nano_checkpoint: Path, tmp_path: Path) -> None:
    """A plain torch state dict carries no architecture: --model names it."""
    pth = tmp_path / "nano.pth"
    torch.save(sret.create_model("sret_nano", checkpoint_path=nano_checkpoint).state_dict(), pth)
    with pytest.raises(UserError, match="--model"):
        export_model(pth, "torchscript", shuffle="fixed")
    result = export_model(pth, "torchscript", model_name="sret_nano", shuffle="fixed")
    assert result.path == tmp_path / "nano.torchscript.pt" and result.max_abs_diff <= 1e-4
