"""SReT's own CPU kernels (`csrc/`), compiled on first use: attention, an MLP's GELU backward and
LayerNorm (and, under bf16 autocast, the residual).

SReT attends within short token groups (49-392 tokens) with 32-to-48-wide heads. There torch's
fused CPU kernel spends more time around its small GEMM calls than in them, and the unfused path
pays full passes for the head split and merge copies. The C kernel attends one (group, head) pair at
a time from the qkv projection's output and writes the result, or the qkv gradient, straight into
the layout of the next projection, in a fraction of the time of torch's path at the zoo's shapes,
forward and backward (`benchmarks/README.md`).

Under bf16 autocast `csrc/norm.c` writes LayerNorm's bf16 output from the fp32 residual stream in
one pass (torch: LayerNorm, then a cast), back-propagates
from the bf16 gradient without widening it, and adds a bf16 branch to that stream in one pass.

The MLP's backward (:func:`sret.kernels.mlp`) needs the GELU recomputed and the gradient through
it; one pass of `csrc/gelu.c` gives both, in fp32 or, under bf16 autocast, on bf16 tensors (computed
in fp32).

They are built for the instruction set torch runs at, AVX-512 or AVX2 with FMA (one source,
`csrc/vector_math.h`), and need, the first time, a C compiler (`$CC`, else `cc` or `gcc`); the
library is cached per source and flags in `$SRET_CACHE_DIR` (default `~/.cache/sret`). Without
either, or with `SRET_NATIVE=0`, the model runs torch's kernels, with the same results to float
rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name for name in ("sliced_attention.c", "gelu.c", "norm.c")
)
HEADERS = (Path(__file__).with_name("csrc") / "vector_math.h",)
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp")
# The instruction set the kernels are built for (csrc/vector_math.h), per torch's CPU capability.
ISA_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"),
    "AVX2": ("-mavx2", "-mfma"),
}
MAX_HEAD_DIM = 48  # three AVX-512 (six AVX2) vectors per row: the kernel's register blocking
MAX_TOKENS = 1024  # per group: the backward keeps two n x n score buffers per thread (8 MiB at 1024)


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$SRET_CACHE_DIR`, else `sret` under the user's cache dir."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sret"
    return Path(os.environ.get("SRET_CACHE_DIR") or default)


def isa() -> str | None:
    """What the kernels are built for: the instruction set torch itself runs at ("AVX512" or "AVX2";
    `ATEN_CPU_CAPABILITY` lowers it), or None where torch runs at neither (another architecture, an
    older x86)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return "AVX512"
    return "AVX2" if capability == "AVX2" else None


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Build the shared library into `target` atomically (concurrent processes may race to it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, *map(str, SOURCES), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built for :func:`isa`, or None where they cannot run here (why: logged,
    at debug level for a CPU without AVX2, else as a warning)."""
    if os.environ.get("SRET_NATIVE", "1") == "0":
        return None
    if isa() is None:
        _logger.debug("native kernels off: torch runs at neither AVX-512 nor AVX2 here")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _logger.warning("native kernels off: no C compiler (set CC); using torch's kernels")
        return None
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    flags = (*FLAGS, *ISA_FLAGS[isa()])
    key = hashlib.sha256(code + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        if not target.exists():
            _compile(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _logger.warning(
            "native kernels off (%s); using torch's kernels (SRET_CACHE_DIR sets where they are built)", e
        )
        return None
    p, i, f, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    signatures = {
        "attention_forward": [p, p, p, i, i, i, i, f, i],
        "attention_backward": [p, p, p, p, p, i, i, i, i, f, i],
        "gelu_backward": [p, p, p, n, i],
    }
    for name, argtypes in signatures.items():
        for storage in ("", "_bf16"):  # each kernel comes for fp32 and for bf16 tensors
            fn = getattr(lib, f"sret_{name}{storage}")
            fn.argtypes, fn.restype = argtypes, i
    single = {  # fp32 in, bf16 in or out (the passes between a bf16 block's products), or fp32 only
        "layer_norm_bf16": [p, p, p, p, p, p, n, i, f, i],
        "scaled_residual_bf16": [p, p, f, p, n, i],
        "layer_norm_backward_bf16": [p, p, p, p, p, p, p, p, n, i, i],
    }
    for name, argtypes in single.items():
        fn = getattr(lib, f"sret_{name}")
        fn.argtypes, fn.restype = argtypes, i
    return lib


def built() -> bool:
    """Whether the kernels are built and loaded in this process (:func:`library`)."""
    return library() is not None


def _kernel(name: str, dtype: torch.dtype) -> Callable[..., int]:
    """The library's kernel `name` for tensors of `dtype` (fp32, or bf16 computed in fp32)."""
    return getattr(library(), f"sret_{name}_bf16" if dtype == torch.bfloat16 else f"sret_{name}")


def applies(qkv: Tensor, tokens: int, head_dim: int) -> bool:
    """Whether the attention kernel takes this qkv projection output (a contiguous CPU tensor, fp32 or
    bf16, groups of `tokens`, heads `head_dim` wide), forward and backward, once :func:`built`."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype in (torch.float32, torch.bfloat16)
        and qkv.is_contiguous()
        and head_dim <= MAX_HEAD_DIM
        and tokens <= MAX_TOKENS
    )


def attention_forward(
    qkv: Tensor, groups: int, heads: int, scale: float, keep_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention within `groups` contiguous token groups, and (if `keep_lse`) the log-sum-exp
    of every query's scores, which the backward needs.

    qkv: (B, groups * n, 3 * C), the qkv projection's output (q, k, v, each `heads` heads of C / heads
    channels), contiguous fp32, or bf16 (attended in fp32); returns (B, groups * n, C) in its dtype,
    heads side by side, as the output projection takes them. Check :func:`built` and :func:`applies`
    first."""
    batch, tokens, width = qkv.shape
    n, dim = tokens // groups, width // 3
    out = qkv.new_empty(batch, tokens, dim)
    lse = qkv.new_empty(batch * groups * heads, n, dtype=torch.float32) if keep_lse else None
    status = _kernel("attention_forward", qkv.dtype)(
        qkv.data_ptr(), out.data_ptr(), lse.data_ptr() if keep_lse else None,
        batch * groups, heads, n, dim // heads, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("native attention could not allocate its scratch buffers")
    return out, lse


def attention_backward(
    grad: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, groups: int, heads: int, scale: float
) -> Tensor:
    """The gradient of :func:`attention_forward`'s output with respect to `qkv`, from the output and
    log-sum-exp it kept (the scores are recomputed, never stored). A bf16 `qkv` (with its bf16 output)
    gives a bf16 gradient, computed in fp32."""
    grad = grad.to(qkv.dtype).contiguous()
    grad_qkv = torch.empty_like(qkv)
    batch, tokens, width = qkv.shape
    status = _kernel("attention_backward", qkv.dtype)(
        qkv.data_ptr(), out.data_ptr(), grad.data_ptr(), lse.data_ptr(), grad_qkv.data_ptr(),
        batch * groups, heads, tokens // groups, width // 3 // heads, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("native attention could not allocate its scratch buffers")
    return grad_qkv


def gelu_backward_applies(h: Tensor, grad: Tensor) -> bool:
    """Whether :func:`gelu_backward` takes these tensors (contiguous CPU, one shape, both fp32 or both
    bf16), once :func:`built`."""
    return (
        h.shape == grad.shape
        and h.dtype == grad.dtype in (torch.float32, torch.bfloat16)
        and all(t.device.type == "cpu" and t.is_contiguous() for t in (h, grad))
    )


def gelu_backward(h: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """`gelu(h)` and `grad * gelu'(h)` in one pass. The gradient is computed in place: `grad` is
    overwritten and returned. bf16 tensors are computed in fp32 and rounded back."""
    hidden = torch.empty_like(h)
    kernel = _kernel("gelu_backward", h.dtype)
    kernel(h.data_ptr(), grad.data_ptr(), hidden.data_ptr(), h.numel(), torch.get_num_threads())
    return hidden, grad


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, keep_stats: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`F.layer_norm(x, (C,), weight, bias, eps)` of a contiguous fp32 `x` (fp32 weight and bias of C),
    computed in fp32 and written in bf16 for the product that follows under autocast; with
    `keep_stats`, also each row's mean and reciprocal standard deviation (fp32, shaped
    `x.shape[:-1] + (1,)`, as torch's LayerNorm backward takes them)."""
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    y = torch.empty_like(x, dtype=torch.bfloat16)
    mean = x.new_empty(*x.shape[:-1], 1) if keep_stats else None
    rstd = x.new_empty(*x.shape[:-1], 1) if keep_stats else None
    library().sret_layer_norm_bf16(
        x.data_ptr(), weight.contiguous().data_ptr(), bias.contiguous().data_ptr(), y.data_ptr(),
        mean.data_ptr() if keep_stats else None, rstd.data_ptr() if keep_stats else None,
        rows, cols, eps, torch.get_num_threads(),
    )  # fmt: skip
    return y, mean, rstd


def layer_norm_backward_bf16(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`layer_norm` in bf16 for x, weight and bias (fp32) from its output's
    contiguous bf16 gradient (as the next product gives it), the fp32 input and the row statistics."""
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    dx, dw, db = torch.empty_like(x), x.new_empty(cols), x.new_empty(cols)
    status = library().sret_layer_norm_backward_bf16(
        grad.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), weight.contiguous().data_ptr(),
        dx.data_ptr(), dw.data_ptr(), db.data_ptr(), rows, cols, torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise MemoryError("native LayerNorm backward could not allocate its buffers")
    return dx, dw, db


def scaled_residual_bf16(x: Tensor, branch: Tensor, skip: float) -> Tensor:
    """`skip * x + branch` in fp32, of a contiguous fp32 `x` and a bf16 `branch` of its shape."""
    out = torch.empty_like(x)
    library().sret_scaled_residual_bf16(
        x.data_ptr(), branch.data_ptr(), skip, out.data_ptr(), x.numel(), torch.get_num_threads()
    )
    return out


def passes_apply(x: Tensor, other: Tensor | None = None) -> bool:
    """Whether :func:`layer_norm` (`other`: None) or :func:`scaled_residual_bf16` (`other`: the bf16
    branch) take these tensors: contiguous fp32 `x` on the CPU, `other` bf16 of its shape; once
    :func:`built`."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and (other is None or other.dtype == torch.bfloat16)
        and (other is None or (other.shape == x.shape and other.is_contiguous()))
    )
