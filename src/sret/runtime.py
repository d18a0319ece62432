"""Process-level settings that decide CPU speed more than any kernel does.

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks above its mmap threshold
(128 KiB to 32 MiB, adaptive) with fresh mmap'd pages and hands them back on free, so every large
activation of every layer is page-faulted and zeroed by the kernel again. A SReT at 224 px allocates
hundreds of such blocks per step, and the page faults alone cost more time than the layers' math
(the measurement is in benchmarks/README.md). Raising the thresholds keeps freed blocks in
the heap for reuse, which is what jemalloc or tcmalloc would give with LD_PRELOAD.

Also here, shared by training and the benchmark: which devices have torch's fused optimizer kernels;
for the processes `sret ablate` starts, dying with their parent; and how much memory a device has, so
that a size no machine of that kind can hold is refused before work starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import signal
import sys
from pathlib import Path

import torch

from sret.io import UserError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: blocks below this are reused from the heap instead of re-mapped


def tune_cpu_allocator() -> bool:
    """Make glibc keep and reuse large blocks (this process and, via the environment, its children).

    Returns True when the setting was applied (glibc on Linux), False elsewhere. Safe to call twice.
    Set SRET_NO_MALLOC_TUNING=1 to leave the allocator alone.
    """
    if os.environ.get("SRET_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    for name, value in (("MALLOC_MMAP_THRESHOLD_", _THRESHOLD), ("MALLOC_TRIM_THRESHOLD_", _THRESHOLD)):
        os.environ.setdefault(name, str(value))  # read by glibc at start-up of child processes
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    return bool(ok)


def release_cpu_memory() -> None:
    """Hand the heap that `tune_cpu_allocator` keeps for reuse back to the system (glibc only).

    For a moment when a large step is over and the memory is better used elsewhere, e.g. before
    starting a child process that needs it.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(path).malloc_trim(0)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process (as `preexec_fn`): be killed when the parent dies, however it dies (Linux).

    A grid of training processes must not outlive a SIGKILLed `sret ablate`: the rerun would train the
    same cell twice at once. Elsewhere this does nothing, and a killed parent leaves its children.
    """
    path = ctypes.util.find_library("c")
    if path is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(path).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def has_fused_adam(device: torch.device | str) -> bool:
    """Whether torch's fused Adam(W) kernels run on `device` (CPU and CUDA).

    One fused kernel over all parameters instead of a launch (CUDA) or a pass (CPU) per tensor and
    per update term: SReT has about twice deit_tiny's parameter tensors (a residual scalar pair per
    block, an NLL per application); the fused step takes a fraction of the default (foreach) one's time
    (benchmarks/README.md).
    """
    return torch.device(device).type in ("cpu", "cuda")


def cpu_description() -> str:
    """The CPU as results should record it: the model name, family and model, and the instruction sets
    that change which kernels run and how they round (the same model name spans several of them)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor says it all
    except OSError:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if name in flags]
    family = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"
    return f"{fields.get('model name', 'unknown CPU')} ({family}; {' '.join(isa) or 'no AVX2'})"


def memory_capacity(device: torch.device) -> int | None:
    """Bytes of memory on `device`: a GPU's own, else the machine's RAM (or the cgroup's limit of this
    process, where lower); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # "max" when unlimited
        if limit.isdigit():
            total = min(total, int(limit))
    return total


def require_memory(needed: int, device: torch.device, what: str, advice: str) -> None:
    """A UserError when `needed` bytes (an estimate that errs low) exceed what `device` has: the sizes
    are impossible there, and finding out by running would exhaust the machine first."""
    capacity = memory_capacity(device)
    if capacity is not None and needed > capacity:
        where = "this machine's memory" if device.type == "cpu" else f"the memory of {device}"
        raise UserError(f"{what} needs at least {gib(needed)}, more than {where} ({gib(capacity)}): {advice}")


def gib(size: int) -> str:
    """Bytes in GiB, readable at any size."""
    value = size / 2**30
    return f"{value:.3g} GiB" if value < 100 else f"{value:,.0f} GiB"
