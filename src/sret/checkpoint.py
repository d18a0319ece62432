"""Create models and move weights in and out: our safetensors format and the authors' `.pth` layout.

A checkpoint never runs code: `.pth` files are read with ``weights_only=True`` and our own weights are
safetensors. Files are written atomically (temporary file, then rename), so a crash mid-write never
destroys the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save
from torch import Tensor, nn

import sret.model  # noqa: F401  (registers the variants with timm)
from sret.data import Preprocess
from sret.io import UserError, atomic_write, write_bytes
from sret.model import MODEL_CONFIGS, checkpoint_filter_fn, is_official_layout

_logger = logging.getLogger(__name__)


def load_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from safetensors or a (weights-only) torch file; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    foreign = not_weights(path)
    if foreign:
        raise ValueError(foreign)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    except Exception as e:  # unpickling errors of weights_only (e.g. a pickled object) land here
        raise ValueError(
            f"cannot read checkpoint {path}: it holds Python objects besides tensors, which sret never "
            f"unpickles ({unpickling_cause(e)})"
        ) from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return state


# What a file that is not a checkpoint may be, by its first bytes (a ZIP archive is told by its members).
_MAGIC = (
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras or TensorFlow weights?)"),
    (b"\x93NUMPY", "a NumPy array (.npy)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file it stands for (fetch it: git lfs pull)"),
)
EXPECTED = "our .safetensors (from sret train or sret.save_weights) or a PyTorch state dict (.pth, .pt)"


def not_weights(path: Path) -> str | None:
    """The one-line error for a file that is something other than weights (an ONNX model, a TorchScript
    archive, an image, ...): what it is and what is expected; None when it looks like weights."""
    what = file_kind(path)
    if what == "safetensors":
        renamed = path.with_suffix(".safetensors").name
        return f"cannot read checkpoint {path}: it is safetensors under another suffix; rename it {renamed}"
    if what is None:
        return None
    return f"cannot read checkpoint {path}: it is {what}, not weights; expected {EXPECTED}"


def file_kind(path: Path) -> str | None:
    """What a file that is not weights is ("safetensors" for safetensors under another suffix), or None
    if it may be weights (or is unrecognised)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return None
    if not head:
        return "empty"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    # ONNX is a protobuf ModelProto: ir_version (field 1) first, then the producer's name (field 2)
    if head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower() or path.suffix == ".onnx"):
        return "an ONNX model (as sret export writes)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith(("/constants.pkl", "/code/")) or "/code/__torch__" in n for n in names):
            return "a TorchScript archive (as sret export --format torchscript writes)"
        if any(n.startswith("archive/") for n in names) and not any(n.endswith("/data.pkl") for n in names):
            return "a torch.export program (as sret export --format exported-program writes)"
        if not any(n.endswith("data.pkl") for n in names):
            return "a ZIP archive"
        return None
    size = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and path.suffix != ".safetensors" and size < path.stat().st_size:
        return "safetensors"
    return None


def unpickling_cause(error: Exception) -> str:
    """The line of torch's long weights-only refusal that says what the file holds."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line or "Unsupported operand" in line]
    return (named or lines or [type(error).__name__])[0]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Model name, constructor arguments and run info (class names, preprocessing) stored with our
    safetensors weights (each absent from the result if absent from the file); ValueError naming the
    file and the field if any of them is malformed."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(not_weights(path) or f"cannot read checkpoint {path}: {e}") from None
    out: dict[str, Any] = {}
    if "model_name" in meta:
        out["model_name"] = meta["model_name"]
    for key in ("model_args", "info"):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except ValueError as e:
                raise ValueError(f"{path}: metadata {key} is not JSON ({e})") from None
            if not isinstance(out[key], dict):
                raise ValueError(f"{path}: metadata {key} must be a mapping, got {type(out[key]).__name__}")
    return out


def save_weights(
    model: nn.Module,
    path: str | os.PathLike,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> None:
    """Save weights as safetensors, with the model name and arguments needed to rebuild it and `info`
    (class names and preprocessing, from `sret train`), so the file alone is enough to predict with."""
    atomic_write(path, weights_writer(model, model_name, model_args, info))


def weights_writer(
    model: nn.Module,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Callable[[str], None]:
    """What :func:`save_weights` writes, as a `write(path)` for :func:`sret.io.atomic_writes`."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {}
    if model_name:
        meta["model_name"] = model_name
    if model_args:
        meta["model_args"] = json.dumps(model_args)
    if info:
        meta["info"] = json.dumps(info)
    return write_bytes(save(state, metadata=meta))


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, new_head: bool = False
) -> nn.Module:
    """Load our safetensors or the official layout into `model` (format detected from the keys)."""
    return load_weights(model, load_state(path), path, strict, new_head)


def load_weights(
    model: nn.Module, state: dict[str, Tensor], source: Any, strict: bool = True, new_head: bool = False
) -> nn.Module:
    """Load a state dict read from `source` into `model`.

    A classifier whose shape differs from the checkpoint's is an error naming both shapes, unless
    `new_head` (the caller asked for another class count: fine-tuning), when it stays freshly
    initialised with a log line saying so.
    """
    foreign = not is_official_layout(state) and not any(k.startswith("stages.") for k in state)
    if foreign and any(k.startswith("stages.") for k in model.state_dict()):
        examples = ", ".join(sorted(state)[:3])
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise ValueError(
            f"checkpoint {source} is not a {arch} checkpoint: it holds no SReT stages ({examples}, ...)"
        )
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    body = [k for k, v in state.items() if not k.startswith("head.") and k in own and own[k].shape != v.shape]
    if body:  # another architecture: say so before anything about the classifier
        k = body[0]
        raise ValueError(
            f"checkpoint {source} does not fit this model: {len(body)} tensors differ in shape, e.g. {k} "
            f"{tuple(state[k].shape)} against {tuple(own[k].shape)}"
        )
    for key in ("head.weight", "head.bias"):
        if key not in state or (key in own and state[key].shape == own[key].shape):
            continue
        if not new_head:
            mine = tuple(own[key].shape) if key in own else "none"
            raise ValueError(
                f"checkpoint {source} has a classifier {key} of shape {tuple(state[key].shape)}, the model "
                f"{mine}: give num_classes={state[key].shape[0]} to keep it, or another count for a new one"
            )
        _logger.info("not loading %s from %s: shape differs (new classifier)", key, source)
        state.pop(key)
        strict = False
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).strip().splitlines()[-1].strip()
        raise ValueError(f"checkpoint {source} does not fit this model: {detail}") from None
    missing = [k for k in missing if not (k.startswith("head.") and not strict)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint {source} does not fit this model: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    return model


def model_from_weights(
    path: str | os.PathLike,
    model_name: str | None = None,
    loops: int | Sequence[int] | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model a weights file holds, and the file's metadata (see :func:`read_metadata`).

    The architecture comes from the metadata that `sret train` and :func:`save_weights` store (the
    model name and its arguments); `model_name` names it for a file without metadata (the authors'
    `.pth`), and `overrides` replace arguments (img_size, shuffle, ...); `loops` runs the blocks that
    many times (see :meth:`sret.model.SReT.set_loops`). The one way train, eval, predict and export
    rebuild a model from a file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        meta = read_metadata(path)
        state = load_state(path)
    except ValueError as e:
        raise UserError(str(e) if str(path) in str(e) else f"cannot read checkpoint {path}: {e}") from None
    except Exception as e:  # safetensors' header errors
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    name = model_name or meta.get("model_name")
    if name is None:
        raise UserError(f"{path} does not say which model it holds: name the architecture (--model NAME)")
    stored = meta.get("model_args", {}) if name == meta.get("model_name") else {}
    args = {**stored, **overrides}
    head = state.get("head.weight")
    if "num_classes" not in args and head is not None:
        args["num_classes"] = head.shape[0]  # a file without metadata: its own classifier decides
    try:
        model = load_weights(create_model(name, loops=loops, **args), state, path, new_head=False)
    except (ValueError, TypeError) as e:
        raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    check_info(meta.get("info") or {}, model, path)
    return model, meta


def check_info(info: dict[str, Any], model: nn.Module, path: Path) -> None:
    """The run info of a weights file must describe its model: one class name per output, and
    preprocessing options that exist."""
    classes = info.get("classes")
    outputs = getattr(model, "num_classes", None)
    if classes is not None and (not isinstance(classes, list) or len(classes) != outputs):
        count = len(classes) if isinstance(classes, list) else type(classes).__name__
        raise UserError(f"{path}: metadata names {count} classes, the classifier has {outputs} outputs")
    pre = info.get("preprocess", {})
    known = {f.name for f in fields(Preprocess)}
    if not isinstance(pre, dict) or set(pre) - known:
        unknown = sorted(set(pre) - known) if isinstance(pre, dict) else pre
        raise UserError(f"{path}: unknown preprocessing option(s) in its metadata: {unknown}")


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    new_head: bool | None = None,
    loops: int | Sequence[int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered SReT variant, optionally loading weights.

    Args:
        name: a variant from :func:`sret.list_models` (a pretrained tag such as ``sret_t.distill_in1k``
            is accepted).
        pretrained: load weights; they are not bundled, so `checkpoint_path` must name the file.
        checkpoint_path: our safetensors or the authors' `.pth` (detected automatically).
        new_head: whether a checkpoint classifier of another shape is replaced by a new one (default:
            when `num_classes` is given, i.e. fine-tuning to another class count); otherwise such a
            checkpoint is an error naming both shapes.
        loops: run each block this many times (one count, or one per stage) instead of the
            configured count: any depth from one set of weights (:meth:`sret.model.SReT.set_loops`).
        overrides: replace config fields (num_classes, img_size, shuffle, drop_path_rate, ...).
    """
    arch = name.split(".", 1)[0]
    if arch not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")
    if pretrained and checkpoint_path is None:
        raise ValueError(
            f"no weights ship with {name!r}: pass checkpoint_path= (our .safetensors or the authors' .pth)"
        )
    model = timm.create_model(name, pretrained=False, **overrides)
    if checkpoint_path is not None:
        load_checkpoint(
            model, checkpoint_path, new_head="num_classes" in overrides if new_head is None else new_head
        )
    if loops is not None:
        model.set_loops(loops)
    return model
