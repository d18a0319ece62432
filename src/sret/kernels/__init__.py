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
- under CPU autocast to bf16, where oneDNN has bf16 kernels, the same entry points in bf16
  (:func:`precision`): products in oneDNN's bf16 kernels with GELU in their epilogue, gains folded
  into the fp32 weights before they are cast, and attention in the C kernel, in fp32 on the bf16
  values, which outruns torch's bf16 kernel at SReT's shapes;
- under that bf16 autocast, LayerNorm in SReT's C kernel, written straight in bf16 from the fp32
  residual stream and back-propagated from the bf16 gradient, a bf16 branch added to that stream in
  one pass (:mod:`sret.kernels.native`), and the pooling's depthwise convolutions kept in fp32
  (:func:`depthwise_conv`);
- residual gains folded into the weights of the branch's last linear layer (weight-sized work instead
  of a pass over the activations), BatchNorm folded into the stem's convolutions in eval, hidden
  widths padded to a multiple of 8;
- autograd Functions that keep less for backward or back-propagate in fewer passes
  (:mod:`sret.kernels.autograd`).

Which of them runs, for which input and why, is one table in code (:data:`PATHS`, rows of
:mod:`sret.kernels.table`): :func:`active` chooses by its first rows (:data:`GATE`) whether a module
hands its work here at all (under autocast only to bf16 where oneDNN has bf16 kernels; elsewhere
`--amp bf16` on a CPU runs torch's autocast of the plain modules), and each entry point with more than
one way chooses by its own rows.

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
from sret.kernels.autograd import (
    MLP,
    LayerNorm,
    Linear,
    ScaledResidual,
    SlicedAttention,
    TokenPermutation,
)
from sret.kernels.table import Path, choose, first

__all__ = [
    "PATHS",
    "active",
    "attend",
    "conv_bn_relu",
    "depthwise_conv",
    "disabled",
    "fold_batchnorm",
    "layer_norm",
    "linear",
    "mlp",
    "paths",
    "precision",
    "scaled_residual",
    "sliced_attention",
    "summary",
]

sret_ops = torch.ops.sret
_enabled = os.environ.get("SRET_KERNELS", "1") != "0"
_graph = False  # set while paths() and summary() describe a compiled step


def _in_graph() -> bool:
    return _graph or torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


def precision() -> torch.dtype | None:
    """The dtype the fast paths compute their products in: fp32, or bf16 under CPU autocast to bf16
    (the residual stream stays in fp32 there, as autocast keeps it) where oneDNN has bf16 kernels;
    None under autocast to another dtype, or to bf16 on a CPU without them (one held to AVX2, where
    the fast paths were slower than torch's own), which the plain modules serve."""
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and onednn.ONEDNN_BF16
    return torch.bfloat16 if bf16 else None


def _bf16() -> bool:
    return precision() == torch.bfloat16


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
BF16_AB = (
    "all bf16 paths against none (`sret bench sret_t --batch 32 --amp bf16`, medians of 3 interleaved "
    "rounds, AMD EPYC family 25 with avx512_bf16, 2026-12-07): bf16 inference step 358 vs 635 ms, "
    "training 1412 vs 2224 ms"
)
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
        "under CPU autocast, but not to bf16 where oneDNN has bf16 kernels (`--amp bf16` on a CPU held "
        "to AVX2, or without AVX-512)",
        "the kernels are fp32 code, and bf16 code for oneDNN's bf16 kernels; without those the fast "
        "paths were slower than torch's own",
        ready=lambda: precision() is None,
    ),
    Path(
        "active",
        PLAIN,
        "work not on the CPU in fp32, or in bf16 under bf16 autocast with oneDNN's bf16 kernels (a GPU, "
        "another dtype)",
        "the kernels are CPU fp32 and bf16 code",
        takes=lambda x, module: x.device.type != "cpu" or x.dtype not in (torch.float32, precision()),
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
    Path(
        "active",
        "the entry points (below), in bf16: they cast a product's operands to bf16 as autocast would "
        "(gains folded into the fp32 weights first; the residual stream stays fp32) for oneDNN's bf16 "
        "kernels, GELU in the epilogue",
        "under CPU autocast to bf16 where oneDNN has bf16 kernels (`onednn.ONEDNN_BF16`: AVX-512)",
        BF16_AB,
        ready=_bf16,
    ),
    Path("active", "the entry points (below)", "otherwise", "the rows below say what each runs"),
)
ENTRY = GATE[-2:]  # the rows under which the entry points run


def active(x: Tensor, module: nn.Module | None = None) -> bool:
    """Whether `module` (or, without one, a function of the model) hands its work on `x` to its entry
    point here: one of the last two rows of :data:`GATE`."""
    return first(GATE, x, module) in ENTRY


def lowered(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors in :func:`precision`'s dtype (a differentiable cast, so gradients reach the fp32
    parameters in fp32): what autocast does to a product's operands, done before the kernels see them."""
    dtype = precision()
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


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
    x, weight, bias = lowered(x, weight, bias)
    if _autograd(x, weight, bias):
        return Linear.apply(x, weight, bias)
    return sret_ops.linear(x, weight, bias)


def mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gain: Tensor | None = None) -> Tensor:
    """`gain * F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)` (exact, erf GELU)."""
    w2, b2 = gained(w2, b2, gain)
    x, w1, b1, w2, b2 = lowered(x, w1, b1, w2, b2)
    if _autograd(x, w1, b1, w2, b2):
        return MLP.apply(x, w1, b1, w2, b2)[0]
    return sret_ops.mlp(x, w1, b1, w2, b2, False)[0]


def scaled_residual(x: Tensor, branch: Tensor, skip: Tensor) -> Tensor:
    """`skip * x + branch` in one pass (:data:`sret.kernels.ops.RESIDUAL`)."""
    if _autograd(x, branch, skip):
        return ScaledResidual.apply(x, branch, skip)
    return ops.scaled_residual(x, branch, skip)


def _layer_norm_native(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    if _autograd(x, weight, bias):
        return LayerNorm.apply(x, weight, bias, eps)[0]
    return sret_ops.layer_norm(x, weight, bias, eps, False)[0]


def _layer_norm_native_takes(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> bool:
    params = (weight, bias)
    return native.passes_apply(x) and all(p is not None and p.dtype == torch.float32 for p in params)


LAYER_NORM = (
    Path(
        "layer_norm",
        "SReT's C kernel (`csrc/norm.c`): fp32 in, bf16 out in one pass (torch: LayerNorm, then the next "
        "product's cast); back-propagated from the bf16 gradient",
        "under bf16 autocast with oneDNN's bf16 kernels; contiguous fp32 x, fp32 weight and bias; the C "
        "kernels built",
        f"part of the bf16 paths ({BF16_AB})",
        _layer_norm_native,
        takes=_layer_norm_native_takes,
        ready=lambda: _bf16() and native.built(),
    ),
    Path(
        "layer_norm",
        "`F.layer_norm`",
        "otherwise",
        "torch's",
        lambda x, weight, bias, eps: F.layer_norm(x, x.shape[-1:], weight, bias, eps),
    ),
)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """`F.layer_norm` over the last dim; under bf16 autocast written in bf16, the dtype the product that
    follows takes it in (:data:`LAYER_NORM`)."""
    return choose(LAYER_NORM, x, weight, bias, eps)


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
        f"{native.MAX_HEAD_DIM} wide, contiguous fp32 qkv (bf16 under bf16 autocast with oneDNN's bf16 "
        "kernels, attended in fp32, read and written in bf16); the C kernels built (x86 with AVX2, a C "
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
    Returns (B, groups * n, C), in the dtype of `qkv`, by the first of :data:`ATTEND` that takes it."""
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


def _conv_fp32(x: Tensor, conv: nn.Conv2d) -> Tensor:
    with torch.autocast("cpu", enabled=False):
        return conv(x.float())


DEPTHWISE_CONV = (
    Path(
        "depthwise_conv",
        "the convolution in fp32, autocast off",
        "under bf16 autocast with oneDNN's bf16 kernels",
        "a negligible share of the MACs, and oneDNN's bf16 depthwise kernels took 2-3x the time of its "
        f"fp32 ones, forward and backward (benchmarks/README.md); part of the bf16 paths ({BF16_AB})",
        _conv_fp32,
        ready=_bf16,
    ),
    Path("depthwise_conv", "`conv(x)`", "otherwise", "torch's", lambda x, conv: conv(x)),
)


def depthwise_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """`conv(x)` for a depthwise convolution (the pooling between stages), by :data:`DEPTHWISE_CONV`."""
    return choose(DEPTHWISE_CONV, x, conv)


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
    x, *weights = lowered(x, *weights)
    return sret_ops.conv_bn_relu(x, list(weights), list(lowered(*biases)), stride, padding)


# Every choice, each a tuple of rows tried in order; the gate first.
CHOICES = (
    GATE,
    ATTEND,
    TAKE_TOKENS,
    LAYER_NORM,
    ops.RESIDUAL,
    ops.LAYER_NORM_BACKWARD,
    DEPTHWISE_CONV,
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
    if gate not in ENTRY:
        return f"sret.kernels: {gate.runs} - {gate.when}"
    build = f"built for {native.isa()}" if native.built() else "not built"
    fast = ", ".join(entry for entry, r in ready.items() if r)
    rest = ", ".join(entry for entry, r in ready.items() if not r)
    bf16 = " in bf16 under autocast (oneDNN's bf16 kernels)" if gate is GATE[-2] else ""
    return f"sret.kernels: on{bf16}, C kernels {build}; first paths ready for {fast}" + (
        f"; torch's for {rest}" if rest else ""
    )
