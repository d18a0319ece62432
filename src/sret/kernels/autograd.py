"""Gradients of SReT's operators, as autograd Functions in the `setup_context` form, which
`torch.func` transforms and `torch.compile` accept.

Each forward calls one operator of :mod:`sret.kernels.ops` (or a torch op), and each backward the
matching `*_backward` operator, under `no_grad`: these are first derivatives only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sret.kernels import ops

sret_ops = torch.ops.sret


def _none_if_unneeded(grads: tuple[Tensor, ...], needed: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    return tuple(g if need else None for g, need in zip(grads, needed, strict=True))


class Linear(torch.autograd.Function):
    """`F.linear` through :func:`sret.kernels.ops.linear` and its backward operator."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return sret_ops.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        with torch.no_grad():
            grads = sret_ops.linear_backward(grad, x, weight, ctx.needs_input_grad[0])
        return _none_if_unneeded(grads, ctx.needs_input_grad)


class MLP(torch.autograd.Function):
    """`fc2(gelu(fc1(x)))` that keeps for backward only `x` and fc1's output (see
    :func:`sret.kernels.ops.mlp_backward`): autograd would also hold `gelu(h)`, a second hidden-sized
    tensor per MLP."""

    @staticmethod
    def forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
        return sret_ops.mlp(x, w1, b1, w2, b2, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: tuple[Tensor, Tensor]) -> None:
        x, w1, _, w2, _ = inputs
        ctx.save_for_backward(x, output[1], w1, w2)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd zero-fills a hidden-sized gradient for `h`

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h, w1, w2 = ctx.saved_tensors
        with torch.no_grad():
            grads = sret_ops.mlp_backward(grad, x, h, w1, w2, ctx.needs_input_grad[0])
        return _none_if_unneeded(grads, ctx.needs_input_grad)


class SlicedAttention(torch.autograd.Function):
    """Attention within token groups of a qkv projection, in SReT's C kernel, forward and backward."""

    @staticmethod
    def forward(qkv: Tensor, groups: int, heads: int, scale: float) -> tuple[Tensor, Tensor]:
        return sret_ops.sliced_attention(qkv, groups, heads, scale, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
        qkv, groups, heads, scale = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for `lse`
        ctx.layout = groups, heads, scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        qkv, out, lse = ctx.saved_tensors
        with torch.no_grad():
            return sret_ops.sliced_attention_backward(grad, qkv, out, lse, *ctx.layout), None, None, None


class ScaledResidual(torch.autograd.Function):
    """`skip * x + branch` whose scalar gradient takes one pass over the activations instead of three.

    For the scalar's gradient autograd's backward of `addcmul(branch, x, skip)` copies `x * 1`,
    multiplies the copy by the incoming gradient and sums the product; here it is one dot product."""

    @staticmethod
    def forward(x: Tensor, branch: Tensor, skip: Tensor) -> Tensor:
        return ops.scaled_residual(x, branch, skip)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x, _, skip = inputs
        ctx.save_for_backward(x, skip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None]:
        x, skip = ctx.saved_tensors
        need_x, _, need_skip = ctx.needs_input_grad
        with torch.no_grad():
            grad_skip = None
            if need_skip:  # x may be bf16 under autocast where the (promoted) output is fp32
                grad_skip = torch.dot(grad.reshape(-1), x.reshape(-1).to(grad.dtype)).view(1)
            return grad * skip if need_x else None, grad, grad_skip


class TokenPermutation(torch.autograd.Function):
    """`x[:, index]` for a permutation `index` with a known `inverse`: its backward is the inverse
    gather (a copy), where autograd's generic one scatter-adds (an accumulating index_put, several
    times slower on CPU for the same result)."""

    @staticmethod
    def forward(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        return x.index_select(1, index)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        with torch.no_grad():
            return grad.index_select(1, inverse), None, None


class LayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim in SReT's C kernel (:func:`sret.kernels.ops.layer_norm`), written in
    bf16; its backward (:func:`sret.kernels.ops.layer_norm_backward`) starts from the row
    statistics the forward kept and the gradient as the next product gives it."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, ...]:
        return sret_ops.layer_norm(x, weight, bias, eps, True)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor, Tensor]) -> None:
        x, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        with torch.no_grad():
            grads = sret_ops.layer_norm_backward(grad.contiguous(), x, mean, rstd, weight)
        return (*_none_if_unneeded(grads, ctx.needs_input_grad[:3]), None)
