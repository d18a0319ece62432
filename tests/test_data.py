"""Data sets: embedded digits, image folders with bad files, missing data, the shared real data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sret.data import IGNORE_LABEL, BadImageError, build_datasets, build_mixup, subset
from sret.io import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_digits_split_is_stratified_fixed_and_model_sized() -> None:
    a, b = build_datasets("digits"), build_datasets("digits")
    assert (len(a.train), len(a.val)) == (1437, 360)
    assert a.classes == [str(i) for i in range(10)]
    assert torch.equal(a.val.tensors[0], b.val.tensors[0])
    image, label = a.train[0]
    assert image.shape == (3, 32, 32) and 0 <= int(label) < 10
    per_class = Counter(a.val.tensors[1].tolist())
    assert min(per_class.values()) >= 35 and max(per_class.values()) <= 37
    other = build_datasets("digits", seed=1)
    assert not torch.equal(a.val.tensors[1], other.val.tensors[1])


def _image_folder(root: Path, corrupt: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    if corrupt:
        (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_image_folder_names_a_corrupt_file(tmp_path: Path) -> None:
    splits = build_datasets("imagefolder", _image_folder(tmp_path))
    assert splits.classes == ["cat", "dog"] and len(splits.train) == 7
    with pytest.raises(BadImageError, match=r"broken\.png"):
        [splits.train[i] for i in range(len(splits.train))]


def test_image_folder_skips_and_counts_bad_files(tmp_path: Path) -> None:
    splits = build_datasets("imagefolder", _image_folder(tmp_path), skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"broken\.png"):
        items = [splits.train[i] for i in range(len(splits.train))]
    assert all(img.shape == (3, 32, 32) for img, _ in items)
    assert splits.skipped == 1
    # a training image's stand-in (the next readable file, here the first dog) is trained on
    assert [label for _, label in items] == [0, 0, 0, 1, 1, 1, 1]


def test_unreadable_validation_images_are_left_out_of_the_scores(tmp_path: Path) -> None:
    from sret.evaluate import evaluate
    from sret.train import final_metrics, resolve_config, train

    data = _image_folder(tmp_path / "data")
    (data / "val" / "dog" / "0broken.png").write_bytes(b"\x89PNG not really")
    splits = build_datasets("imagefolder", data, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"0broken\.png"):
        labels = [splits.val[i][1] for i in range(len(splits.val))]
    assert labels.count(IGNORE_LABEL) == 1 and len(labels) == 7

    common = dict(dataset="imagefolder", data_dir=str(data), epochs=1, threads=1, batch_size=2)
    cfg = resolve_config("digits", **common, output=str(tmp_path / "runs"), name="r", skip_bad_images=True)
    with pytest.warns(UserWarning):
        run = train(cfg)
        result = evaluate(run / "last.safetensors", skip_bad_images=True)
    assert int(result.confusion.sum()) == 6 and result.skipped == 1
    assert result.acc1 == pytest.approx(final_metrics(run)["val_acc1"])


def test_training_skips_bad_images_end_to_end(tmp_path: Path) -> None:
    from sret.train import final_metrics, resolve_config, train

    data = _image_folder(tmp_path / "data")
    common = dict(
        dataset="imagefolder", data_dir=str(data), epochs=1, threads=1, output=str(tmp_path / "runs")
    )
    cfg = resolve_config("digits", **common, batch_size=2, name="r", skip_bad_images=True, warmup_epochs=0)
    with pytest.warns(UserWarning, match=r"broken\.png"):
        run = train(cfg)
    assert 0.0 <= final_metrics(run)["val_acc1"] <= 1.0
    strict = resolve_config("digits", **common, batch_size=7, name="strict")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        train(strict)


def test_cached_image_folder_reads_each_file_once_and_gives_the_same_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cache_images` keeps decoded images in memory: later epochs open no file, and every item is the
    one the uncached folder gives (a cached image is never changed by the transforms)."""
    import sret.data
    from sret.data import Augment

    root = _image_folder(tmp_path, corrupt=False)
    plain = build_datasets("imagefolder", root)
    opened: list[str] = []
    real_open = sret.data.Image.open
    monkeypatch.setattr(sret.data.Image, "open", lambda path, *a: opened.append(path) or real_open(path, *a))
    for augment in (Augment(enabled=False), Augment(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)):
        opened.clear()
        cached = build_datasets("imagefolder", root, augment=augment, cache_images=True)
        for _ in range(3):  # three epochs
            items = [cached.train[i] for i in range(len(cached.train))]
            items += [cached.val[i] for i in range(len(cached.val))]
        assert sorted(opened) == sorted(set(opened)) and len(opened) == 12  # each of 12 files once
    torch.manual_seed(0)
    cached = build_datasets("imagefolder", root, cache_images=True)
    first = [cached.val[i] for i in range(len(cached.val))]
    again = [cached.val[i] for i in range(len(cached.val))] + [plain.val[i] for i in range(len(plain.val))]
    for (x, y), (u, v) in zip(first * 2, again, strict=True):
        assert torch.equal(x, u) and y == v


def test_a_run_stopped_by_a_bad_image_resumes_with_skip_bad_images(tmp_path: Path) -> None:
    """`--resume` keeps the run's config, except where and how it runs: it may add --skip-bad-images,
    and refuses what would make another run (--epochs, --set ...) in one line."""
    from typer.testing import CliRunner

    from sret.cli import app
    from sret.train import final_metrics

    data = _image_folder(tmp_path / "data")
    args = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(data),
        "--epochs",
        "1",
        "--batch-size",
        "2",
    ]
    args += ["--output", str(tmp_path / "runs"), "--name", "r", "--set", "threads=1"]
    stopped = CliRunner().invoke(app, args)
    assert stopped.exit_code == 1 and "broken.png" in stopped.stderr
    run = tmp_path / "runs" / "r"
    refused = CliRunner().invoke(app, ["train", "--resume", str(run), "--epochs", "2", "--set", "lr=1"])
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1
    assert "not epochs, lr" in refused.stderr
    with pytest.warns(UserWarning, match=r"broken\.png"):
        resumed = CliRunner().invoke(app, ["train", "--resume", str(run), "--skip-bad-images"])
    assert resumed.exit_code == 0, resumed.output
    assert 0.0 <= final_metrics(run)["val_acc1"] <= 1.0


@pytest.mark.parametrize(
    ("name", "layout", "message"),
    [
        ("cifar10", "empty", "never downloads"),
        ("cifar100", "empty", "never downloads"),
        ("fashion_mnist", "empty", "never downloads"),
        ("imagefolder", "empty", "train"),
        ("svhn", "empty", "unknown dataset"),
    ],
)
def test_missing_data_is_a_clear_error(tmp_path: Path, name: str, layout: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_datasets(name, tmp_path)


def test_mixup_is_timm_and_optional() -> None:
    assert build_mixup(10, 0.0, 0.0, 1.0, 0.5, 0.1) is None
    mix = build_mixup(10, 0.8, 1.0, 1.0, 0.5, 0.1)
    _, y = mix(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(1), torch.ones(4))


@pytest.mark.skipif(not (SHARED / "fashion_mnist").is_dir(), reason="../shared/data absent")
def test_fashion_mnist_from_idx_files() -> None:
    splits = build_datasets("fashion_mnist", SHARED / "fashion_mnist")
    assert (len(splits.train), len(splits.val)) == (60000, 10000)
    assert splits.classes[0] == "T-shirt/top" and len(splits.classes) == 10
    small = subset(splits.train, 50, 0)
    labels = [small[i][1] for i in range(len(small))]
    assert small[0][0].shape == (3, 32, 32) and len(set(labels)) >= 5


@pytest.mark.skipif(not (SHARED / "cifar10_jpeg").is_dir(), reason="../shared/data absent")
def test_cifar10_jpeg_image_folder() -> None:
    splits = build_datasets("imagefolder", SHARED / "cifar10_jpeg")
    assert (len(splits.train), len(splits.val)) == (50000, 10000)
    assert splits.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    image, label = splits.val[9999]
    assert image.shape == (3, 32, 32) and label == 9


@pytest.mark.skipif(not (SHARED / "cifar10_jpeg").is_dir(), reason="../shared/data absent")
def test_cifar_recipe_with_full_augmentation_trains_on_real_jpegs(tmp_path: Path) -> None:
    from sret.train import final_metrics, resolve_config, train

    cfg = resolve_config(
        "cifar10",
        dataset="imagefolder",
        data_dir=str(SHARED / "cifar10_jpeg"),
        train_subset=64,
        val_subset=32,
        batch_size=16,
        epochs=1,
        workers=0,
        threads=1,
        output=str(tmp_path),
        name="c",
    )
    assert cfg.aa and cfg.mixup > 0 and cfg.reprob > 0
    metrics = final_metrics(train(cfg))
    assert metrics["train_loss"] > 0 and 0.0 <= metrics["val_acc1"] <= 1.0
