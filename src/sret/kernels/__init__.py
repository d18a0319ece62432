"""SReT's speed paths, behind one door.

The model (:mod:`sret.model`) is written in plain torch; where :func:`active` holds, each of its
modules hands its forward to one entry point here instead. Every entry point computes what the plain
module computes (its specification), to float rounding, in the forward pass and in every gradient,
non-finite values included; `tests/test_kernels.py` checks each against the plain module.

What the entry points do differently:

- oneDNN's GEMM and convolution kernels, with bias, GELU and ReLU in their epilogue
  (:mod:`sret.kernels.onednn`);
- SReT's own C kernels for attention within token groups and for the MLP's GELU backward
  (:mod:`sret.kernels.native`; x86 with AVX-512 or AVX2, else torch's kernels run);
- residual gains folded into the weights of the branch's last linear layer (weight-sized work instead
  of a pass over the activations), BatchNorm folded into the stem's convolutions in eval, hidden
  widths padded to a multiple of 8;
- autograd Functions that keep less for backward or back-propagate in fewer passes
  (:mod:`sret.kernels.autograd`).

Which of them runs, for which input and why, is one table in code (:data:`PATHS`, rows of
:mod:`sret.kernels.table`): :func:`active` chooses by its first rows (:data:`GATE`) whether a module
hands its work here at all (never under autocast: `--amp bf16` on a CPU runs torch's autocast of the
plain modules), and each entry point with more than one way chooses by its own rows.

The kernels are registered operators (`torch.ops.sret.*`, :mod:`sret.kernels.ops`) with fake
implementations and flop formulas, so FlopCounterMode, FakeTensorMode and `torch.func` transforms
run them as they run any op. Compilers, exporters and tracers get the plain modules, whose aten ops
they can fuse and serialise: a graph or an exported file never needs this package.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sret.kernels import native, onednn, ops
from sret.kernels.autograd import MLP, Linear, ScaledResidual, SlicedAttention, TokenPermutation
from sret.kernels.table import Path, choose, first

__all__ = [
    "PATHS",
    "active",
    "attend",
    "conv_bn_relu",
    "disabled",
    "fold_batchnorm",
    "linear",
    "mlp",
    "paths",
    "scaled_residual",
    "sliced_attention",
    "summary",
]

sret_ops = torch.ops.sret
_enabled = os.environ.get("SRET_KERNELS", "1") != "0"
_graph = False  # set while paths() and summary() describe a compiled step


def _in_graph() -> bool:
    return _graph or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def _dropout_in_training(x: Tensor, module: nn.Module | None) -> bool:
    return (
        module is not None
        and module.training
        and any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())
    )


def _batchnorm_under_autograd(x: Tensor, module: nn.Module | None) -> bool:
    return (
        module is not None
        and (module.training or torch.is_grad_enabled())
        and any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    )


PLAIN = "the plain modules"
GATE = (
    Path(
        "active",
        PLAIN,
        "switched off: `SRET_KERNELS=0`, or inside `kernels.disabled()`",
        "to compare with the plain modules, or to count their ops",
        ready=lambda: not _enabled,
    ),
    Path(
        "active",
        PLAIN,
        "compiled, exported or traced into a graph",
        "compilers and exporters fuse and serialise the plain modules' aten ops",
        ready=_in_graph,
    ),
    Path(
        "active",
        f"{PLAIN}, in torch's autocast",
        "under CPU autocast (`--amp bf16` on a CPU)",
        "the kernels are fp32 code",
        ready=lambda: torch.is_autocast_enabled("cpu"),
    ),
    Path(
        "active",
        PLAIN,
        "work not in fp32 on the CPU (a GPU, another dtype)",
        "the kernels are CPU fp32 code",
        takes=lambda x, module: x.device.type != "cpu" or x.dtype != torch.float32,
    ),
    Path(
        "active",
        PLAIN,
        "a module with dropout, in training",
        "the kernels drop nothing",
        takes=_dropout_in_training,
    ),
    Path(
        "active",
        PLAIN,
        "a module with BatchNorm, in training or under autograd",
        "the stem's kernel folds BatchNorm's running statistics into its convolutions and has no backward",
        takes=_batchnorm_under_autograd,
    ),
    Path("active", "the entry points (below)", "otherwise", "the rows below say what each runs"),
)


def active(x: Tensor, module: nn.Module | None = None) -> bool:
    """Whether `module` (or, without one, a function of the model) hands its work on `x` to its entry
    point here: the last row of :data:`GATE`."""
    return first(GATE, x, module) is GATE[-1]


@contextmanager
def disabled() -> Iterator[None]:
    """Run the plain modules inside the block (to compare against them, or to count their ops)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


def _autograd(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gained(weight: Tensor, bias: Tensor, gain: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weight and bias of `gain * F.linear(x, weight, bias)`."""
    if gain is None:
        return weight, bias
    return weight * gain, bias * gain


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)`."""
    if _autograd(x, weight, bias):
        return Linear.apply(x, weight, bias)
    return sret_ops.linear(x, weight, bias)


def mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gain: Tensor | None = None) -> Tensor:
    """`gain * F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)` (exact, erf GELU)."""
    w2, b2 = gained(w2, b2, gain)
    if _autograd(x, w1, b1, w2, b2):
        return MLP.apply(x, w1, b1, w2, b2)[0]
    return sret_ops.mlp(x, w1, b1, w2, b2, False)[0]


def scaled_residual(x: Tensor, branch: Tensor, skip: Tensor) -> Tensor:
    """`skip * x + branch` in one pass."""
    if _autograd(x, branch, skip):
        return ScaledResidual.apply(x, branch, skip)
    return torch.addcmul(branch, x, skip)


TAKE_TOKENS = (
    Path(
        "take_tokens",
        "`index_select`, back-propagated by the inverse gather (`TokenPermutation`)",
        "a permutation (groups without padding), under autograd",
        "autograd's own backward, an accumulating `index_put`, took about 3x as long",
        TokenPermutation.apply,
        takes=lambda x, index, inverse: inverse is not None and _autograd(x),
    ),
    Path(
        "take_tokens", "`index_select`", "otherwise", "torch's", lambda x, index, _: x.index_select(1, index)
    ),
)


def take_tokens(x: Tensor, index: Tensor, inverse: Tensor | None) -> Tensor:
    """`x[:, index]`; `inverse`, when given, is the inverse permutation of `index`."""
    return choose(TAKE_TOKENS, x, index, inverse)


def _attend_native(qkv: Tensor, groups: int, heads: int, scale: float, key_mask: None) -> Tensor:
    if _autograd(qkv):
        return SlicedAttention.apply(qkv, groups, heads, scale)[0]
    return sret_ops.sliced_attention(qkv, groups, heads, scale, False)[0]


def _attend_sdpa(qkv: Tensor, groups: int, heads: int, scale: float, key_mask: Tensor | None) -> Tensor:
    B, N, width = qkv.shape
    n, dim = N // groups, width // 3
    q, k, v = qkv.reshape(B * groups, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if key_mask is None else key_mask.repeat(B, 1, 1)[:, None]
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return x.transpose(1, 2).reshape(B, N, dim)


def _native_takes(qkv: Tensor, groups: int, heads: int, scale: float, key_mask: Tensor | None) -> bool:
    return key_mask is None and native.applies(qkv, qkv.shape[1] // groups, qkv.shape[2] // 3 // heads)


ATTEND = (
    Path(
        "attend",
        "SReT's C kernel (`csrc/sliced_attention.c`), built for AVX-512 or AVX2",
        f"groups without padding, of at most {native.MAX_TOKENS} tokens, heads at most "
        f"{native.MAX_HEAD_DIM} wide, contiguous fp32 qkv; the C kernels built (x86 with AVX2, a C "
        "compiler, `SRET_NATIVE` not 0)",
        "0.46-0.64x the time of torch's path at sret_t's shapes; sret_t's training step 1814 -> 1609 ms",
        _attend_native,
        takes=_native_takes,
        ready=native.built,
    ),
    Path(
        "attend",
        "`F.scaled_dot_product_attention`, heads split around it",
        "otherwise",
        "torch's",
        _attend_sdpa,
    ),
)


def attend(qkv: Tensor, groups: int, heads: int, scale: float, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention within `groups` contiguous token groups of a qkv projection's output.

    qkv: (B, groups * n, 3 * C); key_mask: None, or (groups, 1, n), True where a key may be attended.
    Returns (B, groups * n, C), by the first of :data:`ATTEND` that takes it."""
    return choose(ATTEND, qkv, groups, heads, scale, key_mask)


def sliced_attention(
    x: Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    heads: int,
    scale: float,
    layout: tuple[int, int, Tensor | None, Tensor | None, Tensor | None],
    gain: Tensor | None = None,
) -> Tensor:
    """`gain * proj(attention within token groups of qkv(x))`, without dropout.

    `layout` is (groups, group size, gather, scatter, key mask) as :class:`sret.model.TokenGroups`
    holds it: tokens are gathered into `groups` slots of `size` (permuted, and padded where the groups
    do not divide the tokens), attend within their slot and are scattered back."""
    groups, _, gather, scatter, key_mask = layout
    permutation = key_mask is None  # no padding: gather and scatter are mutual inverses
    if gather is not None:
        x = take_tokens(x, gather, scatter if permutation else None)
    x = attend(linear(x, qkv.weight, qkv.bias), groups, heads, scale, key_mask)
    if scatter is not None:
        x = take_tokens(x, scatter, gather if permutation else None)
    return linear(x, *gained(proj.weight, proj.bias, gain))


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of `bn(conv(x))` as one convolution, using the running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + bn.bias


def conv_bn_relu(x: Tensor, layers: Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> Tensor:
    """`relu(bn(conv(x)))` for each (conv, bn) in turn, in eval mode (BatchNorm's running
    statistics), outside autograd. The layers must share one stride and padding."""
    (stride, _), (padding, _) = layers[0][0].stride, layers[0][0].padding
    if any(conv.stride != (stride, stride) or conv.padding != (padding, padding) for conv, _ in layers):
        raise ValueError("conv_bn_relu's layers must share one square stride and padding")
    weights, biases = zip(*(fold_batchnorm(conv, bn) for conv, bn in layers), strict=True)
    return sret_ops.conv_bn_relu(x, list(weights), list(biases), stride, padding)


# Every choice, each a tuple of rows tried in order; the gate first.
CHOICES = (
    GATE,
    ATTEND,
    TAKE_TOKENS,
    onednn.LINEAR,
    onednn.WEIGHT_GRAD,
    onednn.GELU_BACKWARD,
    onednn.CONV_RELU,
    ops.CONV_BN_RELU,
)
PATHS = tuple(path for rows in CHOICES for path in rows)


@contextmanager
def _described(compiled: bool) -> Iterator[None]:
    """Inside the block the rows see the context of a compiled step if `compiled`."""
    global _graph
    was, _graph = _graph, compiled
    try:
        yield
    finally:
        _graph = was


def paths(compiled: bool = False) -> list[tuple[Path, bool]]:
    """Every row of :data:`PATHS` and whether its `ready` part holds here, in the caller's context
    (autocast) and, if `compiled`, in a compiled step's."""
    with _described(compiled):
        return [(path, path.ready()) for path in PATHS]


def summary(x: Tensor, compiled: bool = False) -> str:
    """One line on what runs for work like `x` in the caller's context: the gate's row and, where the
    entry points run, whose first row (their fast path) is ready here."""
    with _described(compiled):
        gate = first(GATE, x, None)
        ready = {rows[0].entry: rows[0].ready() for rows in CHOICES[1:]}
    if gate is not GATE[-1]:
        return f"sret.kernels: {gate.runs} - {gate.when}"
    build = f"built for {native.isa()}" if native.built() else "not built"
    fast = ", ".join(entry for entry, r in ready.items() if r)
    rest = ", ".join(entry for entry, r in ready.items() if not r)
    return f"sret.kernels: on, C kernels {build}; first paths ready for {fast}" + (
        f"; torch's for {rest}" if rest else ""
    )
