"""Parameter and MAC accounting: where a SReT spends its weights and its compute.

MACs are torch's FlopCounterMode total / 2 for one image, counted on the plain modules (the kernels
switched off) with attention through the math backend of scaled_dot_product_attention, whose matrix
products the counter sees on every device.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sret import kernels
from sret.checkpoint import read_metadata
from sret.model import MODEL_CONFIGS, SReT, SReTConfig, StageConfig
from sret.runtime import require_memory
from sret.variants import resolve_overrides

# Component of a parameter or module name, first match wins. Coefficients and pre-norms belong to the
# branch they scale or feed.
_COMPONENTS = (
    ("stem", r"^(patch_embed|pos_embed)"),
    ("attention", r"^stages\.\d+\.blocks\.\d+\.(attn|norm1|attn_)"),
    ("mlp", r"^stages\.\d+\.blocks\.\d+\.(mlp|norm2|mlp_)"),
    ("nll", r"^stages\.\d+\.nlls\."),
    ("adapters", r"^stages\.\d+\.adapters\."),
    ("pooling", r"^pools\."),
    ("head", r"^(norm|head)"),
)
COMPONENTS = tuple(name for name, _ in _COMPONENTS)


def component_of(name: str) -> str | None:
    for component, pattern in _COMPONENTS:
        if re.match(pattern, name):
            return component
    return None


def _input(model: nn.Module, img_size: int | None) -> torch.Tensor:
    size = img_size or getattr(model, "img_size", (224, 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    param = next(model.parameters())
    return torch.zeros(1, in_chans, *size, device=param.device, dtype=param.dtype)


def _count(model: nn.Module, img_size: int | None) -> FlopCounterMode:
    was_training = model.training
    model.eval()
    try:
        # The plain modules, with attention as explicit products: torch's CPU attention kernels have no
        # flop formula, and SReT's own run only on some CPUs. Grad stays enabled: the counter's module
        # tracker fails on some timm models (PiT) under no_grad.
        with (
            kernels.disabled(),
            sdpa_kernel([SDPBackend.MATH]),
            FlopCounterMode(display=False) as counter,
        ):
            model(_input(model, img_size))
    finally:
        model.train(was_training)
    return counter


def count_macs(model: nn.Module, img_size: int | None = None) -> int:
    """Multiply-accumulates of one forward pass on one image (FlopCounterMode total / 2)."""
    return _count(model, img_size).get_total_flops() // 2


def macs_by_module(model: nn.Module, img_size: int | None = None) -> dict[str, int]:
    """Multiply-accumulates of one image in each module that does any, by qualified name (inclusive:
    a module's count holds its children's)."""
    counts = _strip_root(_count(model, img_size).get_flop_counts())
    return {name: flops // 2 for name, flops in counts.items()}


@dataclass
class ModelInfo:
    """Params and MACs of one model, split by component and by stage."""

    name: str
    img_size: int
    params: int
    macs: int
    params_by_component: dict[str, int]
    macs_by_component: dict[str, int]
    macs_by_stage: list[int]
    unsliced_macs: int
    loops: tuple[int, ...] = ()  # loops per block of each stage, as counted
    active_params: int = 0  # parameters used at those loops (fewer loops leave NLLs idle)

    @property
    def slicing_saving(self) -> float:
        """Fraction of MACs saved against the same model with all groups 1 and no permutation."""
        return 1.0 - self.macs / self.unsliced_macs if self.unsliced_macs else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "slicing_saving": self.slicing_saving}


def unsliced_twin(model: SReT) -> SReT:
    """The same architecture with full (unsliced) attention in every loop."""
    stages = tuple(replace(s, groups=(1,) * s.loops, permute=(False,) * s.loops) for s in model.cfg.stages)
    twin = SReT(replace(model.cfg, stages=stages))
    twin.set_loops(model.loops)
    return twin


def _strip_root(counts: dict[str, dict]) -> dict[str, int]:
    """Module FQN (without the root class name) -> inclusive flop total."""
    out = {}
    for name, ops in counts.items():
        parts = name.split(".", 1)
        if len(parts) == 2:
            out[parts[1]] = sum(ops.values())
    return out


def model_info(
    name: str, img_size: int | None = None, loops: int | Sequence[int] | None = None, **overrides
) -> ModelInfo:
    """Account params and MACs of a registered variant (at `img_size`, default its own; at `loops`,
    default its configured depth)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")
    if img_size is not None:
        overrides["img_size"] = img_size
    cfg = model_config(name, **overrides)  # checked before building: a size can exhaust the memory
    needed = memory_estimate(cfg, 1, training=False)
    require_memory(needed, torch.device("cpu"), f"{name} at img_size {cfg.img_size}", "lower --img-size")
    model = SReT(MODEL_CONFIGS[name], **overrides)
    model.set_loops(loops)
    size = model.img_size[0]
    counter = _count(model, None)
    total = counter.get_total_flops()
    flops = _strip_root(counter.get_flop_counts())
    macs_by_component = dict.fromkeys(COMPONENTS, 0)
    for module, count in flops.items():  # inclusive counts: take the outermost module of each component
        component = component_of(module)
        if component and ("." not in module or component_of(module.rsplit(".", 1)[0]) != component):
            macs_by_component[component] += count // 2
    params_by_component = dict.fromkeys(COMPONENTS, 0)
    for pname, p in model.named_parameters():
        params_by_component[component_of(pname)] += p.numel()
    return ModelInfo(
        name=name,
        img_size=size,
        params=sum(p.numel() for p in model.parameters()),
        macs=total // 2,
        params_by_component=params_by_component,
        macs_by_component=macs_by_component,
        macs_by_stage=[flops.get(f"stages.{i}", 0) // 2 for i in range(len(model.stages))],
        unsliced_macs=count_macs(unsliced_twin(model)) if is_sliced(model) else total // 2,
        loops=model.loops,
        active_params=active_params(model),
    )


def info_source(name: str, overrides: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The model name and keyword overrides to account: a registered variant, or the architecture
    one of our weights files stores; `overrides` (model options, as `model_args` takes them) on top."""
    stored: dict[str, Any] = {}
    if name.endswith(".safetensors"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"checkpoint not found: {path}")
        meta = read_metadata(path)
        if "model_name" not in meta:
            raise ValueError(f"{path} does not say which model it holds")
        name, stored = meta["model_name"], meta.get("model_args", {})
    return name, resolve_overrides(name, stored, overrides or {})


def model_config(name: str, **overrides: Any) -> SReTConfig:
    """The config `create_model(name, **overrides)` would build, without building anything (a model
    allocates its positional embedding and token layouts for its size when built)."""
    if "stages" in overrides:
        overrides["stages"] = tuple(StageConfig.from_mapping(s) for s in overrides["stages"])
    if "loop_lora_targets" in overrides:
        overrides["loop_lora_targets"] = tuple(overrides["loop_lora_targets"])
    return replace(MODEL_CONFIGS[name.split(".", 1)[0]], **overrides)


def memory_estimate(cfg: SReTConfig, batch: int, training: bool) -> int:
    """Bytes that one float32 step on `batch` images takes at the least, to refuse impossible sizes
    before work starts (it errs low, never refusing what fits).

    Counted: the weights (with gradients and AdamW's two moments when training); per image the input,
    the stem's feature maps and, per block application, its input and output and the MLP's (and
    NLL's) hidden activations: all kept for the backward pass when training, the largest when not.
    Not counted: attention matrices, norms, the optimizer's and allocator's working space.
    """
    height, width = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    dim0 = cfg.stages[0].dim
    if cfg.stem == "conv":  # three convs, dim0/2, dim0 and dim0 channels, the first log2(stride) halving
        maps = [(height, width)]
        for i in range(3):
            halve = i < cfg.stem_stride.bit_length() - 1
            maps.append((-(-maps[-1][0] // 2), -(-maps[-1][1] // 2)) if halve else maps[-1])
        stem = [c * h * w for c, (h, w) in zip((dim0 // 2, dim0, dim0), maps[1:], strict=True)]
        grid = maps[-1]
    else:
        grid = (height // cfg.patch_size, width // cfg.patch_size)
        stem = [dim0 * grid[0] * grid[1]]
    weights = dim0 * grid[0] * grid[1]  # the positional embedding
    layers = []
    for i, stage in enumerate(cfg.stages):
        if i:
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        hidden = cfg.mlp_ratio + (cfg.nll_ratio if cfg.nll != "none" else 0)
        layers += [grid[0] * grid[1] * stage.dim * (2 + hidden)] * stage.depth
        weights += stage.blocks * (4 + 2 * cfg.mlp_ratio) * stage.dim**2
    image = cfg.in_chans * height * width
    if training:
        return int(4 * (4 * weights + batch * (image + sum(stem) + sum(layers))))
    return int(4 * (weights + batch * (image + max(*stem, *layers))))


def active_params(model: SReT) -> int:
    """Parameters the model uses at its current loops: all but the NLLs and per-loop adapters that no
    application runs."""
    idle = 0
    for stage in model.stages:
        for modules, field in ((stage.nlls, "nll"), (stage.adapters, "adapter")):
            used = {getattr(app, field) for app in stage.schedule}
            idle += sum(p.numel() for i, m in enumerate(modules) if i not in used for p in m.parameters())
    return sum(p.numel() for p in model.parameters()) - idle


def is_sliced(model: SReT) -> bool:
    return any(g > 1 for stage in model.cfg.stages for g in stage.groups)


def describe_stage(stage: StageConfig) -> str:
    """`blocks x loops`, dim, heads and groups per loop (a repeated tail written once)."""
    first, rest = stage.groups[0], set(stage.groups[1:])
    if not rest or rest == {first}:
        groups = str(first)
    elif len(rest) == 1:
        groups = f"{first}/{rest.pop()}"
    else:
        groups = "/".join(str(g) for g in stage.groups)
    return f"{stage.blocks}x{stage.loops} d{stage.dim} h{stage.heads} g{groups}"


def print_zoo(names: list[str] | None = None) -> None:
    """Rich table of the zoo: params, GMACs and the saving of slicing, all measured now."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SReT model zoo (MACs for one image)")
    for col in ("model", "res", "params (M)", "GMACs", "unsliced GMACs", "saving", "layers", "stages"):
        table.add_column(col, justify="left" if col in ("model", "stages") else "right")
    for name in names or sorted(MODEL_CONFIGS):
        info = model_info(name)
        cfg = MODEL_CONFIGS[name]
        table.add_row(
            name,
            str(info.img_size),
            f"{info.params / 1e6:.3f}",
            f"{info.macs / 1e9:.3f}",
            f"{info.unsliced_macs / 1e9:.3f}",
            f"{info.slicing_saving:.1%}",
            str(sum(s.depth for s in cfg.stages)),
            ", ".join(describe_stage(s) for s in cfg.stages),
        )
    Console().print(table)


def print_info(info: ModelInfo) -> None:
    """Rich tables of one model's breakdown."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    loops = "" if not info.loops else f", loops {'/'.join(map(str, info.loops))}"
    table = Table(title=f"{info.name} @ {info.img_size}px{loops}")
    for col in ("component", "params", "params %", "MACs (M)", "MACs %"):
        table.add_column(col, justify="left" if col == "component" else "right")
    for comp in COMPONENTS:
        p, m = info.params_by_component[comp], info.macs_by_component[comp]
        table.add_row(comp, f"{p:,}", f"{p / info.params:.1%}", f"{m / 1e6:.1f}", f"{m / info.macs:.1%}")
    table.add_row("total", f"{info.params:,}", "100%", f"{info.macs / 1e6:.1f}", "100%", style="bold")
    console.print(table)
    if info.active_params != info.params:
        console.print(
            f"used at these loops: {info.active_params:,} parameters (the other NLLs and adapters stay idle)"
        )
    stages = Table(title="MACs by stage")
    stages.add_column("stage")
    stages.add_column("MACs (M)", justify="right")
    for i, m in enumerate(info.macs_by_stage):
        stages.add_row(str(i), f"{m / 1e6:.1f}")
    console.print(stages)
    console.print(
        f"sliced: {info.macs / 1e9:.3f} GMACs, unsliced twin: {info.unsliced_macs / 1e9:.3f} GMACs, "
        f"saving {info.slicing_saving:.1%}"
    )
