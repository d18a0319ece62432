"""Evaluate a trained SReT on a data set, and classify image files with it.

A checkpoint written by `sret train` is self-describing: the safetensors metadata names the model, its
arguments, the class names and the preprocessing (also in `classes.json` beside it), so the file alone
is enough to classify images, and `sret eval` finds the run's data and split in `config.yaml` beside it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from timm.data import resolve_data_config
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sret.anytime import depths, early_exit
from sret.checkpoint import model_from_weights
from sret.data import IGNORE_LABEL, BadImageError, Preprocess, RGBLoader, SkippedImage, build_datasets
from sret.info import count_macs, memory_estimate
from sret.io import UserError, atomic_write, read_mapping
from sret.model import SReT
from sret.runtime import require_memory


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
    checkpoint: str | Path,
    device: str = "cpu",
    loops: int | Sequence[int] | None = None,
    model_name: str | None = None,
) -> Trained:
    """Rebuild the model (at `loops`, if given), its class names and preprocessing from the
    safetensors metadata (or `classes.json` beside it), and read the run's `config.yaml` beside it
    when there is one (else the data set and split the metadata records). `model_name` names the
    architecture of a file without metadata (the authors' `.pth`)."""
    path = Path(checkpoint)
    model, meta = model_from_weights(path, model_name, loops=loops)
    info = meta.get("info") or read_classes(path.parent / "classes.json")
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


def read_classes(path: Path) -> dict[str, Any]:
    """The run info in `classes.json` beside weights written before they carried it ({} if absent)."""
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} must hold a mapping (classes, preprocess), got {type(info).__name__}")
    return info


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
    model_name: str | None = None,
) -> EvalResult:
    """Top-1/top-5, loss, per-class accuracy and confusion matrix on a data set's validation split.

    The data set, folder, split seed and validation fraction default to the run's own, so
    `sret eval runs/x/best.safetensors` scores exactly the held-out images of that run. `loops` runs
    the model at that depth; `exit_confidence` runs each image only as deep as it needs to reach that
    softmax confidence (up to `loops`, one count, if given). `model_name` as in :func:`load_trained`.
    """
    trained = load_trained(checkpoint, device, None if exit_confidence is not None else loops, model_name)
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
    check_batch_memory(trained.model, min(batch_size, len(splits.val)), device)
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


def check_batch_memory(model: nn.Module, batch: int, device: str) -> None:
    """Refuse a `--batch-size` whose images the device cannot hold at once (sret.info.memory_estimate)."""
    if isinstance(model, SReT):
        needed = memory_estimate(model.cfg, batch, training=False)
        what = f"a batch of {batch} images at {model.img_size[0]} px"
        require_memory(needed, torch.device(device), what, "lower --batch-size")


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
    unfinished: int = 0  # images not classified because the run was interrupted (Ctrl-C)


def image_suffixes() -> set[str]:
    """The file name suffixes of the image formats Pillow decodes (what `predict FILE` reads), less the
    formats it only recognises (scientific data stubs, MPEG video, IPTC metadata): a folder's data
    files are not images."""
    extensions = Image.registered_extensions()  # loads every plugin first
    stubs = {fmt for fmt, (factory, _) in Image.OPEN.items() if _is_stub(factory)}
    decoded = set(Image.OPEN) - stubs - {"MPEG", "IPTC"}
    return {ext for ext, fmt in extensions.items() if fmt in decoded}


def _is_stub(factory: Any) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def not_a_file(path: Path) -> str | None:
    """Why `path`, which exists or is a link, cannot be read as an image file; None if it can."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "it is a symbolic link loop"
        if path.is_symlink():
            return f"it is a symbolic link to {os.readlink(path)}, which does not exist"
        return e.strerror or str(e)
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a device",
        stat.S_ISBLK: "a device",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"it is {kind}, not an image file"


def image_files(paths: list[str | Path]) -> tuple[list[str], dict[str, str]]:
    """The image files named, and the ones that cannot be read as files, with why.

    Files are taken as given; folders are expanded to the files below them whose suffix is an image
    format's (sorted; other files, a README say, are not images). Below a folder, an entry with an
    image suffix that is no regular file (a FIFO, a link that leads nowhere) and a subfolder that
    cannot be listed are reported, never dropped: opening a FIFO would wait forever, so none is opened.
    """
    files: list[str] = []
    unreadable: dict[str, str] = {}
    for path in map(Path, paths):
        if path.is_dir():
            found, broken = folder_images(path)
            if not found and not broken:
                raise UserError(f"no image files (a suffix of a format Pillow reads) in folder {path}")
            files += found
            unreadable.update(broken)
        elif path.exists() or path.is_symlink():
            why = not_a_file(path)
            if why is None:
                files.append(str(path))
            else:
                unreadable[str(path)] = why
        else:
            raise UserError(f"image not found: {path}")
    return files, unreadable


def folder_images(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The image files below `folder` (sorted), and its entries with an image suffix that cannot be
    read as files, and the subfolders that cannot be listed, with why."""
    suffixes = image_suffixes()
    found: list[str] = []
    broken: dict[str, str] = {}

    def unlisted(error: OSError) -> None:
        broken[str(error.filename)] = f"cannot list this folder: {error.strerror or error}"

    for root, _, names in os.walk(folder, onerror=unlisted):
        for name in names:
            path = Path(root) / name
            if path.suffix.lower() not in suffixes:
                continue
            why = not_a_file(path)
            if why is None:
                found.append(str(path))
            else:
                broken[str(path)] = why
    return sorted(found), dict(sorted(broken.items()))


def predict(
    checkpoint: str | Path,
    images: list[str | Path],
    topk: int = 5,
    device: str = "cpu",
    batch_size: int = 64,
    skip_bad_images: bool = False,
    loops: int | Sequence[int] | None = None,
    exit_confidence: float | None = None,
    model_name: str | None = None,
) -> Predictions:
    """Top-k (class name, probability) for each image file (or each image in a folder), `batch_size`
    images at a time, so a folder of any size runs in bounded memory. `loops`, `exit_confidence` and
    `model_name` as in :func:`evaluate`.

    Interrupted (Ctrl-C), it returns the predictions made so far, with the count of images left
    (`unfinished`), instead of throwing them away.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exit_confidence is not None and loops is not None and not isinstance(loops, int):
        raise ValueError("with early exit, loops is one count: the deepest depth tried")
    files, unreadable = image_files(images)  # every path checked before the model is built
    if unreadable and not skip_bad_images:
        path, why = next(iter(unreadable.items()))
        raise BadImageError(f"cannot read image {path}: {why} (use --skip-bad-images to skip such files)")
    trained = load_trained(checkpoint, device, None if exit_confidence is not None else loops, model_name)
    if exit_confidence is not None:
        require_sret(trained.model)
    check_batch_memory(trained.model, min(batch_size, max(len(files), 1)), device)
    stopped: dict[str, int] = {}
    tf, load = trained.pre.eval_transform(), RGBLoader(strict=not skip_bad_images)
    ranked, skipped = {}, list(unreadable)
    k = min(topk, len(trained.classes))
    start = 0
    try:
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
    except KeyboardInterrupt:
        done = set(ranked) | set(skipped)
        return Predictions(ranked, skipped, stopped, sum(f not in done for f in files[start:]))
    return Predictions(ranked, skipped, stopped)
