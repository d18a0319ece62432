"""Evaluate a trained SReT on a data set, and classify image files with it.

A checkpoint written by `sret train` is self-describing: the safetensors metadata names the model, its
arguments, the class names and the preprocessing (also in `classes.json` beside it), so the file alone
is enough to classify images, and `sret eval` finds the run's data and split in `config.yaml` beside it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file

from sret.anytime import depths, early_exit
from sret.checkpoint import model_from_weights
from sret.data import IGNORE_LABEL, Preprocess, RGBLoader, SkippedImage, build_datasets
from sret.info import count_macs
from sret.io import UserError, atomic_write, read_mapping
from sret.model import SReT


@torch.no_grad()
def collect_logits(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[Tensor, Tensor]:
    """Float32 logits and labels of every batch, on the CPU, in loader order."""
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for batch in loader:
        with autocast():
            outs.append(model(batch[0].to(device, non_blocking=True)).float().cpu())
        labels.append(batch[1])
    model.train(was_training)
    if not outs:
        raise UserError("the evaluation set is empty")
    return torch.cat(outs), torch.cat(labels).long()


class Exits(NamedTuple):
    """Early exit over a data set: the depth each image stopped at and the MACs it cost."""

    loops: Tensor
    macs: Tensor


def macs_per_depth(model: SReT, max_loops: int | None = None) -> list[int]:
    """One image's multiply-accumulates at each depth early exit tries."""
    before = model.loops
    try:
        counts = []
        for k in depths(model, max_loops):
            model.set_loops(tuple(min(k, t) for t in model.trained_loops))
            counts.append(count_macs(model))
        return counts
    finally:
        model.set_loops(before)


@torch.no_grad()
def collect_early_exit(
    model: SReT, loader: DataLoader, device: torch.device, confidence: float, max_loops: int | None = None
) -> tuple[Tensor, Tensor, Exits]:
    """:func:`collect_logits`, each image run only as deep as it needs (:func:`sret.anytime.early_exit`)."""
    model.eval()
    macs = macs_per_depth(model, max_loops)
    outs, labels, loops, spent = [], [], [], []
    for batch in loader:
        result = early_exit(model, batch[0].to(device), confidence, max_loops, macs)
        outs.append(result.logits.cpu())
        labels.append(batch[1])
        loops.append(result.loops)
        spent.append(result.macs)
    if not outs:
        raise UserError("the evaluation set is empty")
    return torch.cat(outs), torch.cat(labels).long(), Exits(torch.cat(loops), torch.cat(spent))


def scored(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The rows that count in a score: without the stand-ins of unreadable validation images."""
    keep = labels != IGNORE_LABEL
    return logits[keep], labels[keep]


@dataclass
class Trained:
    """A model rebuilt from a checkpoint, with what is needed to feed it."""

    model: nn.Module
    classes: list[str]
    pre: Preprocess
    run_config: dict[str, Any]


def load_trained(
    checkpoint: str | Path, device: str = "cpu", loops: int | Sequence[int] | None = None
) -> Trained:
    """Rebuild the model (at `loops`, if given), its class names and preprocessing from the
    safetensors metadata (or `classes.json` beside it), and read the run's `config.yaml` beside it
    when there is one (else the data set and split the metadata records)."""
    path = Path(checkpoint)
    model, meta = model_from_weights(path, loops=loops)
    info_path = path.parent / "classes.json"  # beside weights written before they carried the info
    info = meta.get("info") or (json.loads(info_path.read_text()) if info_path.is_file() else {})
    num_classes = meta.get("model_args", {}).get("num_classes", getattr(model, "num_classes", 0))
    classes = info.get("classes") or [str(i) for i in range(num_classes)]
    pre_values = info.get("preprocess", {})
    pre_values = {k: tuple(v) if isinstance(v, list) else v for k, v in pre_values.items()}
    pre = Preprocess(**pre_values) if pre_values else architecture_preprocess(model)
    config_path = path.parent / "config.yaml"
    if config_path.is_file():
        run_config = read_mapping(config_path, "run config")
    else:  # a file outside its run folder: the data set and split its metadata records
        run_config = {"dataset": info.get("dataset"), **(info.get("split") or {})}
        run_config = {k: v for k, v in run_config.items() if v is not None}
    return Trained(model.to(device).eval(), classes, pre, run_config)


def architecture_preprocess(model: nn.Module) -> Preprocess:
    """How to feed weights that record no preprocessing (the authors' checkpoints, converted): at the
    model's resolution, as its architecture's pretrained config says (timm's data config: ImageNet
    mean and std, bicubic, a 0.875 centre crop at 224 px and none for the 384/512 fine-tunes)."""
    data = resolve_data_config(model=model)
    size = getattr(model, "img_size", data["input_size"][-2:])[0]
    return Preprocess(
        img_size=size,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data["interpolation"],
        crop_pct=data["crop_pct"],
    )


@dataclass
class EvalResult:
    loss: float
    acc1: float
    acc5: float
    per_class: list[float]
    confusion: Tensor
    classes: list[str]
    skipped: int = 0  # unreadable images left out (with skip_bad_images)
    exit_loops: dict[int, int] | None = None  # early exit: images that stopped at each depth
    mean_macs: float | None = None  # early exit: multiply-accumulates per image, on average


def evaluate(
    checkpoint: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    confusion_png: str | Path | None = None,
    skip_bad_images: bool = False,
    loops: int | Sequence[int] | None = None,
    exit_confidence: float | None = None,
) -> EvalResult:
    """Top-1/top-5, loss, per-class accuracy and confusion matrix on a data set's validation split.

    The data set, folder, split seed and validation fraction default to the run's own, so
    `sret eval runs/x/best.safetensors` scores exactly the held-out images of that run. `loops` runs
    the model at that depth; `exit_confidence` runs each image only as deep as it needs to reach that
    softmax confidence (up to `loops`, one count, if given).
    """
    trained = load_trained(checkpoint, device, None if exit_confidence is not None else loops)
    cfg = trained.run_config
    dataset = dataset or cfg.get("dataset")
    if dataset is None:
        raise UserError("which data set? pass --dataset")
    if data_dir is None and dataset == cfg.get("dataset"):
        data_dir = cfg.get("data_dir")
    splits = build_datasets(
        dataset,
        data_dir,
        trained.pre,
        val_fraction=cfg.get("val_fraction", 0.2),
        seed=cfg.get("seed", 0),
        skip_bad_images=skip_bad_images,
    )
    if len(splits.classes) != len(trained.classes):
        raise UserError(
            f"{dataset} has {len(splits.classes)} classes, the model predicts {len(trained.classes)}"
        )
    loader = DataLoader(splits.val, batch_size=batch_size)
    if exit_confidence is None:
        logits, labels = scored(*collect_logits(trained.model, loader, torch.device(device)))
        return replace(score(logits, labels, trained.classes, confusion_png), skipped=splits.skipped)
    model = require_sret(trained.model)
    if loops is not None and not isinstance(loops, int):
        raise ValueError("with early exit, loops is one count: the deepest depth tried")
    logits, labels, exits = collect_early_exit(model, loader, torch.device(device), exit_confidence, loops)
    keep = labels != IGNORE_LABEL
    result = score(logits[keep], labels[keep], trained.classes, confusion_png)
    stopped = exits.loops[keep]
    histogram = {int(k): int((stopped == k).sum()) for k in stopped.unique()}
    return replace(
        result,
        skipped=splits.skipped,
        exit_loops=histogram,
        mean_macs=float(exits.macs[keep].double().mean()),
    )


def require_sret(model: nn.Module) -> SReT:
    if not isinstance(model, SReT):
        raise UserError(f"{type(model).__name__} has no loops to choose: early exit needs a SReT")
    return model


def score(logits: Tensor, labels: Tensor, classes: list[str], confusion_png: str | Path | None) -> EvalResult:
    from sklearn.metrics import confusion_matrix

    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    n = len(classes)
    cm = torch.as_tensor(confusion_matrix(labels.numpy(), top[:, 0].numpy(), labels=list(range(n))))
    support = cm.sum(1).clamp(min=1)
    result = EvalResult(
        loss=float(F.cross_entropy(logits, labels)),
        acc1=float((top[:, 0] == labels).float().mean()),
        acc5=float((top == labels[:, None]).any(1).float().mean()),
        per_class=(cm.diag() / support).tolist(),
        confusion=cm,
        classes=classes,
    )
    if confusion_png is not None:
        plot_confusion(cm, classes, Path(confusion_png))
    return result


def plot_confusion(cm: Tensor, classes: list[str], path: Path) -> None:
    """Confusion matrix image via scikit-learn's display (labels shown up to 30 classes)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(classes)
    size = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    labels = classes if n <= 30 else None
    ConfusionMatrixDisplay(cm.numpy(), display_labels=labels).plot(
        ax=ax, include_values=n <= 20, xticks_rotation="vertical", colorbar=False
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


class Predictions(NamedTuple):
    """What `predict` returns: top-k per readable image (input order) and the images passed over."""

    ranked: dict[str, list[tuple[str, float]]]  # image path -> [(class name, probability)], best first
    skipped: list[str]  # unreadable images, with skip_bad_images
    loops: dict[str, int]  # with early exit: the depth each image stopped at (else empty)


def image_files(paths: list[str | Path]) -> list[str]:
    """The image files named: files as given, folders expanded to the images below them (sorted)."""
    files: list[str] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and is_image_file(str(f)))
            if not found:
                raise UserError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise UserError(f"image not found: {path}")
    return files


def predict(
    checkpoint: str | Path,
    images: list[str | Path],
    topk: int = 5,
    device: str = "cpu",
    batch_size: int = 64,
    skip_bad_images: bool = False,
    loops: int | Sequence[int] | None = None,
    exit_confidence: float | None = None,
) -> Predictions:
    """Top-k (class name, probability) for each image file (or each image in a folder), `batch_size`
    images at a time, so a folder of any size runs in bounded memory. `loops` and `exit_confidence`
    as in :func:`evaluate`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exit_confidence is not None and loops is not None and not isinstance(loops, int):
        raise ValueError("with early exit, loops is one count: the deepest depth tried")
    files = image_files(images)  # every path checked before the model is built
    trained = load_trained(checkpoint, device, None if exit_confidence is not None else loops)
    if exit_confidence is not None:
        require_sret(trained.model)
    stopped: dict[str, int] = {}
    tf, load = trained.pre.eval_transform(), RGBLoader(strict=not skip_bad_images)
    ranked, skipped = {}, []
    k = min(topk, len(trained.classes))
    for start in range(0, len(files), batch_size):
        names, batch = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(tf(load(path)))
            except SkippedImage:
                skipped.append(path)
                continue
            names.append(path)
        if not batch:
            continue
        inputs = torch.stack(batch).to(device)
        if exit_confidence is not None:
            result = early_exit(trained.model, inputs, exit_confidence, loops)
            probs = result.logits.softmax(-1).cpu()
            stopped.update(zip(names, result.loops.tolist(), strict=True))
        else:
            with torch.inference_mode():
                probs = trained.model(inputs).float().softmax(-1).cpu()
        values, indices = probs.topk(k, dim=1)
        for name, vs, ids in zip(names, values.tolist(), indices.tolist(), strict=True):
            ranked[name] = [(trained.classes[i], p) for p, i in zip(vs, ids, strict=True)]
    return Predictions(ranked, skipped, stopped)
