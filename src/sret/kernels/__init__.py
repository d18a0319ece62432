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

They run in fp32 only: under autocast (`--amp bf16` on a CPU) the plain modules run, as torch's
autocast casts them.

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

from sret.kernels import native
from sret.kernels.autograd import MLP, Linear, ScaledResidual, SlicedAttention, TokenPermutation

__all__ = [
    "active",
    "attend",
    "conv_bn_relu",
    "disabled",
    "fold_batchnorm",
    "linear",
    "mlp",
    "scaled_residual",
    "sliced_attention",
]

sret_ops = torch.ops.sret
_enabled = os.environ.get("SRET_KERNELS", "1") != "0"


def active(x: Tensor) -> bool:
    """The one predicate of the fast paths: eager work on the CPU in fp32 outside autocast, not being
    compiled, exported or traced into a graph, and not switched off (`SRET_KERNELS=0`,
    :func:`disabled`)."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())
    )


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


def take_tokens(x: Tensor, index: Tensor, inverse: Tensor | None) -> Tensor:
    """`x[:, index]`; `inverse`, when given, is the inverse permutation of `index`."""
    if inverse is not None and _autograd(x):
        return TokenPermutation.apply(x, index, inverse)
    return x.index_select(1, index)


def attend(qkv: Tensor, groups: int, heads: int, scale: float, key_mask: Tensor | None = None) -> Tensor:
    """Multi-head attention within `groups` contiguous token groups of a qkv projection's output.

    qkv: (B, groups * n, 3 * C); key_mask: None, or (groups, 1, n), True where a key may be attended.
    Returns (B, groups * n, C). Runs SReT's C kernel where it applies (unmasked); else heads are split
    and attend in `F.scaled_dot_product_attention`.
    """
    B, N, width = qkv.shape
    n, dim = N // groups, width // 3
    if key_mask is None and native.applies(qkv, n, dim // heads):
        if _autograd(qkv):
            return SlicedAttention.apply(qkv, groups, heads, scale)[0]
        return sret_ops.sliced_attention(qkv, groups, heads, scale, False)[0]
    q, k, v = qkv.reshape(B * groups, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    mask = None if key_mask is None else key_mask.repeat(B, 1, 1)[:, None]
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return x.transpose(1, 2).reshape(B, N, dim)


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
