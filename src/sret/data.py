"""Data sets, transforms and batch mixing for training and evaluating SReT.

Every data set yields ``(image_tensor, label)`` pairs of 3-channel images normalised with the ImageNet
statistics, so one model and one preprocessing recipe serve all of them and `sret predict` can
rebuild the evaluation transform from what a run saved. Nothing here downloads: a missing data set is a
clear error.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp
from torch.utils.data import Dataset, Subset, TensorDataset

from sret.io import UserError

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder")


class BadImageError(UserError):
    """An image file that cannot be decoded."""


class DataPipelineError(UserError):
    """A transform failed on an image; the message names both."""


@dataclass(frozen=True)
class Preprocess:
    """What turns an image file into model input; saved with every run so inference matches training."""

    img_size: int = 32
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def eval_transform(self) -> Callable:
        return create_transform(
            (3, self.img_size, self.img_size),
            is_training=False,
            interpolation=self.interpolation,
            crop_pct=self.crop_pct,
            mean=self.mean,
            std=self.std,
        )


@dataclass(frozen=True)
class Augment:
    """DeiT-style per-image augmentation (all timm); `enabled=False` uses the evaluation transform."""

    enabled: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.3
    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1

    def train_transform(self, pre: Preprocess) -> Callable:
        if not self.enabled:
            return pre.eval_transform()
        transform = create_transform(
            (3, pre.img_size, pre.img_size),
            is_training=True,
            scale=self.scale,
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.auto_augment,
            interpolation=pre.interpolation,
            re_prob=self.re_prob,
            re_mode=self.re_mode,
            re_count=self.re_count,
            mean=pre.mean,
            std=pre.std,
        )
        for op in augment_ops(transform):
            if op.name in POSTERIZE_OPS:
                op.aug_fn = posterize
        return transform


POSTERIZE_OPS = ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op with the same meaning on every Pillow: keep the top `bits_to_keep` bits.

    DeiT's RandAugment policy (`...-inc1`) asks for 0 bits at full magnitude, meaning a black image.
    Pillow up to 12 computes exactly that; Pillow 13 refuses 0 bits with a ValueError, which stopped
    training runs a few hundred images in. Here 0 bits gives the black image of Pillow 12 (every
    channel value masked to 0); 1 to 7 bits are Pillow's own posterize.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def augment_ops(transform: Any) -> Iterator[AugmentOp]:
    """The timm AugmentOps inside a (composed) transform: RandAugment, AutoAugment and AugMix ops."""
    for step in getattr(transform, "transforms", [transform]):
        ops = list(getattr(step, "ops", []))
        for sub_policy in getattr(step, "policy", []):  # AutoAugment: a list of op lists
            ops.extend(sub_policy)
        yield from (op for op in ops if isinstance(op, AugmentOp))


@dataclass
class DataSplits:
    """Training and validation sets with their class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    bad_images: Any = field(default=None, repr=False)  # shared counter of skipped files, or None

    @property
    def skipped(self) -> int:
        return 0 if self.bad_images is None else int(self.bad_images.value)


class RGBLoader:
    """A PIL loader that names the file it cannot read (a class, so worker processes can pickle it).

    With `cache`, each decoded image is kept in memory and served from there on later epochs: for small
    images (CIFAR's 32 px) opening and decoding the file costs as much as augmenting it. The transforms
    return new images, so a cached one is never changed. Each loader process keeps its own cache.
    """

    def __init__(self, strict: bool, cache: bool = False) -> None:
        self.strict = strict
        self.cache: dict[str, Image.Image] | None = {} if cache else None

    def __call__(self, path: str) -> Image.Image:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        image = self.read(path)
        if self.cache is not None:
            self.cache[path] = image
        return image

    def read(self, path: str) -> Image.Image:
        try:
            if not os.path.isfile(path):  # a FIFO would block the open forever, a link loop fail on it
                raise OSError("not a regular file (a FIFO, a socket, or a link that leads nowhere)")
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if self.strict:
                raise BadImageError(
                    f"cannot read image {path}: {e} (use --skip-bad-images to skip such files)"
                ) from None
            raise SkippedImage(path, e) from None


class SkippedImage(Exception):
    """An unreadable image that a non-strict RGBLoader passes over, for its caller to skip and count."""

    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(path)
        self.path, self.error = path, error


IGNORE_LABEL = -1  # label of a validation image's stand-in: left out of every metric


class SkippingImageFolder(Dataset):
    """An `ImageFolder` that replaces an unreadable image by the next readable one, with a warning.

    The replacement keeps batch shapes and the sampler's bookkeeping intact (no ragged batches, no
    rank imbalance under DDP). In a validation set the stand-in is labelled IGNORE_LABEL, so scores
    leave it out instead of counting its neighbour twice. Skips are counted in a process-shared
    integer so data-loader workers report them to the main process.
    """

    def __init__(
        self, root: Path, transform: Callable, counter: Any, validation: bool, cache: bool = False
    ) -> None:
        from torchvision.datasets import ImageFolder

        self.validation = validation
        self.skipped = counter
        self.folder = ImageFolder(str(root), transform=transform, loader=RGBLoader(False, cache))
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.folder)):
            try:
                image, label = self.folder[(index + offset) % len(self.folder)]
            except SkippedImage as skip:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                warnings.warn(f"skipping unreadable image {skip.path}: {skip.error}", stacklevel=2)
                continue
            return image, IGNORE_LABEL if offset and self.validation else label
        raise UserError(f"no readable image in {self.folder.root}")


class NamedFailures(Dataset):
    """A data set whose transform errors name the image and the transform that failed.

    Without it, an exception deep inside an augmentation (in a loader worker) reaches the user as one
    line with neither; this re-raises it as a DataPipelineError, which the CLI prints as one line and
    which stops a run with its last checkpoint intact. Unreadable files keep their own errors.
    """

    def __init__(self, dataset: Dataset, split: str) -> None:
        self.dataset, self.split = dataset, split

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except (UserError, SkippedImage):
            raise
        except Exception as e:
            raise DataPipelineError(
                f"{self.split} image {self.image_name(index)}: {failed_transform(e)} failed: "
                f"{type(e).__name__}: {e}"
            ) from None

    def image_name(self, index: int) -> str:
        folder = getattr(self.dataset, "folder", self.dataset)  # SkippingImageFolder wraps an ImageFolder
        samples = getattr(folder, "samples", None)
        return str(samples[index][0]) if samples is not None else f"#{index}"


def failed_transform(error: BaseException) -> str:
    """The innermost transform object on the traceback of `error` (a timm or torchvision one)."""
    name = "the transform"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        module = type(owner).__module__ or ""
        if isinstance(owner, AugmentOp):
            name = f"augmentation op {owner.name}"
        elif module.startswith(("timm.data", "torchvision.transforms")):
            name = type(owner).__name__
    return name


def _folder(root: Path, transform: Callable, counter: Any, validation: bool, cache: bool) -> Dataset:
    from torchvision.datasets import ImageFolder

    try:
        if counter is not None:
            return SkippingImageFolder(root, transform, counter, validation, cache)
        return ImageFolder(str(root), transform=transform, loader=RGBLoader(True, cache))
    except FileNotFoundError as e:  # torchvision: no class folders or no images
        raise UserError(f"{root}: {e}") from None


def _digits(pre: Preprocess, val_fraction: float, seed: int) -> DataSplits:
    """scikit-learn's 8x8 digits, upsampled once with the evaluation transform and held as tensors.

    Per-image augmentation is pointless at this size, and precomputing keeps an epoch well under a
    second on two CPU cores. The split is stratified with a fixed seed, so `sret eval` finds the same
    held-out images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    tf = pre.eval_transform()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = torch.stack([tf(Image.fromarray(p, mode="L").convert("RGB")) for p in pixels])
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=digits.target, random_state=seed
    )
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    return DataSplits(
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
        [str(c) for c in digits.target_names],
    )


def resident_bytes(name: str, img_size: int) -> int:
    """Memory a data set holds at once at `img_size`: the digits, decoded and resized up front (see
    `_digits`); 0 for the others, read image by image."""
    if name != "digits":
        return 0
    from sklearn.datasets import load_digits

    return len(load_digits().target) * 3 * img_size * img_size * 4  # float32 RGB


def _need_dir(name: str, data_dir: str | Path | None) -> Path:
    if data_dir is None:
        raise UserError(f"dataset {name!r} needs --data-dir")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise UserError(f"data directory not found: {root}")
    return root


def _cifar(name: str, root: Path, train_tf: Callable, eval_tf: Callable) -> DataSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, folder = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (CIFAR100, "cifar-100-python")
    if root.name == folder:
        root = root.parent
    try:
        train = cls(str(root), train=True, transform=train_tf, download=False)
        val = cls(str(root), train=False, transform=eval_tf, download=False)
    except RuntimeError:
        raise UserError(
            f"{name}: python-format files not found or corrupt in {root / folder} (sret never downloads data)"
        ) from None
    return DataSplits(train, val, list(train.classes))


def _fashion_mnist(root: Path, train_tf: Callable, eval_tf: Callable) -> DataSplits:
    from torchvision.datasets import FashionMNIST

    if root.name == "FashionMNIST":
        root = root.parent
    rgb = _ToRGB()
    try:
        train = FashionMNIST(str(root), train=True, transform=_compose(rgb, train_tf), download=False)
        val = FashionMNIST(str(root), train=False, transform=_compose(rgb, eval_tf), download=False)
    except RuntimeError:
        raise UserError(
            f"fashion_mnist: idx files not found in {root / 'FashionMNIST' / 'raw'} (sret never downloads)"
        ) from None
    return DataSplits(train, val, list(train.classes))


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB")


def _compose(*fns: Callable) -> Callable:
    from torchvision.transforms import Compose

    return Compose(list(fns))


def subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A seeded random subset (all classes represented), for quick experiments on big data sets."""
    if size is None or size >= len(dataset):
        return dataset
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, perm[:size].tolist())


def build_datasets(
    name: str,
    data_dir: str | Path | None = None,
    pre: Preprocess | None = None,
    augment: Augment | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad_images: bool = False,
    cache_images: bool = False,
) -> DataSplits:
    """Training and validation sets of a named data set (see `DATASETS`); an image folder's decoded
    images kept in memory after their first read with `cache_images`."""
    pre = pre or Preprocess()
    augment = augment or Augment()
    if name == "digits":
        return _digits(pre, val_fraction, seed)
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root = _need_dir(name, data_dir)
    train_tf, eval_tf = augment.train_transform(pre), pre.eval_transform()
    if name in ("cifar10", "cifar100"):
        return _named(_cifar(name, root, train_tf, eval_tf))
    if name == "fashion_mnist":
        return _named(_fashion_mnist(root, train_tf, eval_tf))
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"imagefolder needs {root / split} with one folder per class")
    counter = multiprocessing.Value("i", 0) if skip_bad_images else None
    train = _folder(root / "train", train_tf, counter, validation=False, cache=cache_images)
    val = _folder(root / "val", eval_tf, counter, validation=True, cache=cache_images)
    if list(train.classes) != list(val.classes):
        raise UserError(f"class folders differ between {root / 'train'} and {root / 'val'}")
    return _named(DataSplits(train, val, list(train.classes), counter))


def _named(splits: DataSplits) -> DataSplits:
    splits.train = NamedFailures(splits.train, "training")
    splits.val = NamedFailures(splits.val, "validation")
    return splits


class WithIndex(Dataset):
    """Yields `(image, label, index)`, to look up precomputed teacher logits per sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


def build_mixup(
    num_classes: int, mixup: float, cutmix: float, prob: float, switch_prob: float, smoothing: float
) -> Mixup | None:
    """timm's Mixup/CutMix (which also applies label smoothing to the mixed targets), or None if off."""
    if (mixup <= 0 and cutmix <= 0) or prob <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup,
        cutmix_alpha=cutmix,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=smoothing,
        num_classes=num_classes,
    )
