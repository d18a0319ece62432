"""Throughput, latency, memory and compute efficiency of SReT next to well-optimised timm references.

Models are timed round-robin (every repeat runs every model once), so noise from other work on the
machine hits all contenders alike; the reported latency is the median over repeats. Efficiency is
judged by achieved GFLOP/s (MACs x 2 x images/s) and its fraction of a large matmul measured on the
same device in the same run, because images/s alone favours models that simply do less work.

Peak memory: on CUDA the allocator's high-water mark. On CPU there is no allocator counter, so each
model runs one more step in a fresh child process (``python -m sret.bench --child``), whose memory is
not muddled by other models, and with glibc returning large blocks to the system on free (so RSS
follows live tensors rather than the allocator's retained heap); it resets the kernel's RSS
high-water mark after building the model, optimizer state, gradient buffers and input batch, and
"activation memory" is the step's peak RSS minus the RSS before it, i.e. what the step itself added
(activations and temporaries).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sret import kernels
from sret.info import count_macs, macs_by_module, memory_estimate, model_config
from sret.io import UserError
from sret.kernels import onednn
from sret.kernels.table import always
from sret.model import MODEL_CONFIGS  # importing the model registers the SReT variants with timm
from sret.runtime import has_fused_adam, release_cpu_memory, require_memory

REFERENCES = ("deit_tiny_patch16_224", "pit_ti_224")
DEFAULT_MODELS = ("sret_t", "sret_t_noslice")
TRAIN_MAC_FACTOR = 3  # forward + backward ~ 3x the forward MACs (backward computes two products per one)


def mac_factor(cfg: BenchConfig) -> int:
    """Multiplier of the forward MACs that a step does: TRAIN_MAC_FACTOR when training, else 1."""
    return TRAIN_MAC_FACTOR if cfg.train else 1


class BenchError(ValueError):
    """A model cannot run in the requested configuration (an input size it rejects, say)."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how; shared by the timing pass and the memory children."""

    batch: int = 32
    img_size: int | None = None  # None: each model's default input size
    train: bool = False
    compile: bool = False
    device: str = "cpu"
    amp: str | None = None  # 'bf16' or None
    threads: int | None = None
    shuffle: str | None = None  # override for SReT models
    loops: int | tuple[int, ...] | None = None  # SReT models run at this depth (see SReT.set_loops)
    # Stochastic depth for every model alike, so each training step does the same kind of work. 0.1 is
    # the ImageNet recipe of SReT and of DeiT; timm's own constructors default to 0 while SReT's to 0.1.
    drop_path: float = 0.1
    warmup: int = 3
    repeats: int = 10
    memory: bool = True
    attention_time: bool = False  # also time the attention calls inside each step (CPU, eager)
    part_time: bool = False  # also time each top-level part of the model inside each step (CPU, eager)
    model_files: tuple[str, ...] = ()  # Python files that register more timm models (import_model_files)

    def __post_init__(self) -> None:
        missing = [path for path in self.model_files if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"model file(s) not found: {', '.join(missing)}")
        if self.amp not in (None, "bf16"):
            raise ValueError(f"amp must be 'bf16' or unset, got {self.amp!r}")
        if self.shuffle not in (None, "none", "fixed", "random"):
            raise ValueError(f"shuffle must be none, fixed or random, got {self.shuffle!r}")
        try:
            kind = torch.device(self.device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested, but CUDA is not available")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {self.img_size}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.batch < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("batch and repeats must be >= 1 and warmup >= 0")
        if self.attention_time and (kind != "cpu" or self.compile):
            raise ValueError(
                "attention is timed from the host around each call: it needs --device cpu and no --compile"
            )
        if self.part_time and (kind != "cpu" or self.compile):
            raise ValueError(
                "parts are timed from the host around each module call: it needs --device cpu and "
                "no --compile"
            )


@dataclass(frozen=True)
class Contender:
    """One model in one configuration."""

    name: str
    grad_checkpointing: bool = False
    reference: bool = False
    plain: bool = False  # SReT on its plain modules, torch's kernels (sret.kernels.disabled)

    @property
    def label(self) -> str:
        return self.name + (" plain" if self.plain else "") + (" +ckpt" if self.grad_checkpointing else "")


@dataclass
class BenchRow:
    """Measurements of one contender (JSON row)."""

    model: str
    label: str
    reference: bool
    mode: str
    grad_checkpointing: bool
    batch: int
    img_size: int
    params_m: float
    gmacs: float  # forward MACs of one image
    latency_ms: float  # median over repeats of one step (a whole batch)
    latency_min_ms: float
    images_per_s: float
    gflops: float  # achieved: MACs x 2 (x 3 when training) x images/s
    peak_fraction: float  # gflops / measured matmul peak
    ratio_to_reference: float | None = None  # gflops / the first reference's gflops
    activation_mem_mib: float | None = None
    peak_mem_mib: float | None = None
    attention_ms: float | None = None  # median over repeats of the step's time in attention
    parts: list[dict[str, Any]] | None = None  # with part_time: time and MACs per part (_parts_summary)
    outside_parts_ms: float | None = None  # with part_time: median of (step - its parts): loss, optimizer
    latencies_ms: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Building models and steps
# --------------------------------------------------------------------------------------------------
def import_model_files(paths: Sequence[str]) -> None:
    """Import Python files that register timm models (`@register_model`), so that a model defined
    outside timm and sret can be timed by name beside ours: the authors' `SReT.py` (its `SReT_T` is
    `sret_t`), say. Each file is imported once per process; a file that fails to import is a
    BenchError naming it and the cause (a missing package, say)."""
    for path in paths:
        name = "sret_bench_models_" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise BenchError(f"{path}: not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # timm's register_model looks its module up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # whatever the file raises, reported as the file's failure
            del sys.modules[name]
            raise BenchError(f"could not import {path}: {type(e).__name__}: {e}") from e


def is_sret(name: str) -> bool:
    return name.split(".", 1)[0] in MODEL_CONFIGS


def default_img_size(model: nn.Module) -> int:
    """The model's own input resolution, from timm's pretrained config."""
    size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    return int(size[-1])


def build_model(contender: Contender, cfg: BenchConfig) -> tuple[nn.Module, int]:
    """A randomly initialised model on the device, and the resolution it will be fed."""
    kwargs: dict[str, Any] = {}
    if cfg.shuffle is not None and is_sret(contender.name):
        kwargs["shuffle"] = cfg.shuffle
    optional = {"drop_path_rate": cfg.drop_path}
    if cfg.img_size is not None:
        optional["img_size"] = cfg.img_size
    if is_sret(contender.name):
        check_memory(contender.name, {**kwargs, **optional}, cfg)
    model = _create(contender.name, kwargs, optional)
    if cfg.loops is not None and is_sret(contender.name):
        model.set_loops(cfg.loops)
    if contender.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model.to(cfg.device), cfg.img_size or default_img_size(model)


def check_memory(name: str, args: dict[str, Any], cfg: BenchConfig) -> None:
    """A SReT at a size the device cannot hold is a BenchError before it is built (its positional
    embedding and token layouts alone grow with the size; see sret.info.memory_estimate)."""
    model_cfg = model_config(name, **args)
    step = "training" if cfg.train else "running"
    what = f"{step} {name} at img_size {model_cfg.img_size} with batch {cfg.batch}"
    try:
        require_memory(
            memory_estimate(model_cfg, cfg.batch, cfg.train),
            torch.device(cfg.device),
            what,
            "lower --img-size or --batch",
        )
    except UserError as e:
        raise BenchError(str(e)) from None


def _create(name: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> nn.Module:
    """timm.create_model, leaving out the `optional` keywords that the architecture rejects (models
    without stochastic depth or a fixed input size, such as most CNNs, take neither)."""
    try:
        return _construct(name, {**kwargs, **optional})
    except TypeError as e:
        rejected = [key for key in optional if f"'{key}'" in str(e)]
        if not rejected:
            raise
        return _create(name, kwargs, {k: v for k, v in optional.items() if k != rejected[0]})


def _construct(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model; for an entry point written for older timm, which hands its keywords on to
    a model that rejects the `pretrained_cfg` timm now passes, the entry point itself."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        if "pretrained_cfg" not in str(e):
            raise
        return timm.models.model_entrypoint(name)(pretrained=False, **kwargs)


def autocast(cfg: BenchConfig) -> AbstractContextManager:
    if cfg.amp is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)


class AttentionTimer:
    """Host time spent attending during a step, forward and backward.

    timm's transformers attend through `F.scaled_dot_product_attention` and SReT through
    `sret.kernels.attend` (SReT's own kernel, or torch's); both are patched for the forward pass,
    so every model is timed alike: each outermost call is timed around, and its backward from the
    moment the output's gradient is ready to the moment its first input's (the query's, or the qkv
    projection's) gradient is (hooks the call registers). Exact only where kernels run synchronously
    with the host: eager CPU.
    """

    PATCHED = ((F, "scaled_dot_product_attention"), (kernels, "attend"))

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth = 0

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Time the calls of one step's forward pass (and their backward, whenever it runs)."""
        self.seconds = 0.0
        originals = [getattr(owner, name) for owner, name in self.PATCHED]
        for (owner, name), fn in zip(self.PATCHED, originals, strict=True):
            setattr(owner, name, self._timed(fn))
        try:
            yield
        finally:
            for (owner, name), fn in zip(self.PATCHED, originals, strict=True):
                setattr(owner, name, fn)

    def _timed(self, attend: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def timed(first: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if self._depth:  # inside another timed call
                return attend(first, *args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                out = attend(first, *args, **kwargs)
            finally:
                self._depth -= 1
            self.seconds += time.perf_counter() - start
            if out.requires_grad and first.requires_grad:
                self._time_backward(out, first)
            return out

        return timed

    def _time_backward(self, out: Tensor, first: Tensor) -> None:
        started: list[float] = []

        def done(_: Tensor) -> None:
            if started:
                self.seconds += time.perf_counter() - started.pop()

        out.register_hook(lambda _: started.append(time.perf_counter()))
        first.register_hook(done)


def model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level modules that hold parameters, by name, with module lists opened into
    their elements: SReT's stem, each stage and pooling, norm and head; a ViT's patch embedding,
    blocks, norm and head."""
    parts = []
    for name, child in model.named_children():
        members = child.named_children() if isinstance(child, nn.ModuleList) else [("", child)]
        for index, module in members:
            if next(module.parameters(), None) is not None:
                parts.append((f"{name}.{index}" if index else name, module))
    return parts


class PartTimer:
    """Host time of each top-level part of a model (:func:`model_parts`) during a step.

    Forward: module hooks around each call. Backward: from the moment the gradient of the part's output
    is ready to the moment the gradient of its input is; a part whose input needs no gradient (the
    stem, fed the images) ends when the step's backward does, so the step's :meth:`timing` must
    enclose its backward. Exact only where kernels run synchronously with the host: eager CPU.
    """

    def __init__(self, model: nn.Module) -> None:
        self.parts = model_parts(model)
        self.forward = dict.fromkeys((name for name, _ in self.parts), 0.0)
        self.backward = dict(self.forward)
        self._open: dict[str, float] = {}  # part -> time its backward started, input grad pending

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Time one step: its forward calls and the backward of whatever they produce."""
        for times in (self.forward, self.backward):
            times.update(dict.fromkeys(times, 0.0))
        self._open.clear()
        handles = []
        for name, module in self.parts:
            handles.append(module.register_forward_pre_hook(self._forward_started(name)))
            handles.append(module.register_forward_hook(self._forward_done(name)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            now = time.perf_counter()
            for name, started in self._open.items():  # inputs without gradient: ended with the backward
                self.backward[name] += now - started
            self._open.clear()

    def _forward_started(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            self.forward[name] -= time.perf_counter()

        return hook

    def _forward_done(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self.forward[name] += time.perf_counter()
            outputs = [t for t in _tensors(output) if t.requires_grad]
            if outputs:
                self._time_backward(name, outputs, [t for t in _tensors(args) if t.requires_grad])

        return hook

    def _time_backward(self, name: str, outputs: list[Tensor], inputs: list[Tensor]) -> None:
        """Start at the first output gradient (PiT's stages return tokens and a class token, of which
        only one may get a gradient); end once every input gradient there will be is computed."""

        def started(_: Tensor) -> None:
            self._open[name] = time.perf_counter()

        def done(_: Sequence[Tensor | None]) -> None:
            if name in self._open:
                self.backward[name] += time.perf_counter() - self._open.pop(name)

        torch.autograd.graph.register_multi_grad_hook(outputs, started, mode="any")
        if inputs:
            torch.autograd.graph.register_multi_grad_hook(inputs, done, mode="all")


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a module's arguments or output (nested tuples and lists)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


@dataclass
class Step:
    """One benchmark step (inference, or forward + cross-entropy backward + AdamW) and its optimizer."""

    run: Callable[[], None]
    optimizer: torch.optim.Optimizer | None = None
    attention: AttentionTimer | None = None  # with cfg.attention_time
    parts: PartTimer | None = None  # with cfg.part_time


def make_step(model: nn.Module, img_size: int, cfg: BenchConfig, plain: bool = False) -> Step:
    """Bind model, a random batch and (when training) an AdamW optimizer into a callable step; with
    `plain`, SReT's kernels are off inside it."""
    x = torch.randn(cfg.batch, 3, img_size, img_size, device=cfg.device)
    model.train(cfg.train)
    # static shapes: every model is timed at one fixed batch and size
    fn = torch.compile(model, fullgraph=True, dynamic=False) if cfg.compile else model
    timer = AttentionTimer() if cfg.attention_time else None
    parts = PartTimer(model) if cfg.part_time else None

    @contextmanager
    def timing() -> Iterator[None]:
        off = kernels.disabled() if plain else nullcontext()
        with timer.timing() if timer else nullcontext(), parts.timing() if parts else nullcontext(), off:
            yield

    if not cfg.train:

        def infer() -> None:
            with torch.inference_mode(), autocast(cfg), timing():
                fn(x)

        return Step(infer, attention=timer, parts=parts)

    y = torch.randint(0, getattr(model, "num_classes", 1000), (cfg.batch,), device=cfg.device)
    # torch's fused AdamW where it has one, for every model alike (the per-tensor path would otherwise
    # charge models with many small parameter tensors, such as SReT's residual scalars, per tensor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=has_fused_adam(cfg.device) or None)

    def train_step() -> None:
        with timing():
            with autocast(cfg):
                loss = F.cross_entropy(fn(x), y)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Step(train_step, optimizer, timer, parts)


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[], None], device: str) -> float:
    """Wall time of one step in seconds (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Matmul peak
# --------------------------------------------------------------------------------------------------
def matmul_probe(device: str, amp: str | None, size: int | None = None) -> tuple[Callable[[], None], int]:
    """One large square matmul (warmed up) and its FLOPs: the yardstick of achievable GFLOP/s.

    It runs the GEMM kernel SReT's linear layers use (:func:`sret.kernels.onednn.linear`: oneDNN's on CPUs
    where it applies, faster than torch's default there), and is timed inside every round-robin round,
    so it sees the same machine load as the models.
    """
    size = size or (2048 if torch.device(device).type == "cpu" else 8192)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        onednn.linear(a, b)

    run()
    return run, 2 * size**3


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def _proc_status_mib(field_name: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB, None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so import-time peaks do not hide a step's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _maxrss_mib() -> float:
    """Peak resident set size of this process since start (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# The memory children run with glibc mapping every block of 128 KiB or more on its own and unmapping
# it on free (a fixed threshold also turns off glibc's adaptive one), so peak RSS follows the tensors
# alive at the time. With the heap-reusing setting of `sret.runtime` (used for timing), RSS would also
# hold freed, fragmented blocks, which is the allocator's retention, not the model's memory.
EXACT_RSS_ENV = {
    "SRET_NO_MALLOC_TUNING": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def cpu_step_memory(run: Callable[[], None]) -> dict[str, float]:
    """Peak RSS of one call of `run` and what it added over the RSS right before (MiB)."""
    if _reset_peak_rss():
        before = _proc_status_mib("VmRSS") or 0.0
        run()
        peak = _proc_status_mib("VmHWM") or 0.0
    else:  # no resettable counter: the lifetime peak, from a high-water mark taken before the step
        before = _maxrss_mib()
        run()
        peak = _maxrss_mib()
    return {"activation_mem_mib": max(peak - before, 0.0), "peak_mem_mib": peak}


def materialise_training_state(step: Step) -> None:
    """Allocate gradient buffers and AdamW's moments before a measured step (one update on zero
    gradients, buffers kept), so what the step adds is activations and temporaries only: the memory
    gradient checkpointing can save, not the weight-sized state it cannot."""
    if step.optimizer is None:
        return
    for group in step.optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=False)


def measure_memory_here(contender: Contender, cfg: BenchConfig) -> dict[str, float]:
    """Activation and total peak memory (MiB) of one step, measured in the current process.

    Meant for a fresh process on CPU (peak RSS never goes down, so earlier work would hide the step)
    and for CUDA, where the allocator's peak counter is reset right before the step.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, img_size = build_model(contender, cfg)
    step = make_step(model, img_size, cfg, contender.plain)
    materialise_training_state(step)
    if torch.device(cfg.device).type == "cuda":
        synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        timed(step.run, cfg.device)
        peak = torch.cuda.max_memory_allocated()
        return {"activation_mem_mib": (peak - before) / 2**20, "peak_mem_mib": peak / 2**20}
    return cpu_step_memory(step.run)


def measure_memory(contender: Contender, cfg: BenchConfig) -> dict[str, float]:
    """Peak memory of one step; a child process per model on CPU so each starts from a clean slate."""
    if torch.device(cfg.device).type == "cuda":
        return measure_memory_here(contender, cfg)
    spec = json.dumps({"contender": asdict(contender), "config": asdict(cfg)})
    proc = subprocess.run(
        [sys.executable, "-m", "sret.bench", "--child", spec],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **EXACT_RSS_ENV},
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise RuntimeError(f"memory measurement of {contender.label} failed ({proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(spec: str) -> None:
    data = json.loads(spec)
    cfg = BenchConfig(**{**data["config"], "model_files": tuple(data["config"]["model_files"])})
    import_model_files(cfg.model_files)
    result = measure_memory_here(Contender(**data["contender"]), cfg)
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
def contenders(
    models: Sequence[str],
    references: Sequence[str] = REFERENCES,
    grad_checkpointing: bool = False,
    compare_checkpointing: bool = False,
    compare_plain: bool = False,
) -> list[Contender]:
    """Models in the order they are run; with `compare_checkpointing` each model runs both ways, with
    `compare_plain` each SReT model also on torch's kernels alone."""
    modes = (False, True) if compare_checkpointing else (grad_checkpointing,)
    out = []
    for name in models:
        for ckpt in modes:
            out.append(Contender(name, ckpt))
            if compare_plain and is_sret(name):
                out.append(Contender(name, ckpt, plain=True))
    out += [Contender(name, grad_checkpointing, reference=True) for name in references if name not in models]
    return out


@dataclass
class _Prepared:
    contender: Contender
    step: Step
    img_size: int
    params: int
    macs: int
    times: list[float] = field(default_factory=list)
    attention_times: list[float] = field(default_factory=list)
    part_macs: dict[str, int] = field(default_factory=dict)  # with part_time: MACs of one image per part
    part_times: list[tuple[dict[str, float], dict[str, float]]] = field(default_factory=list)  # fwd, bwd


def _prepare(contender: Contender, cfg: BenchConfig) -> _Prepared:
    """Build a contender and count its MACs, which runs it once on one image: a model that rejects the
    configuration (its input size, say) fails here, before any timing, with a BenchError naming it."""
    try:
        model, img_size = build_model(contender, cfg)
        macs = count_macs(model, img_size)  # before compiling; eager and compiled graphs do the same work
        part_macs = macs_by_module(model, img_size) if cfg.part_time else {}
    except (ValueError, AssertionError, RuntimeError) as e:
        size = f"img_size {cfg.img_size}" if cfg.img_size is not None else "its default img_size"
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise BenchError(f"{contender.label} cannot run at {size}: {reason}") from e
    params = sum(p.numel() for p in model.parameters())
    step = make_step(model, img_size, cfg, contender.plain)
    return _Prepared(contender, step, img_size, params, macs, part_macs=part_macs)


def run_benchmark(
    entries: Sequence[Contender],
    cfg: BenchConfig,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Time every contender round-robin, measure memory and the matmul peak; the JSON document."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import_model_files(cfg.model_files)
    paths = kernel_paths(cfg)
    log(paths["sret_kernels"])
    probe, probe_flop = matmul_probe(cfg.device, cfg.amp)
    prepared = []
    for entry in entries:
        log(f"building {entry.label}")
        prepared.append(_prepare(entry, cfg))
    probe_times = []
    for i in range(cfg.warmup + cfg.repeats):
        log(f"{'warm-up' if i < cfg.warmup else 'repeat'} {i + 1}/{cfg.warmup + cfg.repeats}")
        for p in prepared:
            elapsed = timed(p.step.run, cfg.device)
            if i >= cfg.warmup:
                p.times.append(elapsed)
                if p.step.attention is not None:
                    p.attention_times.append(p.step.attention.seconds)
                if p.step.parts is not None:
                    p.part_times.append((dict(p.step.parts.forward), dict(p.step.parts.backward)))
        probe_times += [timed(probe, cfg.device) for _ in range(2)]
    peak = probe_flop / statistics.median(probe_times) / 1e9
    log(f"matmul peak: {peak:.1f} GFLOP/s")
    rows = [_row(p, cfg, peak) for p in prepared]
    del prepared
    release_cpu_memory()  # the timed models' heap, kept for reuse, is not needed by the children
    if cfg.memory:
        for row, entry in zip(rows, entries, strict=True):
            log(f"memory of {entry.label}")
            for key, value in measure_memory(entry, cfg).items():
                setattr(row, key, value)
    _add_reference_ratios(rows)
    return {
        "device": device_info(cfg.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **paths,
        "config": asdict(cfg),
        "matmul_peak_gflops": peak,
        "train_mac_factor": mac_factor(cfg),
        "rows": [asdict(r) for r in rows],
        "comparisons": comparisons(rows),
    }


def kernel_paths(cfg: BenchConfig) -> dict[str, Any]:
    """What SReT's kernels run in this configuration, as they describe it (:func:`sret.kernels.summary`,
    :func:`sret.kernels.paths`), evaluated in the step's context (autocast, compiled or not)."""
    with autocast(cfg):
        line = kernels.summary(torch.empty(0, device=cfg.device), compiled=cfg.compile)
        rows = kernels.paths(compiled=cfg.compile)
    fields = ("entry", "runs", "when", "why")
    return {
        "sret_kernels": line,
        "sret_paths": [
            {k: getattr(path, k) for k in fields} | {"ready": ready, "per_call": path.takes is not always}
            for path, ready in rows
        ],
    }


def _row(p: _Prepared, cfg: BenchConfig, peak: float) -> BenchRow:
    latency = statistics.median(p.times)
    images_per_s = cfg.batch / latency
    gflops = p.macs * 2 * mac_factor(cfg) * images_per_s / 1e9
    return BenchRow(
        model=p.contender.name,
        label=p.contender.label,
        reference=p.contender.reference,
        mode="train" if cfg.train else "infer",
        grad_checkpointing=p.contender.grad_checkpointing,
        batch=cfg.batch,
        img_size=p.img_size,
        params_m=p.params / 1e6,
        gmacs=p.macs / 1e9,
        latency_ms=latency * 1e3,
        latency_min_ms=min(p.times) * 1e3,
        images_per_s=images_per_s,
        gflops=gflops,
        peak_fraction=gflops / peak,
        attention_ms=statistics.median(p.attention_times) * 1e3 if p.attention_times else None,
        parts=_parts_summary(p, cfg) if p.part_times else None,
        outside_parts_ms=_outside_parts_ms(p) if p.part_times else None,
        latencies_ms=[t * 1e3 for t in p.times],
    )


def _outside_parts_ms(p: _Prepared) -> float:
    """Median over repeats of the step's time outside its parts, each repeat against its own parts."""
    repeats = zip(p.times, p.part_times, strict=True)
    rest = [step - sum(fwd.values()) - sum(bwd.values()) for step, (fwd, bwd) in repeats]
    return statistics.median(rest) * 1e3


def _parts_summary(p: _Prepared, cfg: BenchConfig) -> list[dict[str, Any]]:
    """Per part: forward MACs of one image, median forward and backward ms per step, and GFLOP/s
    counted as for the whole model (x :func:`mac_factor`)."""
    out = []
    for name in p.part_times[0][0]:
        forward = statistics.median(fwd[name] for fwd, _ in p.part_times) * 1e3
        backward = statistics.median(bwd[name] for _, bwd in p.part_times) * 1e3 if cfg.train else None
        macs = p.part_macs.get(name, 0)
        elapsed = forward + (backward or 0.0)
        flop = macs * cfg.batch * 2 * mac_factor(cfg)
        gflops = flop / elapsed / 1e6 if macs and elapsed > 0 else None
        out.append(
            {"part": name, "macs": macs, "forward_ms": forward, "backward_ms": backward, "gflops": gflops}
        )
    return out


def _add_reference_ratios(rows: list[BenchRow]) -> None:
    reference = next((r for r in rows if r.reference), None)
    for row in rows:
        row.ratio_to_reference = row.gflops / reference.gflops if reference else None


def comparisons(rows: Sequence[BenchRow]) -> list[dict[str, Any]]:
    """The ratios the targets are stated in: vs the first reference, sliced vs unsliced, checkpointing."""
    by_label = {r.label: r for r in rows}
    reference = next((r for r in rows if r.reference), None)
    out: list[dict[str, Any]] = []

    def ratio(what: str, value: float) -> None:
        out.append({"what": what, "value": value})

    for row in rows:
        if reference is not None and not row.reference:
            ratio(f"{row.label} GFLOP/s / {reference.label} GFLOP/s", row.gflops / reference.gflops)
            if row.attention_ms and reference.attention_ms:
                what = f"{row.label} attention ms / {reference.label} attention ms"
                ratio(what, row.attention_ms / reference.attention_ms)
        for other in rows:  # the same model in another implementation (the authors' SReT_T for sret_t)
            if is_sret(row.model) and other.model != row.model and other.model.lower() == row.model.lower():
                ratio(f"{row.label} images/s / {other.label} images/s", row.images_per_s / other.images_per_s)
        plain = by_label.get(row.label.replace(row.model, f"{row.model} plain", 1))
        if plain is not None and plain is not row:
            ratio(f"{row.label} images/s / {plain.label} images/s", row.images_per_s / plain.images_per_s)
        twin = by_label.get(row.label.replace(row.model, f"{row.model}_noslice", 1))
        if twin is not None and twin is not row:
            ratio(f"{row.label} images/s / {twin.label} images/s", row.images_per_s / twin.images_per_s)
        ckpt = by_label.get(f"{row.label} +ckpt")
        if ckpt is not None:
            ratio(f"{row.label}: step time with / without checkpointing", ckpt.latency_ms / row.latency_ms)
            if row.activation_mem_mib and ckpt.activation_mem_mib:
                what = f"{row.label}: activation memory without / with checkpointing"
                ratio(what, row.activation_mem_mib / ckpt.activation_mem_mib)
    return out


def device_info(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} ({_cpu_model()})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(result: dict[str, Any]) -> None:
    """Rich table of the rows, then the target ratios."""
    from rich.console import Console
    from rich.table import Table

    cfg = result["config"]
    mode = "train step (fwd+bwd+AdamW)" if cfg["train"] else "inference"
    table = Table(title=f"{mode}, batch {cfg['batch']}, {result['device']}, {result['threads']} threads")
    columns = (
        "model",
        "res",
        "params M",
        "GMACs",
        "latency ms",
        "img/s",
        "GFLOP/s",
        "% peak",
        "x ref",
        "act. MiB",
        "peak MiB",
    )
    timed_attention = cfg.get("attention_time", False)
    if timed_attention:
        columns += ("attn ms",)
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        attention = (_fmt(r["attention_ms"], ".1f"),) if timed_attention else ()
        table.add_row(
            r["label"] + (" (ref)" if r["reference"] else ""),
            str(r["img_size"]),
            f"{r['params_m']:.2f}",
            f"{r['gmacs']:.3f}",
            f"{r['latency_ms']:.1f}",
            f"{r['images_per_s']:.1f}",
            f"{r['gflops']:.1f}",
            f"{r['peak_fraction']:.1%}",
            _fmt(r["ratio_to_reference"], ".2f"),
            _fmt(r["activation_mem_mib"], ".0f"),
            _fmt(r["peak_mem_mib"], ".0f"),
            *attention,
        )
    console = Console()
    if not console.is_terminal:  # piped into a file: do not squeeze the table into 80 columns
        console = Console(width=150, soft_wrap=True)  # nor break a note over two lines
    console.print(table)
    notes = [
        f"latency = median of {cfg['repeats']} round-robin repeats after {cfg['warmup']} warm-up; "
        f"% peak against a {result['matmul_peak_gflops']:.1f} GFLOP/s matmul timed in the same rounds"
    ]
    if cfg["train"]:
        notes.append(
            f"training GFLOP/s count {TRAIN_MAC_FACTOR}x the forward MACs (forward + backward); "
            f"drop-path rate {cfg['drop_path']} for every model"
        )
    if timed_attention:
        passes = "forward + backward" if cfg["train"] else "forward"
        notes.append(f"attn ms = median time per step inside attention ({passes})")
    notes.append(f"SReT: {result['sret_kernels']}; timm's models run torch's default kernels")
    if cfg["memory"]:
        total = "allocated (CUDA)" if cfg["device"].startswith("cuda") else "RSS of a fresh process"
        held = "weights, grads, AdamW state, batch" if cfg["train"] else "weights and batch"
        notes.append(f"act. = memory a step adds to {held}; peak = total {total}")
    for note in notes:
        console.print(f"[dim]{note}[/dim]")
    _print_paths(console, result["sret_paths"])
    if cfg.get("part_time"):
        _print_parts(console, result)
    for comparison in result["comparisons"]:
        console.print(f"{comparison['what']}: [bold]{comparison['value']:.2f}[/bold]")


def _print_paths(console: Any, paths: list[dict[str, Any]]) -> None:
    """SReT's paths (sret.kernels.PATHS): each entry point tries its rows in order and takes the first
    whose condition holds. "here" says whether the row can be taken in this run: no, yes, or per call
    (its condition also reads each call's inputs)."""
    from rich.table import Table

    table = Table(title="SReT's paths (sret.kernels.PATHS), tried in order per entry point")
    for col in ("entry point", "runs", "when", "here"):
        table.add_column(col)
    for row in paths:
        here = "per call" if row["ready"] and row["per_call"] else "yes" if row["ready"] else "no"
        table.add_row(row["entry"], row["runs"], row["when"], here)
    console.print(table)


def _print_parts(console: Any, result: dict[str, Any]) -> None:
    """Table of each model's time per part, its rate against the reference model's, and the rest of
    the step (loss, optimizer, glue between parts)."""
    from rich.table import Table

    train = result["config"]["train"]
    reference = next((r for r in result["rows"] if r["reference"]), None)
    table = Table(title="time per part (median ms per step)")
    columns = ("model", "part", "MMACs/img", "fwd ms", "bwd ms", "% of step", "GFLOP/s", "x ref")
    for col in columns if train else tuple(c for c in columns if c != "bwd ms"):
        table.add_column(col, justify="left" if col in ("model", "part") else "right")
    for r in result["rows"]:
        for i, part in enumerate(r["parts"] or ()):
            elapsed = part["forward_ms"] + (part["backward_ms"] or 0.0)
            ratio = part["gflops"] / reference["gflops"] if reference and part["gflops"] else None
            cells = [r["label"] if i == 0 else "", part["part"], f"{part['macs'] / 1e6:.1f}"]
            cells += [f"{part['forward_ms']:.1f}"] + ([_fmt(part["backward_ms"], ".1f")] if train else [])
            cells += [f"{elapsed / r['latency_ms']:.1%}", _fmt(part["gflops"], ".1f"), _fmt(ratio, ".2f")]
            table.add_row(*cells)
        blank = [""] * (2 if train else 1)
        rest = r["outside_parts_ms"] / r["latency_ms"]
        table.add_row("", "(rest)", "", *blank, f"{rest:.1%}", "", "", end_section=True)
    console.print(table)
    console.print(
        "[dim]x ref = the part's GFLOP/s / the reference model's over its whole step; (rest) = the step "
        "outside the parts (loss, optimizer, glue)[/dim]"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_main(sys.argv[2])
    else:
        sys.exit("usage: python -m sret.bench --child SPEC (internal); run `sret bench` instead")
