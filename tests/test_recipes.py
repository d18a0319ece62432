"""Every shipped recipe trains with its full augmentation; rare augmentation ops are hit here, not in a
user's run; repeated augmentation covers each image as DeiT's sampler does, under DDP and resume."""

from __future__ import annotations

import random
import re
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageOps

from sret.checkpoint import load_state
from sret.data import Augment, Preprocess, augment_ops
from sret.train import RECIPES, Dist, EpochSampler, final_metrics, load_recipe, resolve_config, train

SHIPPED = sorted(p.stem for p in RECIPES.glob("*.yaml"))
CLASSES = ("ant", "bee", "cat", "dog")


def write_image_folder(root: Path, per_class: int = 4, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg")
    return root


def write_fashion_mnist(root: Path, train: int = 16, test: int = 8) -> Path:
    """Idx files in torchvision's layout (the format of the originals, random pixels)."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


def strict_posterize(img: Image.Image, bits: int) -> Image.Image:
    """Pillow 13's posterize, whatever Pillow is installed: 0 bits is an error."""
    if not 1 <= bits <= 8:
        raise ValueError("bits must be between or equal to 1 and 8")
    return img.point(lambda i: i & ~(2 ** (8 - bits) - 1))


@pytest.fixture
def pillow13(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever Pillow is installed, posterize refuses 0 bits as Pillow 13 does."""
    monkeypatch.setattr(ImageOps, "posterize", strict_posterize)


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_trains_a_few_steps_with_its_augmentation(
    recipe: str, tmp_path: Path, pillow13: None
) -> None:
    values = load_recipe(recipe)
    data = {"dataset": "imagefolder", "data_dir": str(write_image_folder(tmp_path / "images"))}
    if values["dataset"] == "fashion_mnist":
        data = {"data_dir": str(write_fashion_mnist(tmp_path / "fmnist"))}
    elif values["dataset"] == "digits":
        data = {"train_subset": 16, "val_subset": 8}
    cfg = resolve_config(
        recipe,
        epochs=1,
        batch_size=8,
        warmup_epochs=0,
        workers=min(values.get("workers", 0), 1),
        threads=1,
        output=str(tmp_path / "runs"),
        name=recipe,
        **data,
    )
    for key in ("aa", "mixup", "cutmix", "reprob", "model_ema", "amp", "repeated_aug", "img_size", "model"):
        assert getattr(cfg, key) == values.get(key, getattr(cfg, key)), key  # the recipe's own settings
    run = train(cfg)
    metrics = final_metrics(run)
    assert np.isfinite(metrics["train_loss"]) and 0.0 <= metrics["val_acc1"] <= 1.0
    assert (run / "best.safetensors").is_file()


def augmentations() -> dict[str, tuple[Augment, Preprocess]]:
    """Each distinct training transform of the shipped recipes, with the recipes that use it."""
    out: dict[str, tuple[Augment, Preprocess]] = {}
    for recipe in SHIPPED:
        cfg = resolve_config(recipe)
        if cfg.dataset == "digits" or not cfg.augment:
            continue
        aug = Augment(True, tuple(cfg.scale), cfg.hflip, cfg.color_jitter, cfg.aa, cfg.reprob, cfg.remode)
        pre = Preprocess(img_size=cfg.img_size, crop_pct=cfg.crop_pct)
        key = next((k for k, v in out.items() if v == (aug, pre)), None)
        if key is None:
            out[recipe] = (aug, pre)
        else:
            out[f"{key}+{recipe}"] = out.pop(key)
    return out


@pytest.mark.parametrize("name", list(augmentations()))
def test_recipe_augmentation_survives_thousands_of_samples(name: str, pillow13: None) -> None:
    aug, pre = augmentations()[name]
    transform = aug.train_transform(pre)
    zero_bits = Counter()
    for op in augment_ops(transform):
        if "Posterize" in op.name:
            inner = op.aug_fn

            def counted(img, bits, _inner=inner, **kw):
                zero_bits[bits <= 0] += 1
                return _inner(img, bits, **kw)

            op.aug_fn = counted
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for _ in range(3000):
        out = transform(img)
        assert out.shape == (3, pre.img_size, pre.img_size) and torch.isfinite(out).all()
    if aug.auto_augment and "inc1" in aug.auto_augment:
        assert zero_bits[True] > 0  # the full-magnitude posterize that Pillow 13 refuses was drawn


def test_posterize_means_the_same_on_every_pillow(pillow13: None) -> None:
    from sret.data import posterize

    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).convert("RGB")
    for bits in range(9):
        mask = ~(2 ** (8 - bits) - 1) & 0xFF
        expect = np.asarray(img) & mask  # Pillow <= 12's lookup table, 0 bits included
        assert np.array_equal(np.asarray(posterize(img, bits)), expect), bits
    assert not np.asarray(posterize(img, 0)).any()  # 0 bits: a black image


def test_a_failing_transform_names_itself_and_the_image_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from sret import data
    from sret.cli import app

    calls = Counter()

    def breaks_on_the_40th_call(img: Image.Image, *args, **kwargs) -> Image.Image:
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("boom")
        return img

    # every RandAugment op runs the breaking function (in the loader worker, which forks this process)
    monkeypatch.setattr(
        data,
        "POSTERIZE_OPS",
        tuple(
            op.name
            for op in augment_ops(Augment(auto_augment="rand-m9-mstd0.5-inc1").train_transform(Preprocess()))
        ),
    )
    monkeypatch.setattr(data, "posterize", breaks_on_the_40th_call)
    root = write_image_folder(tmp_path / "images", per_class=16)
    args = [
        "train",
        "-r",
        "cifar10",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--output",
        str(tmp_path),
        "--name",
        "r",
        "--batch-size",
        "8",
        "--save-every-steps",
        "1",
    ]
    result = CliRunner().invoke(app, [*args, "--set", "threads=1", "--set", "workers=1"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(
        rf"error: training image {re.escape(str(root))}/train/\w+/\d+\.jpg: "
        r"augmentation op \w+ failed: RuntimeError: boom$",
        errors[0],
    ), errors[0]
    state = torch.load(tmp_path / "r" / "last_state.pt", weights_only=True)
    assert state["global_step"] >= 1  # the step checkpoints written before the failure are intact
    weights = load_state(tmp_path / "r" / "last.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())


def gather_epoch(rank: int, world: int, init: str, length: int, full: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    sampler = EpochSampler(list(range(length)), Dist(rank, world, torch.device("cpu")), 7, 4, 3, full)
    seen = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        shards = [None] * world
        dist.all_gather_object(shards, list(sampler))
        seen[epoch] = shards
    if rank == 0:
        torch.save(seen, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("full", [True, False])
def test_repeated_augmentation_over_two_gloo_processes(tmp_path: Path, full: bool) -> None:
    length, out = 600, str(tmp_path / "seen.pt")
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(gather_epoch, args=(2, init, length, full, out), nprocs=2, start_method="fork")
    seen = torch.load(out)
    for shards in seen.values():
        order = [i for pair in zip(*shards, strict=True) for i in pair]  # the global order
        triples = [order[k : k + 3] for k in range(0, len(order) - 2, 3)]
        assert all(len(set(t)) == 1 for t in triples)  # each image three times in a row ...
        assert all(t[0] in shards[0] and t[0] in shards[1] for t in triples)  # ... on both ranks
        counts = Counter(order)
        if full:  # every training index exactly 3 times per epoch across the processes
            assert sorted(counts) == list(range(length)) and set(counts.values()) == {3}
        else:  # DeiT: one pass's worth of samples (rounded down to 256), a third of the images
            assert len(shards[0]) == len(shards[1]) == 512 // 2
            assert len(counts) == 171 and sorted(counts.values())[1:] == [3] * 170
    assert seen[0] != seen[1]  # a new order each epoch


def test_repeated_augmentation_resumes_on_the_unseen_samples() -> None:
    sampler = EpochSampler(list(range(300)), Dist(1, 2, torch.device("cpu")), 3, 8, 3, True)
    sampler.set_epoch(4)
    order = list(sampler)
    sampler.set_epoch(4, start_batch=5)
    assert list(sampler) == order[40:]
    other_seed = EpochSampler(list(range(300)), Dist(1, 2, torch.device("cpu")), 4, 8, 3, True)
    other_seed.set_epoch(4)
    assert list(other_seed) != order


def test_repeated_augmentation_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sret.train import Run

    base = dict(
        train_subset=96,
        val_subset=32,
        batch_size=16,
        epochs=2,
        warmup_epochs=0,
        threads=1,
        repeated_aug=3,
        repeated_aug_full_epoch=True,
        save_every_steps=4,
        output=str(tmp_path),
    )
    straight = train(resolve_config("digits", name="straight", **base))
    step = Run.train_step

    def interrupted(self, batch):
        if self.global_step == 9:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(Run, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(resolve_config("digits", name="resumed", **base))
    monkeypatch.setattr(Run, "train_step", step)
    resumed = train(resume=tmp_path / "resumed")
    assert len((straight / "metrics.jsonl").read_text().splitlines()) == 2
    assert final_metrics(resumed) == final_metrics(straight)
