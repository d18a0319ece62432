"""Every training option is checked against its meaning, once, in one place, with one line."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from sret.io import UserError
from sret.train import RULES, TrainConfig, resolve_config

# (option, a value it must refuse, what the message says). Every TrainConfig field has a row.
BAD = [
    ("model", "sret_huge", "model must be an SReT"),
    ("dataset", "mnist", "dataset must be one of digits"),
    ("data_dir", [1], "option data_dir: expected str"),
    ("img_size", 4, "img_size must be a finite number >= 8"),
    ("crop_pct", 1.5, "crop_pct must be in [0.05, 1.0]"),
    ("val_fraction", 0, "val_fraction must be in [0.01, 0.99]"),
    ("train_subset", -5, "train_subset must be a finite number >= 1"),
    ("val_subset", 0, "val_subset must be a finite number >= 1"),
    ("skip_bad_images", "yes", "option skip_bad_images: expected bool"),
    ("cache_images", 1, "option cache_images: expected bool"),
    ("checkpoint", ["a"], "option checkpoint: expected str"),
    ("model_args", {"loopz": 1}, "unknown model option(s) loopz"),
    ("drop_path", 1.5, "drop_path must be in [0.0, 1.0)"),
    ("drop", -0.1, "drop must be in [0.0, 1.0)"),
    ("shuffle", "sometimes", "shuffle must be one of None, random, fixed, none"),
    ("grad_checkpointing", 1, "option grad_checkpointing: expected bool"),
    ("epochs", "inf", "option epochs: expected int"),
    ("batch_size", 0, "batch_size must be a finite number >= 1"),
    ("lr", True, "option lr: expected float"),
    ("lr_base_batch", 0, "lr_base_batch must be a finite number >= 1"),
    ("min_lr", -1e-5, "min_lr must be a finite number >= 0.0"),
    ("warmup_epochs", -1, "warmup_epochs must be a finite number >= 0"),
    ("warmup_lr", float("nan"), "warmup_lr must be a finite number >= 0.0"),
    ("sched", "linear", "sched must be one of cosine"),
    ("opt", "adamq", "opt must be one of timm's optimizers"),
    ("weight_decay", -0.05, "weight_decay must be a finite number >= 0.0"),
    ("clip_grad", -1, "clip_grad must be a finite number > 0.0"),
    ("smoothing", -0.1, "smoothing must be in [0.0, 1.0)"),
    ("mixup", -0.2, "mixup must be a finite number >= 0.0"),
    ("cutmix", float("inf"), "cutmix must be a finite number >= 0.0"),
    ("mixup_prob", 2, "mixup_prob must be in [0.0, 1.0]"),
    ("mixup_switch_prob", -1, "mixup_switch_prob must be in [0.0, 1.0]"),
    ("augment", "no", "option augment: expected bool"),
    ("scale", [0.9, 0.2], "scale must be [low, high] with 0 < low <= high <= 1"),
    ("hflip", 1.5, "hflip must be in [0.0, 1.0]"),
    ("color_jitter", -0.3, "color_jitter must be a finite number >= 0.0"),
    ("aa", "rand-zz9", "aa 'rand-zz9' is not a timm augmentation policy"),
    ("reprob", 1.25, "reprob must be in [0.0, 1.0]"),
    ("remode", "noise", "remode must be one of pixel, rand, const"),
    ("recount", 0, "recount must be a finite number >= 1"),
    ("model_ema", "on", "option model_ema: expected bool"),
    ("model_ema_decay", 1.0, "model_ema_decay must be in [0.0, 1.0)"),
    ("repeated_aug", 0, "repeated_aug must be a finite number >= 1"),
    ("repeated_aug_full_epoch", "yes", "option repeated_aug_full_epoch: expected bool"),
    ("anytime", "always", "anytime must be one of none, uniform, deep"),
    ("anytime_min_loops", 0, "anytime_min_loops must be a finite number >= 1"),
    ("anytime_distill", 2, "anytime_distill must be in [0.0, 1.0]"),
    ("teacher", {"a": 1}, "option teacher: expected str"),
    ("teacher_checkpoint", "/no/such/file.pth", "teacher_checkpoint must name an existing file"),
    ("teacher_logits", "/no/such/logits.safetensors", "teacher_logits must name an existing file"),
    ("distill_alpha", 1.5, "distill_alpha must be in [0.0, 1.0]"),
    ("distill_temperature", 0, "distill_temperature must be a finite number > 0.0"),
    ("amp", "fp8", "amp must be one of none, bf16, fp16"),
    ("compile", "turbo", "compile must be none or one of"),
    ("device", "tpu", "device must be auto, cpu, cuda or cuda:N"),
    ("seed", -1, "seed must be in [0, 4294967295]"),
    ("workers", -1, "workers must be a finite number >= 0"),
    ("threads", -2, "threads must be a finite number >= 1"),
    ("output", ["runs"], "option output: expected str"),
    ("name", "a/b", "name must be a folder name"),
    ("save_every_steps", -10, "save_every_steps must be a finite number >= 0"),
]


def test_the_table_covers_every_option_and_every_rule() -> None:
    options = {f.name for f in fields(TrainConfig)}
    assert {row[0] for row in BAD} == options
    assert set(RULES) == options


@pytest.mark.parametrize(("option", "value", "message"), BAD, ids=[row[0] for row in BAD])
def test_a_bad_value_is_one_line_naming_the_option(option: str, value, message: str) -> None:
    with pytest.raises(UserError) as error:
        resolve_config("digits", sets=None, **{option: value})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_shipped_recipe_passes_its_own_rules_and_keeps_its_values() -> None:
    from sret.train import RECIPES, load_recipe

    for recipe in sorted(p.stem for p in RECIPES.glob("*.yaml")):
        cfg = resolve_config(recipe)  # a recipe that broke a rule raises here
        for option, value in load_recipe(recipe).items():
            got = getattr(cfg, option)
            if isinstance(got, float):
                value = float(value)  # YAML reads 5e-4 as text
            elif isinstance(got, list):
                value = [float(v) for v in value]
            assert got == value, (recipe, option)


def test_several_problems_are_named_together(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^lr must be .*; hflip must be in") as error:
        resolve_config("digits", lr=-1.0, hflip=2.0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("sets", [["lr=true"], ["epochs=inf"], ["threads=-2"], ["clip_grad=-1"]])
def test_the_examples_from_the_command_line_are_refused(sets: list[str]) -> None:
    with pytest.raises(UserError):
        resolve_config("digits", sets)
