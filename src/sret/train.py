"""Train SReT with the DeiT recipe, from one CPU process to many GPUs under torchrun.

Every ingredient comes from timm or torch (optimizer, schedule, EMA, mixup, losses, DDP); this module
only wires them together and adds what a long run needs: a run folder, atomic checkpoints, exact
resume, a NaN guard and a progress display.

Exact resume rests on three facts: the data order of an epoch is a function of (seed, epoch) only
(DistributedSampler plus a per-epoch generator for worker seeds), all random number generators are
saved with every checkpoint, and the learning-rate schedule is a pure function of the update count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, dispatch_clip_grad
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from sret import kernels
from sret.anytime import WEIGHTINGS, sample_loops
from sret.checkpoint import create_model, load_state, model_from_weights, read_metadata, weights_writer
from sret.data import (
    DATASETS,
    Augment,
    Preprocess,
    WithIndex,
    build_datasets,
    build_mixup,
    resident_bytes,
    subset,
)
from sret.evaluate import collect_logits, scored
from sret.info import memory_estimate, model_config
from sret.io import (
    UserError,
    atomic_write,
    atomic_writes,
    check_destination,
    folder_lock,
    read_mapping,
    read_yaml,
    remove_stale_temporaries,
    write_bytes,
)
from sret.model import MODEL_CONFIGS
from sret.plots import MetricsLog
from sret.runtime import has_fused_adam, require_memory
from sret.variants import resolve_overrides

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "digits"  # what `sret train` runs with no options
STATE_FILE = "last_state.pt"
# Where and how a run executes, not what it computes: the settings `--resume` may change (a run moved to
# another machine or data folder, or stopped by a corrupt image).
RESUME_SETTINGS = ("data_dir", "device", "skip_bad_images", "workers", "cache_images")
TIME_KEYS = ("time_s", "img_per_s")  # the only metrics that differ between identical runs
# Within an epoch, output that is not a terminal gets a progress line at least this often (seconds).
PROGRESS_SECONDS = 15.0
# What a run has made: never overwritten by a run that did not mean to start over.
RUN_OUTPUTS = (STATE_FILE, "last.safetensors", "best.safetensors", "last_ema.safetensors", "metrics.jsonl")
# Deterministic faults, for the tests of resume and interrupts (set in the environment, counted per
# process): exit hard (os._exit: no clean-up, as a SIGKILL) right after the Nth checkpoint is complete,
# or in the Nth checkpoint, its files written but not yet switched; or Ctrl-C after the Nth step.
FAULT_EXIT_AFTER_CHECKPOINT = "SRET_FAULT_EXIT_AFTER_CHECKPOINT"
FAULT_EXIT_IN_CHECKPOINT = "SRET_FAULT_EXIT_IN_CHECKPOINT"
FAULT_INTERRUPT_AFTER_STEP = "SRET_FAULT_INTERRUPT_AFTER_STEP"
FAULT_EXIT_CODE = 99


class TrainingError(UserError):
    """The run cannot go on (non-finite loss); the last checkpoint is intact."""


def fault_due(name: str, count: int) -> bool:
    """Whether the fault `name` (one of the FAULT_* variables) is set to strike at `count`."""
    return os.environ.get(name, "").strip() == str(count)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a run; saved resolved as `config.yaml` and reloaded by `--resume`."""

    # data and model
    model: str = "sret_nano"
    dataset: str = "digits"
    data_dir: str | None = None
    img_size: int = 32
    crop_pct: float = 1.0
    val_fraction: float = 0.2
    train_subset: int | None = None
    val_subset: int | None = None
    skip_bad_images: bool = False
    cache_images: bool = False  # an image folder's decoded images kept in memory (small images only)
    checkpoint: str | None = None
    model_args: dict[str, Any] | None = None  # config overrides of the model (see sret.variants)
    drop_path: float = 0.0
    drop: float = 0.0
    shuffle: str | None = None
    grad_checkpointing: bool = False
    # optimisation
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    lr_base_batch: int | None = None
    min_lr: float = 1e-5
    warmup_epochs: int = 0
    warmup_lr: float = 1e-6
    sched: str = "cosine"
    opt: str = "adamw"
    weight_decay: float = 0.05
    clip_grad: float | None = None
    # regularisation
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    augment: bool = True
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.3
    aa: str | None = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    # repeated augmentation (DeiT): each image drawn this many times per pass, its copies spread over
    # the processes; 1 = off. The epoch keeps its usual length (a third of the images, three times each)
    # unless repeated_aug_full_epoch, which makes it pass every image `repeated_aug` times.
    repeated_aug: int = 1
    repeated_aug_full_epoch: bool = False
    # anytime depth: each step runs every stage at a loop count drawn from anytime_min_loops to the
    # trained count ('uniform', or 'deep': in proportion to the count); anytime_distill > 0 also runs
    # full depth in the same step and teaches the drawn depth with its output (see train_step)
    anytime: str = "none"
    anytime_min_loops: int = 1
    anytime_distill: float = 0.0
    # distillation
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_logits: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    # run
    amp: str = "none"
    compile: str = "none"  # a torch.compile backend for the training forward (e.g. inductor), or none
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    threads: int | None = None
    output: str = "runs"
    name: str | None = None
    save_every_steps: int = 0

    @property
    def effective_lr(self) -> float:
        """`lr`, scaled linearly with the batch when `lr_base_batch` is set (DeiT: 5e-4 per 512)."""
        return self.lr * self.batch_size / self.lr_base_batch if self.lr_base_batch else self.lr

    def validate(self) -> None:
        """Every option against its meaning (see RULES), then the combinations; one UserError whose
        single line names each problem."""
        problems = [
            f"{name} {problem}, got {getattr(self, name)!r}"
            for name, rule in RULES.items()
            if (problem := rule(getattr(self, name))) is not None
        ]
        if self.teacher and self.teacher_logits:
            problems.append("give either a teacher or precomputed teacher logits, not both")
        if self.teacher_logits and (self.mixup > 0 or self.cutmix > 0):
            problems.append("precomputed teacher logits are for unmixed images: set mixup=0 and cutmix=0")
        if self.teacher_checkpoint and not self.teacher:
            problems.append("teacher_checkpoint needs a teacher (a model name)")
        if problems:
            raise UserError("; ".join(problems))
        model_overrides(self)
        self.augmentation()

    def augmentation(self) -> Augment:
        """The training augmentation; building it checks the RandAugment/AutoAugment string."""
        augment = Augment(
            enabled=self.augment and not self.teacher_logits,
            scale=tuple(self.scale),
            hflip=self.hflip,
            color_jitter=self.color_jitter,
            auto_augment=self.aa,
            re_prob=self.reprob,
            re_mode=self.remode,
            re_count=self.recount,
        )
        try:
            augment.train_transform(Preprocess(img_size=self.img_size, crop_pct=self.crop_pct))
        except (ValueError, AssertionError, KeyError, IndexError) as e:
            raise UserError(f"aa {self.aa!r} is not a timm augmentation policy ({e})") from None
        return augment

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config option(s): {', '.join(unknown)}")
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(k, types[k], v) for k, v in values.items()})


Rule = Callable[[Any], "str | None"]  # the problem with a value, or None


def at_least(low: float, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        return None if math.isfinite(value) and value >= low else f"must be a finite number >= {low}"

    return rule


def above(low: float, optional: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        if value is None and optional:
            return None
        return None if math.isfinite(value) and value > low else f"must be a finite number > {low}"

    return rule


def within(low: float, high: float, high_open: bool = False) -> Rule:
    def rule(value: Any) -> str | None:
        ok = low <= value < high if high_open else low <= value <= high
        return None if ok else f"must be in [{low}, {high}{')' if high_open else ']'}"

    return rule


def one_of(*choices: Any) -> Rule:
    def rule(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"

    return rule


def anything(_: Any) -> None:
    return None


def existing_file(value: str | None) -> str | None:
    return None if value is None or Path(value).is_file() else "must name an existing file"


def known_model(value: str) -> str | None:
    return (
        None if value.split(".", 1)[0] in MODEL_CONFIGS else f"must be an SReT ({', '.join(MODEL_CONFIGS)})"
    )


def crop_scale(value: list[float]) -> str | None:
    ok = len(value) == 2 and 0 < value[0] <= value[1] <= 1
    return None if ok else "must be [low, high] with 0 < low <= high <= 1"


def device_name(value: str) -> str | None:
    ok = value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value) is not None
    return None if ok else "must be auto, cpu, cuda or cuda:N"


def compile_backend(value: str) -> str | None:
    backends = torch.compiler.list_backends(exclude_tags=())
    return None if value == "none" or value in backends else f"must be none or one of {', '.join(backends)}"


def optimizer_name(value: str) -> str | None:
    return None if value.lower() in list_optimizers() else "must be one of timm's optimizers (timm.optim)"


def run_name(value: str | None) -> str | None:
    ok = value is None or (value.strip() and "/" not in value and value not in (".", ".."))
    return None if ok else "must be a folder name (no '/')"


# The meaning of every option: its value must pass this (tested option by option).
RULES: dict[str, Rule] = {
    "model": known_model,
    "dataset": one_of(*DATASETS),
    "data_dir": anything,  # checked when the data set is read, with the data set's own message
    "img_size": at_least(8),
    "crop_pct": within(0.05, 1.0),
    "val_fraction": within(0.01, 0.99),
    "train_subset": at_least(1, optional=True),
    "val_subset": at_least(1, optional=True),
    "skip_bad_images": anything,
    "cache_images": anything,
    "checkpoint": anything,  # read only when a run starts (a resumed run has its weights): checked then
    "model_args": anything,  # resolved against the model (sret.variants)
    "drop_path": within(0.0, 1.0, high_open=True),
    "drop": within(0.0, 1.0, high_open=True),
    "shuffle": one_of(None, "random", "fixed", "none"),
    "grad_checkpointing": anything,
    "epochs": at_least(1),
    "batch_size": at_least(1),
    "lr": above(0.0),
    "lr_base_batch": at_least(1, optional=True),
    "min_lr": at_least(0.0),
    "warmup_epochs": at_least(0),
    "warmup_lr": at_least(0.0),
    "sched": one_of("cosine", "tanh", "step", "multistep", "plateau", "poly"),
    "opt": optimizer_name,
    "weight_decay": at_least(0.0),
    "clip_grad": above(0.0, optional=True),
    "smoothing": within(0.0, 1.0, high_open=True),
    "mixup": at_least(0.0),
    "cutmix": at_least(0.0),
    "mixup_prob": within(0.0, 1.0),
    "mixup_switch_prob": within(0.0, 1.0),
    "augment": anything,
    "scale": crop_scale,
    "hflip": within(0.0, 1.0),
    "color_jitter": at_least(0.0),
    "aa": anything,  # checked by building the transform (TrainConfig.augmentation)
    "reprob": within(0.0, 1.0),
    "remode": one_of("pixel", "rand", "const"),
    "recount": at_least(1),
    "model_ema": anything,
    "model_ema_decay": within(0.0, 1.0, high_open=True),
    "repeated_aug": at_least(1),
    "repeated_aug_full_epoch": anything,
    "anytime": one_of("none", *WEIGHTINGS),
    "anytime_min_loops": at_least(1),
    "anytime_distill": within(0.0, 1.0),
    "teacher": anything,  # a checkpoint, an SReT or any timm model: checked when it is built
    "teacher_checkpoint": existing_file,
    "teacher_logits": existing_file,
    "distill_alpha": within(0.0, 1.0),
    "distill_temperature": above(0.0),
    "amp": one_of("none", "bf16", "fp16"),
    "compile": compile_backend,
    "device": device_name,
    "seed": within(0, 2**32 - 1),
    "workers": at_least(0),
    "threads": at_least(1, optional=True),
    "output": anything,
    "name": run_name,
    "save_every_steps": at_least(0),
}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Check a YAML/CLI value against the field type (YAML reads `5e-4` as text, so convert numbers).

    A boolean is never a number (`lr=true` is refused, not 1.0), and an integer must be a finite whole
    number."""
    try:
        if value is None:
            if "None" not in kind:
                raise ValueError
            return None
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind.startswith(("float", "int", "list")) and isinstance(value, bool):
            raise ValueError
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("int"):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind.startswith("list"):
            if isinstance(value, str | dict) or any(isinstance(v, bool) for v in value):
                raise ValueError
            return [float(v) for v in value]
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"option {name}: expected {kind}, got {value!r}") from None


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The run's `model_args`, resolved against its model (explicit stages; see sret.variants)."""
    try:
        return resolve_overrides(cfg.model, cfg.model_args)
    except (ValueError, TypeError) as e:
        raise UserError(f"model_args {cfg.model_args}: {e}") from None


def native_size(model: str) -> int:
    """The resolution a registered model is built for (its config's img_size)."""
    size = MODEL_CONFIGS[model].img_size
    return size if isinstance(size, int) else size[0]


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name (see `src/sret/recipes`) or any YAML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise UserError(f"recipe not found: {name_or_path} (shipped: {shipped})")
    return read_mapping(path, "recipe")


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs from `--set`; values are read as YAML (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = read_yaml(value, f"--set {item}")
    return out


def resolve_config(
    recipe: str | None = DEFAULT_RECIPE, sets: list[str] | None = None, **overrides: Any
) -> TrainConfig:
    """Recipe, then `--set` pairs, then explicit options (None means not given).

    The default recipe's img_size is sret_nano's: a model named beside it (`sret train --model
    sret_t`) trains at its own resolution instead, unless img_size is given too.
    """
    values = load_recipe(recipe) if recipe else {}
    given = parse_sets(sets or []) | {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    arch = str(values.get("model", "")).split(".", 1)[0]
    if recipe == DEFAULT_RECIPE and "model" in given and "img_size" not in given and arch in MODEL_CONFIGS:
        values["img_size"] = native_size(arch)
    cfg = with_checkpoint_architecture(TrainConfig.from_dict(values))
    cfg.validate()
    return cfg


# What a weights file's stored model_args say about the run that made it, not about the architecture.
RUN_MODEL_ARGS = ("num_classes", "img_size", "drop_path_rate", "drop_rate", "shuffle")


def with_checkpoint_architecture(cfg: TrainConfig) -> TrainConfig:
    """A run starting from one of our weights files builds the architecture that file stores (its model
    name and model_args; the run's own model_args change it further), so fine-tuning a converted or
    relaxed model (`sret recursify`) needs no retyping of its layout."""
    if not cfg.checkpoint:
        return cfg
    try:
        meta = read_metadata(cfg.checkpoint)
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None
    name = meta.get("model_name")
    if name is None:
        return cfg
    stored = {k: v for k, v in meta.get("model_args", {}).items() if k not in RUN_MODEL_ARGS}
    try:
        args = resolve_overrides(name, stored, cfg.model_args)
    except (ValueError, TypeError) as e:
        raise UserError(f"checkpoint {cfg.checkpoint}: model_args {cfg.model_args}: {e}") from None
    return dataclasses.replace(cfg, model=name, model_args=args)


# --------------------------------------------------------------------------------------------------
# Processes, devices and random state
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """One process, or DDP when launched by torchrun (nccl on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device cuda requested but no GPU is available")
        if world > 1:
            dev = torch.device("cuda", local)
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"device {dev} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """All generator states as tensors and primitives (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum floats over ranks (float64, so counts and sums stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if d.world_size > 1:
        t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------
class EpochSampler(Sampler[int]):
    """This rank's share of a (seed, epoch)-determined permutation, optionally from a later batch.

    DistributedSampler gives the global order (rank r takes every world_size-th index, so the union
    of the ranks' batches equals the one-process batch); starting from a batch lets a run resume
    mid-epoch on exactly the samples it had not seen. With `repeats` > 1 the order is timm's
    RepeatAugSampler instead (DeiT's repeated augmentation): each index `repeats` times in a row of the
    global order, so its copies land on different ranks; by default the epoch keeps the length of one
    pass (rounded down to 256 images, as DeiT), with `full_epoch` every index appears `repeats` times.
    """

    def __init__(
        self,
        dataset: Dataset,
        d: Dist,
        seed: int,
        batch_size: int,
        repeats: int = 1,
        full_epoch: bool = False,
    ) -> None:
        self.inner: DistributedSampler | RepeatAugSampler
        if repeats > 1:
            self.inner = RepeatAugSampler(
                dataset,
                d.world_size,
                d.rank,
                shuffle=True,
                num_repeats=repeats,
                selected_round=0 if full_epoch else 256,
                selected_ratio=d.world_size / repeats if full_epoch else 0,
            )
        else:
            self.inner = DistributedSampler(dataset, d.world_size, d.rank, shuffle=True, seed=seed)
        self.seed = seed
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        # RepeatAugSampler seeds its permutation with the epoch alone; DistributedSampler adds its seed.
        repeated = isinstance(self.inner, RepeatAugSampler)
        self.inner.set_epoch(self.seed + epoch if repeated else epoch)
        self.skip = start_batch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return len(self.inner) - self.skip


# --------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------
def soft_distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Soft-label cross-entropy of the student against the teacher's temperature-softened
    probabilities, scaled by T² so its gradients keep their size as T changes (Hinton et al.)."""
    soft_targets = F.softmax(teacher.float() / temperature, dim=-1)
    return F.cross_entropy(student.float() / temperature, soft_targets) * temperature**2


def build_teacher(cfg: TrainConfig, num_classes: int, device: torch.device) -> nn.Module:
    """A frozen teacher: one of our checkpoints, an SReT name plus weights, or any timm model."""
    name, weights = cfg.teacher, cfg.teacher_checkpoint
    if Path(name).suffix in (".safetensors", ".pth", ".pt"):
        if not Path(name).is_file():
            raise UserError(f"teacher checkpoint not found: {name}")
        if "model_name" not in read_metadata(name):
            raise UserError(
                f"{name} does not name its model: use --teacher NAME --set teacher_checkpoint=FILE"
            )
        teacher, _ = model_from_weights(name)
    elif name.split(".", 1)[0] in MODEL_CONFIGS:
        if weights is None:
            raise UserError(f"teacher {name} needs weights: --set teacher_checkpoint=FILE")
        teacher = create_model(
            name, checkpoint_path=weights, new_head=False, num_classes=num_classes, img_size=cfg.img_size
        )  # a teacher's classifier must be its own: a mismatch is an error, not a random head
    else:
        overlay = {"file": weights} if weights else None
        try:
            teacher = timm.create_model(
                name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay
            )
        except RuntimeError as e:
            raise UserError(f"cannot create teacher {name!r}: {e}") from None
    out = getattr(teacher, "num_classes", num_classes)
    if out != num_classes:
        raise UserError(f"teacher predicts {out} classes, the data set has {num_classes}")
    return teacher.to(device).eval().requires_grad_(False)


def load_teacher_logits(path: str, num_samples: int, num_classes: int) -> Tensor:
    """Precomputed teacher logits, one row per training sample in data-set order."""
    try:
        state = load_state(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    logits = state.get("logits")
    if logits is None or tuple(logits.shape) != (num_samples, num_classes):
        shape = None if logits is None else tuple(logits.shape)
        raise UserError(
            f"{path}: expected a 'logits' tensor of shape {(num_samples, num_classes)}, got {shape}"
        )
    return logits.float()


def compute_teacher_logits(
    cfg: TrainConfig, out: str | os.PathLike, batch_size: int = 256, overwrite: bool = False
) -> Path:
    """Run the teacher once over the training set (data-set order, no augmentation) for `teacher_logits`.

    Training with the file then skips the teacher's forward pass; the price is that the student's
    images must be unaugmented too, which `sret train` enforces when `teacher_logits` is set. An
    existing `out` is replaced only with `overwrite`.
    """
    if not cfg.teacher:
        raise UserError("which teacher? pass --teacher NAME_OR_CHECKPOINT")
    if Path(out).suffix != ".safetensors":
        raise UserError(f"teacher logits are written as safetensors: name the file *.safetensors, not {out}")
    check_destination(out, overwrite)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    pre = Preprocess(img_size=cfg.img_size, crop_pct=cfg.crop_pct)
    plain = Augment(enabled=False)
    data = build_datasets(
        cfg.dataset, cfg.data_dir, pre, plain, cfg.val_fraction, cfg.seed, cfg.skip_bad_images
    )
    train = subset(data.train, cfg.train_subset, cfg.seed)
    teacher = build_teacher(cfg, len(data.classes), device)
    loader = DataLoader(train, batch_size=batch_size, num_workers=cfg.workers)
    logits, _ = collect_logits(teacher, loader, device)
    atomic_write(out, lambda tmp: save_file({"logits": logits.contiguous()}, tmp))
    return Path(out)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
class Run:
    """One training run: builds everything from the config, then trains, validates and checkpoints."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist, console: Any) -> None:
        self.cfg, self.dir, self.d, self.console = cfg, run_dir, d, console
        train, val = self.build_data()
        self.build_model()
        self.build_optimizer()
        self.build_teacher(len(train))
        if self.logits is not None:
            train = WithIndex(train)
        self.build_loaders(train, val)
        self.build_schedule()
        self.build_loss()
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.best_acc1 = -1.0
        self.epoch_lr = 0.0  # the learning rate at the start of the current epoch (metrics' `lr`)
        self.history: list[dict[str, float]] = []
        self.sums = [0.0, 0.0, 0.0]  # loss * n, correct, n of the epoch so far (over all ranks)
        self.saves = self.steps_done = 0  # by this process (what the FAULT_* variables count)
        seed_all(cfg.seed + d.rank)

    def build_data(self) -> tuple[Dataset, Dataset]:
        """The data sets (and the class names and preprocessing every weights file records)."""
        cfg, d = self.cfg, self.d
        self.pre = Preprocess(img_size=cfg.img_size, crop_pct=cfg.crop_pct)
        data = build_datasets(
            cfg.dataset,
            cfg.data_dir,
            self.pre,
            cfg.augmentation(),
            cfg.val_fraction,
            cfg.seed,
            cfg.skip_bad_images,
            cfg.cache_images,
        )
        self.data, self.classes = data, data.classes
        # what a checkpoint needs besides its weights to classify an image file: in classes.json and
        # in every weights file's metadata, with the validation split, so that a file moved out of its
        # run (or converted from it) is still scored on the images the run held out
        split = {"data_dir": cfg.data_dir, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
        self.info = {
            "classes": self.classes,
            "preprocess": asdict(self.pre),
            "dataset": cfg.dataset,
            "split": split,
        }
        train = subset(data.train, cfg.train_subset, cfg.seed)
        val = subset(data.val, cfg.val_subset, cfg.seed)
        if cfg.batch_size % d.world_size:
            raise UserError(f"batch_size {cfg.batch_size} is not divisible by {d.world_size} processes")
        self.batch = cfg.batch_size // d.world_size
        if len(train) < cfg.batch_size:
            raise UserError(f"batch_size {cfg.batch_size} exceeds the {len(train)} training images")
        if len(self.classes) < 2:
            raise UserError(f"{cfg.dataset} has {len(self.classes)} class: a classifier needs at least two")
        return train, val

    def build_model(self) -> None:
        """`model` (the weights), `net` (what trains: DDP and compiled where asked) and `eval_net`."""
        cfg, d = self.cfg, self.d
        seed_all(cfg.seed)  # identical initial weights on every rank
        self.model_args = dict(num_classes=len(self.classes), img_size=cfg.img_size)
        self.model_args.update(model_overrides(cfg))
        options = dict(drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
        if cfg.shuffle:
            self.model_args["shuffle"] = cfg.shuffle
        model = create_model(cfg.model, checkpoint_path=cfg.checkpoint, **self.model_args, **options)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing()
        self.model = model.to(d.device)
        self.ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        if d.world_size > 1:
            if d.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[d.device] if d.device.type == "cuda" else None,
                find_unused_parameters=cfg.anytime != "none",  # fewer loops leave NLLs idle
            )
        # Training steps run compiled; validation stays eager: its last batch is smaller and eval mode
        # would compile a second graph, for a pass that is a small part of the run. Training shapes never
        # change (drop_last), so the graph is static: dynamic=False also keeps a second compiled model of
        # the same class in one process (another size or batch) from recompiling with symbolic shapes,
        # which inductor's GPU code generation failed on (torch 2.11, H100).
        self.eval_net = model
        self.net = (
            torch.compile(model, backend=cfg.compile, dynamic=False) if cfg.compile != "none" else model
        )

    def build_optimizer(self) -> None:
        """timm's optimizer; Adam(W) as torch's fused kernel where it has one (sret.runtime)."""
        cfg = self.cfg
        adam = cfg.opt.lower() in ("adam", "adamw")
        fused = {"fused": True} if adam and has_fused_adam(self.d.device) else {}
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.opt, lr=cfg.effective_lr, weight_decay=cfg.weight_decay, **fused
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if cfg.amp == "fp16" and self.d.device.type != "cuda":
            raise UserError("amp fp16 needs a GPU; use --amp bf16 on CPU")

    def build_teacher(self, train_size: int) -> None:
        """The distillation teacher: a frozen network, or precomputed logits (or neither)."""
        cfg = self.cfg
        self.teacher = build_teacher(cfg, len(self.classes), self.d.device) if cfg.teacher else None
        self.logits = None
        if cfg.teacher_logits:
            self.logits = load_teacher_logits(cfg.teacher_logits, train_size, len(self.classes))

    def build_loaders(self, train: Dataset, val: Dataset) -> None:
        """Training batches in the (seed, epoch) order of EpochSampler; this rank's validation shard."""
        cfg, d = self.cfg, self.d
        self.sampler = EpochSampler(
            train, d, cfg.seed, self.batch, cfg.repeated_aug, cfg.repeated_aug_full_epoch
        )
        self.generator = torch.Generator()
        self.train_loader = DataLoader(
            train,
            batch_size=self.batch,
            sampler=self.sampler,
            num_workers=cfg.workers,
            drop_last=True,  # equal batches on every rank; mixup needs even batch sizes
            generator=self.generator,
            pin_memory=d.device.type == "cuda",
        )
        self.val_loader = DataLoader(
            Subset(val, range(d.rank, len(val), d.world_size)), batch_size=self.batch, num_workers=cfg.workers
        )
        self.steps = len(self.sampler) // self.batch

    def build_schedule(self) -> None:
        """timm's learning-rate schedule, stepped per update (a pure function of the update count)."""
        cfg = self.cfg
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched=cfg.sched,
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            step_on_epochs=False,
            updates_per_epoch=self.steps,
        )

    def build_loss(self) -> None:
        """Mixup/CutMix with soft targets, else label smoothing, else plain cross-entropy (timm)."""
        cfg = self.cfg
        self.mixup = build_mixup(
            len(self.classes), cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob, cfg.smoothing
        )
        if self.mixup:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    # ---- state -----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.d.device.type, dtype=dtype)

    def save(self, sums: list[float], best: bool = False) -> None:
        """Weights (safetensors) and the training state, written together (all files or none change,
        see sret.io.atomic_writes); rank 0 only."""
        rngs = [None] * self.d.world_size
        if self.d.world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if not self.d.main:
            return
        described = (self.cfg.model, self.model_args, self.info)
        weights = weights_writer(self.model, *described)
        files = [(self.dir / "last.safetensors", weights)]
        if best:
            files.append((self.dir / "best.safetensors", weights))
        if self.ema is not None:
            files.append((self.dir / "last_ema.safetensors", weights_writer(self.ema.module, *described)))
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "best_acc1": self.best_acc1,
            "epoch_lr": self.epoch_lr,
            "history": self.history,
            "sums": sums,
            "rng": rngs,
            "world_size": self.d.world_size,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.saves += 1
        write_state = write_bytes(buffer.getvalue())
        if fault_due(FAULT_EXIT_IN_CHECKPOINT, self.saves):
            files.append((self.dir / STATE_FILE, lambda tmp: (write_state(tmp), os._exit(FAULT_EXIT_CODE))))
        else:
            files.append((self.dir / STATE_FILE, write_state))
        atomic_writes(files)
        if fault_due(FAULT_EXIT_AFTER_CHECKPOINT, self.saves):
            os._exit(FAULT_EXIT_CODE)

    def load(self) -> None:
        path = self.dir / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read training state {path}: {e}") from None
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
            config = self.dir / "config.yaml"
            raise UserError(
                f"{path} does not fit the run's {self.cfg.model} (was {config} edited?): {detail}"
            ) from None
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.best_acc1, self.history = state["best_acc1"], state["history"]
        self.epoch_lr = state.get("epoch_lr", self.epoch_lr)
        self.sums = state["sums"] if self.d.main else [0.0, 0.0, 0.0]
        rngs = state["rng"]
        set_rng_state(rngs[self.d.rank] if len(rngs) == self.d.world_size else rngs[0])
        self.scheduler.step_update(self.global_step)

    # ---- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, progress: Any) -> tuple[float, float, float, float]:
        """Train from `self.step` to the end of `self.epoch`; returns loss, acc, images/s, seconds."""
        cfg, d = self.cfg, self.d
        self.net.train()
        self.sampler.set_epoch(self.epoch, self.step)
        self.generator.manual_seed(cfg.seed * 1_000_003 + self.epoch)  # worker seeds per (seed, epoch)
        loss_sum, correct, seen = self.sums if self.step else (0.0, 0.0, 0.0)
        task = progress.add_task(
            f"epoch {self.epoch + 1}/{cfg.epochs}",
            total=self.steps,
            completed=self.step,
            loss=0.0,
            acc=0.0,
            rate=0.0,
        )
        start, images_done = time.perf_counter(), 0
        for batch in self.train_loader:
            loss, n, hits = self.train_step(batch)
            loss_sum, correct, seen = loss_sum + loss * n, correct + hits, seen + n
            self.step += 1
            self.global_step += 1
            images_done += n * d.world_size
            rate = images_done / max(time.perf_counter() - start, 1e-9)
            progress.update(task, advance=1, loss=loss, acc=correct / seen, rate=rate)
            if (
                cfg.save_every_steps
                and self.global_step % cfg.save_every_steps == 0
                and self.step < self.steps
            ):
                self.save(self._epoch_sums(loss_sum, correct, seen))
            self.steps_done += 1
            if fault_due(FAULT_INTERRUPT_AFTER_STEP, self.steps_done):
                raise KeyboardInterrupt  # what Ctrl-C raises
        progress.remove_task(task)  # the epoch summary line is the lasting record
        loss_sum, correct, seen = self._epoch_sums(loss_sum, correct, seen)
        elapsed = time.perf_counter() - start
        return loss_sum / seen, correct / seen, images_done / max(elapsed, 1e-9), elapsed

    def _epoch_sums(self, loss_sum: float, correct: float, seen: float) -> list[float]:
        """Epoch totals over all ranks; rank 0 carries a resumed run's earlier part, so sum once."""
        return all_sum([loss_sum, correct, seen], self.d)

    def train_step(self, batch: list[Tensor]) -> tuple[float, int, int]:
        cfg, dev = self.cfg, self.d.device
        images, labels = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        with self.autocast():
            out, loss = self.forward_loss(images, targets)
            teacher = self._teacher_logits(images, batch)
            if teacher is not None:
                kd = soft_distillation_loss(out, teacher, cfg.distill_temperature)
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
        self._check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.clip_grad:
            dispatch_clip_grad(self.model.parameters(), cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step_update(self.global_step + 1)
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
        hits = int((out.argmax(-1) == labels).sum())
        return float(loss.detach()), len(labels), hits

    def forward_loss(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and loss of one step. With anytime depth the model runs at loop counts drawn for
        this step (the same on every rank, and again on resume); with anytime_distill = a > 0 it also
        runs at full depth, and the loss is CE(full) + (1 - a) CE(drawn) + a KD(drawn, full), the full
        depth's output (detached) teaching the drawn one. The logits returned are full depth's then."""
        cfg = self.cfg
        if cfg.anytime == "none":
            out = self.net(images)
            return out, self.criterion(out, targets)
        rng = random.Random(cfg.seed * 1_000_003 + self.global_step)
        self.model.set_loops(sample_loops(rng, self.model.trained_loops, cfg.anytime_min_loops, cfg.anytime))
        try:
            out = self.net(images)
        finally:
            self.model.set_loops(None)
        loss = self.criterion(out, targets)
        if not cfg.anytime_distill:
            return out, loss
        full = self.net(images)
        a = cfg.anytime_distill
        kd = soft_distillation_loss(out, full.detach(), 1.0)
        return full, self.criterion(full, targets) + (1 - a) * loss + a * kd

    def _teacher_logits(self, images: Tensor, batch: list[Tensor]) -> Tensor | None:
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher(images)
        if self.logits is not None:
            return self.logits[batch[2]].to(images.device)
        return None

    def _check_finite(self, loss: Tensor) -> None:
        bad = all_sum([0.0 if torch.isfinite(loss.detach()).item() else 1.0], self.d)[0]
        if bad:
            kept = (
                f"the last good checkpoint in {self.dir} is kept"
                if (self.dir / STATE_FILE).exists()
                else "no checkpoint had been written yet"
            )
            raise TrainingError(
                f"loss is {float(loss.detach())} at epoch {self.epoch + 1}, step {self.step + 1}: stopping; "
                f"{kept} (try a lower lr or --set clip_grad=1.0)"
            )

    @torch.no_grad()
    def validate(self, model: nn.Module) -> tuple[float, float, float]:
        """Loss, top-1 and top-5 over the whole validation set (each rank a disjoint shard)."""
        logits, labels = scored(*collect_logits(model, self.val_loader, self.d.device, self.autocast))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        sums = [
            float(F.cross_entropy(logits, labels, reduction="sum")),
            float((top[:, 0] == labels).sum()),
            float((top == labels[:, None]).any(1).sum()),
            float(len(labels)),
        ]
        loss, c1, c5, n = all_sum(sums, self.d)
        return loss / n, c1 / n, c5 / n

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        log = MetricsLog(self.dir, self.d.main, purge_epoch=self.epoch)
        log.write(self.history)
        try:
            with make_progress(self.console, self.d.main) as progress:
                while self.epoch < self.cfg.epochs:
                    self.history.append(self.run_epoch(progress))
                    improved = self.history[-1]["val_acc1"] > self.best_acc1
                    self.best_acc1 = max(self.best_acc1, self.history[-1]["val_acc1"])
                    self.epoch, self.step = self.epoch + 1, 0
                    self.save([0.0, 0.0, 0.0], best=improved)
                    log.write(self.history)
                    if self.d.main:
                        self.console.print(summary_line(self.history[-1], self.cfg.epochs))
        finally:
            log.close()
        if self.data.skipped and self.d.main:
            self.console.print(f"[yellow]skipped {self.data.skipped} unreadable image(s)[/]")
        return self.history[-1] if self.history else {}

    def run_epoch(self, progress: Any) -> dict[str, float]:
        if self.step == 0:  # a resumed epoch keeps the learning rate it started with
            self.epoch_lr = self.optimizer.param_groups[0]["lr"]
        lr = self.epoch_lr
        train_loss, train_acc, rate, seconds = self.train_epoch(progress)
        val_loss, acc1, acc5 = self.validate(self.eval_net)
        row = dict(
            epoch=self.epoch + 1,
            train_loss=train_loss,
            train_acc=train_acc,
            val_loss=val_loss,
            val_acc1=acc1,
            val_acc5=acc5,
            lr=lr,
            time_s=seconds,
            img_per_s=rate,
        )
        if self.ema is not None:
            row["ema_val_loss"], row["ema_val_acc1"], _ = self.validate(self.ema.module)
        return row


def log_console() -> Console:
    """Where a run reports (stderr). Written to a file (nohup, a batch scheduler) rich would wrap every
    line at 80 columns, splitting an epoch's metrics over two lines; there each message stays one."""
    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, soft_wrap=True)


def make_progress(console: Any, enabled: bool) -> Any:
    """A per-epoch bar with loss, accuracy, images/s and ETA (rich) on a terminal; elsewhere, where a
    bar cannot redraw, a line every PROGRESS_SECONDS (:class:`LineProgress`)."""
    if not (console.is_terminal or console.is_jupyter):
        return LineProgress(console, enabled, PROGRESS_SECONDS)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}  {task.fields[rate]:.0f} img/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


class LineProgress:
    """The progress bar's information as plain lines, for output that is not a terminal (a log file).

    One line every `seconds` of wall clock within an epoch, since an epoch can be minutes long
    (timm's train.py logs every `log_interval` batches for the same reason). It takes the calls
    `train_epoch` makes on rich's Progress; `clock` is injectable so tests need not wait.
    """

    def __init__(
        self, console: Any, enabled: bool, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console, self.enabled, self.seconds, self.clock = console, enabled, seconds, clock
        self.tasks: dict[int, dict[str, Any]] = {}
        self.last = clock()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        now = self.clock()
        task = len(self.tasks)
        self.tasks[task] = dict(
            description=description, total=total, completed=completed, first=completed, start=now, **fields
        )
        self.last = now
        return task

    def update(self, task: int, advance: int = 1, **fields: Any) -> None:
        state = self.tasks[task]
        state.update(fields, completed=state["completed"] + advance)
        now = self.clock()
        if self.enabled and now - self.last >= self.seconds:
            self.last = now
            line = progress_line(state, now - state["start"])
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def remove_task(self, task: int) -> None:
        del self.tasks[task]


def progress_line(task: dict[str, Any], elapsed: float) -> str:
    """`epoch 3/40  step 120/391  loss 1.2345  acc 0.4560  512 img/s  1:23 left`."""
    done = task["completed"] - task["first"]
    left = (task["total"] - task["completed"]) * elapsed / max(done, 1)
    return (
        f"{task['description']}  step {task['completed']}/{task['total']}  loss {task['loss']:.4f}  "
        f"acc {task['acc']:.4f}  {task['rate']:.0f} img/s  {timedelta(seconds=round(left))} left"
    )


def summary_line(row: dict[str, float], epochs: int) -> str:
    ema = f"  ema acc1 {row['ema_val_acc1']:.4f}" if "ema_val_acc1" in row else ""
    return (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
        f"val loss {row['val_loss']:.4f} acc1 {row['val_acc1']:.4f} acc5 {row['val_acc5']:.4f}{ema}  "
        f"lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['time_s']:.1f}s"
    )


def start_lines(run: Run) -> list[str]:
    """What the run is, resolved (model, resolution, data, schedule), and warnings where a setting
    cannot do what it says."""
    cfg, d = run.cfg, run.d
    lines = [
        f"run {run.dir}: {cfg.model} at {cfg.img_size} px on {cfg.dataset} ({len(run.classes)} classes, "
        f"{len(run.sampler.inner.dataset)} training / {len(run.val_loader.dataset)} validation images), "
        f"{cfg.epochs} epochs x {run.steps} steps (warm-up {cfg.warmup_epochs}), batch {cfg.batch_size}, "
        f"lr {cfg.effective_lr:.2e}, {d.world_size}x {d.device}"
    ]
    with run.autocast():  # what the training step runs: SReT's kernels, or the plain modules and why
        lines.append(kernels.summary(torch.empty(0, device=d.device), compiled=cfg.compile != "none"))
    if cfg.warmup_epochs >= cfg.epochs:
        lines.append(
            f"[yellow]warning: warmup_epochs ({cfg.warmup_epochs}) >= epochs ({cfg.epochs}): the learning "
            f"rate never reaches its peak {cfg.effective_lr:.2e}[/]"
        )
    native = run.model.pretrained_cfg.get("input_size", (3, cfg.img_size))[-1]
    if native != cfg.img_size and not cfg.checkpoint:
        lines.append(
            f"[yellow]warning: {cfg.model} is built for {native} px and trains here at {cfg.img_size} px "
            f"(the recipe's img_size; --set img_size={native} for the model's own, or -r finetune for an "
            "image folder)[/]"
        )
    return lines


def _new_run_dir(cfg: TrainConfig, d: Dist) -> Path:
    name = cfg.name or f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if d.world_size > 1:  # one name for all ranks
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg.output) / name
    refuse_to_overwrite(run_dir, resuming=False)
    return run_dir


def refuse_to_overwrite(run_dir: Path, resuming: bool) -> None:
    """A run that starts from the beginning in `run_dir` would overwrite what a run made there: refuse,
    and say how to go on. (A run killed before its first checkpoint made nothing: it may start again.)"""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder: pick another --name or --output")
    made = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not made:
        return
    if STATE_FILE in made:
        raise UserError(
            f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another --name"
        )
    if resuming:
        raise UserError(
            f"cannot resume {run_dir}: its training state {STATE_FILE} is missing, and starting over would "
            f"overwrite its {', '.join(made)}; restore {STATE_FILE}, or train a new run under another --name"
        )
    raise UserError(
        f"{run_dir} holds the outputs of a run ({', '.join(made)}) but no training state to resume: "
        "pick another --name, or move them away"
    )


def check_memory(cfg: TrainConfig, d: Dist) -> None:
    """Refuse, before any image is read or model built, sizes this machine cannot hold (an estimate
    that errs low: see sret.info.memory_estimate), instead of exhausting its memory to find out."""
    args = {**model_overrides(cfg), "img_size": cfg.img_size}
    needed = memory_estimate(model_config(cfg.model, **args), cfg.batch_size // d.world_size, training=True)
    data = resident_bytes(cfg.dataset, cfg.img_size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes sharing this machine
    what = f"training {cfg.model} at img_size {cfg.img_size} with batch_size {cfg.batch_size}"
    advice = "lower img_size or batch_size"
    if d.device.type == "cpu":
        require_memory(local * (needed + data), d.device, what, advice)
    else:
        require_memory(needed, d.device, what, advice)
        require_memory(
            local * data, torch.device("cpu"), f"holding {cfg.dataset} at img_size {cfg.img_size}", advice
        )


@contextlib.contextmanager
def run_lock(run_dir: Path, d: Dist) -> Iterator[None]:
    """One process (group) per run folder: rank 0 holds the lock (sret.io.folder_lock), and every rank
    learns whether it got it, so that all of them stop together when it did not."""
    with contextlib.ExitStack() as stack:
        refused = None
        if d.main:
            try:
                stack.enter_context(folder_lock(run_dir, "sret train"))
            except UserError as e:
                refused = str(e)
        if d.world_size > 1:
            box = [refused]
            dist.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused is not None:
            raise UserError(refused)
        yield


def _write_run_files(run: Run, cfg: TrainConfig) -> None:
    run.dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(asdict(cfg), sort_keys=False)
    atomic_write(run.dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    text = json.dumps(run.info, indent=1)
    atomic_write(run.dir / "classes.json", lambda tmp: Path(tmp).write_text(text))


def train(
    cfg: TrainConfig | None = None,
    resume: str | os.PathLike | None = None,
    console: Any = None,
    resume_settings: dict[str, Any] | None = None,
) -> Path:
    """Train (or resume) a run; returns the run folder. Raises `UserError` for user-fixable problems.

    A resumed run takes its config from the run folder; `resume_settings` may change only the
    RESUME_SETTINGS in it, since anything else would make it another run.
    """
    console = console or log_console()
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"not a run folder (no config.yaml): {run_dir}")
        settings = resume_settings or {}
        fixed = sorted(set(settings) - set(RESUME_SETTINGS))
        if fixed:
            raise UserError(
                f"--resume continues {run_dir} as its config.yaml defines it; only "
                f"{', '.join(RESUME_SETTINGS)} may change, not {', '.join(fixed)} (start a new run for that)"
            )
        cfg = TrainConfig.from_dict(read_mapping(run_dir / "config.yaml", "run config") | settings)
    cfg = cfg or resolve_config()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # fewer threads than cores helps on a busy machine
    d = setup_distributed(cfg.device)
    try:
        check_memory(cfg, d)
        if resume is None:
            run_dir = _new_run_dir(cfg, d)
        elif not (run_dir / STATE_FILE).is_file():
            refuse_to_overwrite(run_dir, resuming=True)  # before the data is read (again under the lock)
        run = Run(cfg, run_dir, d, console)
        with run_lock(run_dir, d):
            fit_run(run, resume is not None, console)
    finally:
        if d.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def fit_run(run: Run, resume: bool, console: Any) -> None:
    """Load or start the run in its (locked) folder, then train it; on Ctrl-C, say what is kept."""
    run_dir, d = run.dir, run.d
    resuming = resume and (run_dir / STATE_FILE).is_file()
    if resuming:
        run.load()
    else:  # a new run, or one killed before its first checkpoint: start from the beginning
        refuse_to_overwrite(run_dir, resume)
        if d.main:
            _write_run_files(run, run.cfg)
    if d.main:
        remove_stale_temporaries(run_dir)  # of writes a kill interrupted (the lock keeps out the living)
        for line in start_lines(run):
            console.print(line)
    try:
        final = run.fit()
    except KeyboardInterrupt:
        if d.main and (run_dir / STATE_FILE).is_file():
            console.print(
                f"interrupted in epoch {run.epoch + 1}; {run_dir} keeps the last checkpoint: "
                f"continue with `sret train --resume {run_dir}`"
            )
        elif d.main:
            console.print(
                f"interrupted in epoch {run.epoch + 1}, before the first checkpoint: nothing was kept; "
                f"`sret train --resume {run_dir}` starts the run again"
            )
        raise
    if d.main and final:
        console.print(f"done: best val acc1 {run.best_acc1:.4f}, weights in {run_dir}")


def final_metrics(run_dir: str | os.PathLike) -> dict[str, float]:
    """The last epoch's metrics of a run, without timings (identical for identical runs)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    return {k: v for k, v in row.items() if k not in TIME_KEYS}
