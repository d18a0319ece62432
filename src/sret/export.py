"""Export a SReT to ONNX, TorchScript or a torch.export ExportedProgram, and prove the artifact right.

Every export is verified before it is kept: the artifact is run (onnxruntime, torch.jit.load,
torch.export.load) on random inputs at two batch sizes, and its output must match the PyTorch model
within `atol`; the file only replaces its destination once that holds.

A model with ``shuffle='random'`` is refused: it draws a fresh token permutation per call, which a
static graph cannot hold.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sret.checkpoint import create_model, model_from_weights, read_metadata
from sret.info import memory_estimate, model_config
from sret.io import UserError, atomic_write, check_destination
from sret.model import MODEL_CONFIGS
from sret.runtime import require_memory

_logger = logging.getLogger(__name__)

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
ONNX_OPSET = 18
MAX_BATCH = 4096


class ExportRefused(ValueError):
    """The model cannot be exported faithfully as configured."""


class ExportMismatch(RuntimeError):
    """The exported artifact does not reproduce the PyTorch model."""


@dataclass
class ExportResult:
    path: Path
    format: str
    exporter: str
    model_name: str
    shuffle: str | None
    img_size: int
    max_abs_diff: float


# --------------------------------------------------------------------------------------------------
# The model to export
# --------------------------------------------------------------------------------------------------
def build_model(
    source: str | os.PathLike,
    model_name: str | None = None,
    img_size: int | None = None,
    shuffle: str | None = None,
    random_init: bool = False,
    loops: int | Sequence[int] | None = None,
) -> tuple[nn.Module, str]:
    """The model in eval mode, from our safetensors (architecture from its metadata) or a `.pth` + name.

    With `random_init`, `source` is a model name and the weights stay random (for trying the exporter).
    """
    overrides: dict[str, Any] = {}
    if img_size is not None:
        overrides["img_size"] = img_size
    if shuffle is not None:
        overrides["shuffle"] = shuffle
    if random_init:
        name = model_name or str(source)
        return create_model(name, loops=loops, **overrides).eval(), name
    if not Path(source).is_file():
        raise UserError(f"checkpoint not found: {source} (a model name needs --random-init)")
    model, meta = model_from_weights(source, model_name, loops=loops, **overrides)
    return model.eval(), model_name or meta["model_name"]


def check_memory(
    source: str | os.PathLike,
    model_name: str | None,
    random_init: bool,
    overrides: dict[str, Any],
    batch: int,
) -> None:
    """Refuse an `--img-size` or `--batch` this machine cannot export at, before the model is built
    (its positional embedding and token layouts alone grow with the size): see sret.info.memory_estimate.
    A source that does not name a SReT is left to the checks that name the problem."""
    if batch + 1 > MAX_BATCH:
        raise ValueError(
            f"--batch must be at most {MAX_BATCH - 1} (the largest batch an export takes), got {batch}"
        )
    stored: dict[str, Any] = {}
    if not random_init:
        try:
            meta = read_metadata(source) if Path(source).is_file() else {}
        except ValueError:
            return  # an unreadable file: building the model says why
        stored = meta.get("model_args", {}) if model_name in (None, meta.get("model_name")) else {}
        model_name = model_name or meta.get("model_name")
    name = str(model_name or source)
    if name.split(".", 1)[0] not in MODEL_CONFIGS:
        return
    try:
        cfg = model_config(name, **{**stored, **overrides})
    except (TypeError, ValueError):
        return  # arguments that do not build: building the model says which
    size = overrides.get("img_size", cfg.img_size)
    what = f"exporting {name} at img_size {size} with batch {batch}"
    needed = memory_estimate(cfg, batch + 1, training=False)
    require_memory(needed, torch.device("cpu"), what, "lower --img-size or --batch")


def check_exportable(model: nn.Module, name: str, fmt: str) -> None:
    """Refuse what a format cannot hold (a random token shuffle; per-loop adapters in TorchScript),
    with what to do instead."""
    cfg = getattr(model, "cfg", None)
    if fmt == "torchscript" and getattr(cfg, "adapted", False):
        raise ExportRefused(
            f"refusing to export {name} to TorchScript: its per-loop adapters run each shared block with "
            "that loop's weights through torch.func.functional_call, which torch.jit.trace does not "
            "support. Export it as onnx or exported-program, which hold the adapted weights exactly."
        )
    shuffle = getattr(cfg, "shuffle", None)
    if shuffle == "random":
        raise ExportRefused(
            f"refusing to export {name} with shuffle='random': that mode draws a new token permutation "
            "(torch.randperm) on every call, which a static graph cannot capture; the exported model would "
            "replay one frozen permutation and no longer match the PyTorch model. Export with "
            "--shuffle fixed (the seeded permutations this model already uses in eval mode, so evaluation "
            "outputs are unchanged unless random_eval is set) or --shuffle none (no permutation)."
        )


def model_img_size(model: nn.Module) -> int:
    size = getattr(model, "img_size", None) or model.pretrained_cfg["input_size"][-2:]
    return int(size[0]) if not isinstance(size, int) else size


# --------------------------------------------------------------------------------------------------
# Writers and readers per format
# --------------------------------------------------------------------------------------------------
def _batch_dim() -> dict[int, Any]:
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


def write_onnx(model: nn.Module, x: Tensor, path: str) -> str:
    """ONNX through torch.export (dynamic batch); the TorchScript-based exporter if that fails."""
    try:
        program = torch.onnx.export(
            model, (x,), dynamo=True, dynamic_shapes=(_batch_dim(),), opset_version=ONNX_OPSET, verbose=False
        )
        program.save(path)
        return "torch.onnx dynamo"
    except Exception as e:  # any failure of the newer exporter: the older one may still cope
        _logger.warning("dynamo ONNX export failed (%s); falling back to the TorchScript-based exporter", e)
    torch.onnx.export(
        model,
        (x,),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return "torch.onnx torchscript"


def write_torchscript(model: nn.Module, x: Tensor, path: str) -> str:
    """Trace: the forward is Python control flow over static shapes, which tracing unrolls into a graph
    that keeps the batch size generic (scripting is not needed)."""
    with warnings.catch_warnings():
        # Shape checks on Python ints become constants: right for the fixed resolution being exported.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)  # deprecated, still supported
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, path)
    return "torch.jit.trace"


def write_exported_program(model: nn.Module, x: Tensor, path: str) -> str:
    program = torch.export.export(model, (x,), dynamic_shapes=(_batch_dim(),))
    with open(path, "wb") as f:  # a file object: torch.export.save insists on a .pt2 name otherwise
        torch.export.save(program, f)
    return "torch.export"


def onnx_runner(path: str) -> Callable[[Tensor], Tensor]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {input_name: x.numpy()})[0])


def torchscript_runner(path: str) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit", FutureWarning)
        return torch.jit.load(path, map_location="cpu")


def exported_program_runner(path: str) -> Callable[[Tensor], Tensor]:
    with open(path, "rb") as f:
        return torch.export.load(f).module()


WRITERS = {
    "onnx": write_onnx,
    "torchscript": write_torchscript,
    "exported-program": write_exported_program,
}
RUNNERS = {
    "onnx": onnx_runner,
    "torchscript": torchscript_runner,
    "exported-program": exported_program_runner,
}


# --------------------------------------------------------------------------------------------------
# Export + verification
# --------------------------------------------------------------------------------------------------
def max_abs_diff(model: nn.Module, run: Callable[[Tensor], Tensor], inputs: list[Tensor]) -> float:
    """Largest |artifact - PyTorch| over the inputs."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            worst = max(worst, (run(x).float() - model(x).float()).abs().max().item())
    return worst


def default_output(source: str | os.PathLike, fmt: str) -> Path:
    path = Path(source)
    base = path.with_suffix("") if path.suffix else path
    return base.parent / (base.name + FORMATS[fmt])


def export_model(
    source: str | os.PathLike,
    fmt: str,
    output: str | os.PathLike | None = None,
    model_name: str | None = None,
    img_size: int | None = None,
    batch: int = 2,
    shuffle: str | None = None,
    random_init: bool = False,
    atol: float = 1e-4,
    loops: int | Sequence[int] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export, verify against PyTorch and (only if it matches) write the artifact atomically. The
    destination is checked first (an existing file is replaced only with `overwrite`), and so are the
    sizes, so that nothing is built for an export that could not be written."""
    if fmt not in WRITERS:
        raise ValueError(f"format must be one of {', '.join(WRITERS)}, got {fmt!r}")
    path = Path(output) if output is not None else default_output(source, fmt)
    if not random_init and Path(source).is_file() and path.resolve() == Path(source).resolve():
        raise UserError(f"the output {path} is the checkpoint itself: name another file")
    check_destination(path, overwrite)
    check_memory(source, model_name, random_init, {"img_size": img_size} if img_size else {}, batch)
    model, name = build_model(source, model_name, img_size, shuffle, random_init, loops)
    check_exportable(model, name, fmt)
    size = model_img_size(model)
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    generator = torch.Generator().manual_seed(0)
    example, *checks = (
        torch.randn(b, in_chans, size, size, generator=generator) for b in (batch, batch, batch + 1)
    )
    outcome: dict[str, Any] = {}

    def write_and_verify(tmp: str) -> None:
        with torch.no_grad():
            outcome["exporter"] = WRITERS[fmt](model, example, tmp)
        outcome["diff"] = max_abs_diff(model, RUNNERS[fmt](tmp), checks)
        if not outcome["diff"] <= atol:
            raise ExportMismatch(
                f"{fmt} export of {name} differs from PyTorch by {outcome['diff']:.3g} (> {atol:g}); "
                "nothing written"
            )

    atomic_write(path, write_and_verify)
    return ExportResult(
        path=path,
        format=fmt,
        exporter=outcome["exporter"],
        model_name=name,
        shuffle=getattr(getattr(model, "cfg", None), "shuffle", None),
        img_size=size,
        max_abs_diff=outcome["diff"],
    )
