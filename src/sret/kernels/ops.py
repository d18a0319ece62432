"""SReT's kernels as `torch.library` operators (`torch.ops.sret.*`).

Each operator has a CPU implementation, a fake one (shapes only, for FakeTensorMode, meta tensors and
tracing compilers) and a flop formula (for `torch.utils.flop_counter.FlopCounterMode`), so tools that
work on operators see these as ops of their own, with their real cost. Their gradients are the
`*_backward` operators, wired up in :mod:`sret.kernels.autograd`. The operators run on the CPU, in
fp32, or in bf16 where their inputs are bf16; :func:`sret.kernels.active` decides when the model
calls them.

A hidden width that is not a multiple of 8 runs padded with zero units inside :func:`mlp` (CPU GEMM
kernels are several times slower on such widths, benchmarks/README.md): the padding outputs GELU(0) = 0
into zero weights and changes nothing, the weights keep their shapes, and the flop formula counts the
layer's own width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from sret.kernels import native, onednn
from sret.kernels.table import Path, choose

for _schema in (
    "linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    "linear_backward(Tensor grad, Tensor x, Tensor weight, bool need_x) -> (Tensor, Tensor, Tensor)",
    "mlp(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool keep_hidden) -> (Tensor, Tensor)",
    "mlp_backward(Tensor grad, Tensor x, Tensor h, Tensor w1, Tensor w2, bool need_x)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "sliced_attention(Tensor qkv, int groups, int heads, float scale, bool keep_lse) -> (Tensor, Tensor)",
    "sliced_attention_backward(Tensor grad, Tensor qkv, Tensor out, Tensor lse, int groups, int heads,"
    " float scale) -> Tensor",
    "conv_bn_relu(Tensor x, Tensor[] weights, Tensor[] biases, int stride, int padding) -> Tensor",
    "layer_norm(Tensor x, Tensor weight, Tensor bias, float eps, bool keep_stats)"
    " -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor weight)"
    " -> (Tensor, Tensor, Tensor)",
    "scaled_residual_bf16(Tensor x, Tensor branch, Tensor skip) -> Tensor",
):
    _name, _, _signature = _schema.partition("(")
    torch.library.define(f"sret::{_name}", f"({_signature}")

PAD_TO = 8


def _rows(shape: torch.Size | list[int]) -> int:
    return math.prod(shape[:-1])


def _empty(like: Tensor) -> Tensor:
    """Stands for an output that was not asked for."""
    return like.new_empty(0)


# ---- linear --------------------------------------------------------------------------------------
@torch.library.impl("sret::linear", "CPU")
def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(x, weight, bias)`, in oneDNN's GEMM where it applies."""
    return onednn.linear(x, weight, bias)


@torch.library.register_fake("sret::linear")
def _linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.impl("sret::linear_backward", "CPU")
def linear_backward(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Input (empty unless `need_x`), weight and bias gradients of :func:`linear`."""
    grad_x, grad_weight, grad_bias = onednn.linear_backward(grad.contiguous(), x, weight, need_x)
    return grad_x if need_x else _empty(x), grad_weight, grad_bias


@torch.library.register_fake("sret::linear_backward")
def _linear_backward_fake(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool) -> tuple[Tensor, ...]:
    return (
        torch.empty_like(x) if need_x else _empty(x),
        torch.empty_like(weight),
        grad.new_empty(grad.shape[-1]),
    )


@register_flop_formula(torch.ops.sret.linear)
def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * _rows(x_shape) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.sret.linear_backward)
def _linear_backward_flops(grad_shape, x_shape, w_shape, need_x, **kwargs) -> int:
    return (2 if need_x else 1) * 2 * _rows(x_shape) * w_shape[0] * w_shape[1]


# ---- MLP: fc1 -> GELU -> fc2 ---------------------------------------------------------------------
def _padded(w1: Tensor, b1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    pad = -w1.shape[0] % PAD_TO
    if not pad:
        return w1, b1, w2
    return F.pad(w1, (0, 0, 0, pad)), F.pad(b1, (0, pad)), F.pad(w2, (0, pad))


@torch.library.impl("sret::mlp", "CPU")
def mlp(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, keep_hidden: bool
) -> tuple[Tensor, Tensor]:
    """`fc2(gelu(fc1(x)))` and, if `keep_hidden`, fc1's output `h` (at the padded width) for the
    backward; without it, bias and GELU run in the GEMMs' epilogue where oneDNN applies."""
    w1, b1, w2 = _padded(w1, b1, w2)
    if keep_hidden:
        h = onednn.linear(x, w1, b1)
        return onednn.linear(F.gelu(h), w2, b2), h
    return onednn.linear(onednn.linear(x, w1, b1, gelu=True), w2, b2), _empty(x)


@torch.library.register_fake("sret::mlp")
def _mlp_fake(x, w1, b1, w2, b2, keep_hidden) -> tuple[Tensor, Tensor]:
    width = w1.shape[0] + -w1.shape[0] % PAD_TO
    h = x.new_empty(*x.shape[:-1], width) if keep_hidden else _empty(x)
    return x.new_empty(*x.shape[:-1], w2.shape[0]), h


@torch.library.impl("sret::mlp_backward", "CPU")
def mlp_backward(
    grad: Tensor, x: Tensor, h: Tensor, w1: Tensor, w2: Tensor, need_x: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`mlp` for x (empty unless `need_x`), w1, b1, w2 and b2, from `x` and `h`
    alone: fc2's weight gradient recomputes `gelu(h)`, one elementwise pass, instead of the forward
    keeping a second hidden-sized tensor."""
    hidden_width = w1.shape[0]
    w1, _, w2 = _padded(w1, w1.new_empty(w1.shape[0]), w2)
    grad = grad.contiguous()
    hidden, grad_h = onednn.gelu_backward(h, onednn.linear(grad, w2.t()))
    _, grad_w2, grad_b2 = onednn.linear_backward(grad, hidden, w2, False)
    del hidden
    grad_x, grad_w1, grad_b1 = onednn.linear_backward(grad_h, x, w1, need_x)
    if grad_w1.shape[0] != hidden_width:
        grad_w1, grad_b1 = grad_w1[:hidden_width], grad_b1[:hidden_width]
        grad_w2 = grad_w2[:, :hidden_width].contiguous()
    return grad_x if need_x else _empty(x), grad_w1, grad_b1, grad_w2, grad_b2


@torch.library.register_fake("sret::mlp_backward")
def _mlp_backward_fake(grad, x, h, w1, w2, need_x) -> tuple[Tensor, ...]:
    grad_x = torch.empty_like(x) if need_x else _empty(x)
    return (
        grad_x,
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0]),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0]),
    )


@register_flop_formula(torch.ops.sret.mlp)
def _mlp_flops(x_shape, w1_shape, b1_shape, w2_shape, *args, **kwargs) -> int:
    return 2 * _rows(x_shape) * w1_shape[0] * (w1_shape[1] + w2_shape[0])


@register_flop_formula(torch.ops.sret.mlp_backward)
def _mlp_backward_flops(grad_shape, x_shape, h_shape, w1_shape, w2_shape, need_x, **kwargs) -> int:
    fc1, fc2 = w1_shape[0] * w1_shape[1], w2_shape[0] * w2_shape[1]
    return 2 * _rows(x_shape) * ((2 if need_x else 1) * fc1 + 2 * fc2)


# ---- sliced attention ----------------------------------------------------------------------------
@torch.library.impl("sret::sliced_attention", "CPU")
def sliced_attention(
    qkv: Tensor, groups: int, heads: int, scale: float, keep_lse: bool
) -> tuple[Tensor, Tensor]:
    """Softmax attention within `groups` contiguous token groups of the qkv projection's output, in
    SReT's C kernel (:func:`sret.kernels.native.attention_forward`; check `native.applies` first).
    The second output is the log-sum-exp the backward needs, or empty."""
    out, lse = native.attention_forward(qkv, groups, heads, scale, keep_lse)
    return out, lse if lse is not None else _empty(qkv)


@torch.library.register_fake("sret::sliced_attention")
def _sliced_attention_fake(qkv, groups, heads, scale, keep_lse) -> tuple[Tensor, Tensor]:
    batch, tokens, width = qkv.shape
    lse = (
        qkv.new_empty(batch * groups * heads, tokens // groups, dtype=torch.float32)
        if keep_lse
        else _empty(qkv)
    )
    return qkv.new_empty(batch, tokens, width // 3), lse


@torch.library.impl("sret::sliced_attention_backward", "CPU")
def sliced_attention_backward(
    grad: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, groups: int, heads: int, scale: float
) -> Tensor:
    """The qkv gradient of :func:`sliced_attention`."""
    return native.attention_backward(grad, qkv, out, lse, groups, heads, scale)


@torch.library.register_fake("sret::sliced_attention_backward")
def _sliced_attention_backward_fake(grad, qkv, out, lse, groups, heads, scale) -> Tensor:
    return torch.empty_like(qkv)


def _attention_macs(qkv_shape, groups: int) -> int:
    """q·kᵀ and attention·v: each batch·tokens·(tokens per group)·width multiply-accumulates."""
    batch, tokens, width = qkv_shape
    return 2 * batch * tokens * (tokens // groups) * (width // 3)


@register_flop_formula(torch.ops.sret.sliced_attention)
def _sliced_attention_flops(qkv_shape, groups, *args, **kwargs) -> int:
    return 2 * _attention_macs(qkv_shape, groups)


@register_flop_formula(torch.ops.sret.sliced_attention_backward)
def _sliced_attention_backward_flops(
    grad_shape, qkv_shape, out_shape_, lse_shape, groups, *args, **kwargs
) -> int:
    return 4 * _attention_macs(qkv_shape, groups)  # four products, as torch counts attention's backward


# ---- stem: conv -> (folded) BatchNorm -> ReLU, inference ---------------------------------------------
def _torch_conv_relu_layers(
    x: Tensor, weights: list[Tensor], biases: list[Tensor], stride: int, padding: int
) -> Tensor:
    for weight, bias in zip(weights, biases, strict=True):
        x = F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding))
    return x


# oneDNN's ReLU maps NaN to 0 where torch's keeps it, so an input with a non-finite value takes torch's
# ops and gives their result, whatever else is in the batch. The test is one sum: any NaN or infinity
# makes it non-finite (a sum that overflows only sends a finite input torch's way, same result).
CONV_BN_RELU = (
    Path(
        "ops.conv_bn_relu",
        "`onednn.conv_relu`, layer by layer",
        "a finite input",
        "BatchNorm folded into the weights, the ReLU in oneDNN's epilogue where it runs",
        onednn.conv_relu_layers,
        takes=lambda x, *_: bool(torch.isfinite(x.sum())),
    ),
    Path(
        "ops.conv_bn_relu",
        "`F.conv2d` and `F.relu`, layer by layer",
        "otherwise",
        "oneDNN's fused ReLU maps NaN to 0 where torch's keeps it",
        _torch_conv_relu_layers,
    ),
)


@torch.library.impl("sret::conv_bn_relu", "CPU")
def conv_bn_relu(x: Tensor, weights: list[Tensor], biases: list[Tensor], stride: int, padding: int) -> Tensor:
    """`relu(conv2d(x, w, b))` for each layer in turn, BatchNorm already folded into (w, b), the ReLU
    in oneDNN's kernel where it gains (:data:`CONV_BN_RELU`). The output is channels-last."""
    x = x.contiguous(memory_format=torch.channels_last)
    return choose(CONV_BN_RELU, x, weights, biases, stride, padding)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.register_fake("sret::conv_bn_relu")
def _conv_bn_relu_fake(x, weights, biases, stride, padding) -> Tensor:
    height, width = x.shape[-2:]
    for weight in weights:
        height = _conv_out(height, weight.shape[-2], stride, padding)
        width = _conv_out(width, weight.shape[-1], stride, padding)
    out = x.new_empty(x.shape[0], weights[-1].shape[0], height, width)
    return out.contiguous(memory_format=torch.channels_last)


@register_flop_formula(torch.ops.sret.conv_bn_relu)
def _conv_bn_relu_flops(x_shape, w_shapes, b_shapes, stride, padding, **kwargs) -> int:
    flops, (height, width) = 0, x_shape[-2:]
    for w_shape in w_shapes:
        height = _conv_out(height, w_shape[-2], stride, padding)
        width = _conv_out(width, w_shape[-1], stride, padding)
        flops += 2 * x_shape[0] * height * width * math.prod(w_shape)
    return flops


# ---- LayerNorm (into bf16 under autocast), and the residual of a bf16 branch -------------------------
@torch.library.impl("sret::layer_norm", "CPU")
def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, keep_stats: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim of fp32 `x`, written in bf16, in SReT's C kernel (check
    `native.passes_apply` first); then each row's mean and reciprocal standard deviation, or empty."""
    y, mean, rstd = native.layer_norm(x, weight, bias, eps, keep_stats)
    return y, mean if keep_stats else _empty(x), rstd if keep_stats else _empty(x)


@torch.library.register_fake("sret::layer_norm")
def _layer_norm_fake(x, weight, bias, eps, keep_stats) -> tuple[Tensor, Tensor, Tensor]:
    stats = x.new_empty(*x.shape[:-1], 1) if keep_stats else _empty(x)
    y = torch.empty_like(x, dtype=torch.bfloat16)
    return y, stats, torch.empty_like(stats)


def _torch_layer_norm_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    bias = weight.new_zeros(weight.shape)  # the bias enters no gradient
    grads = torch.ops.aten.native_layer_norm_backward(
        grad.float(), x, [x.shape[-1]], mean, rstd, weight, bias, [True, True, True]
    )
    return grads[0], grads[1], grads[2]


def _bf16_gradient(grad: Tensor, x: Tensor, *_: Tensor) -> bool:
    return grad.dtype == torch.bfloat16 and grad.is_contiguous() and grad.shape == x.shape


LAYER_NORM_BACKWARD = (
    Path(
        "ops.layer_norm_backward",
        "SReT's C kernel (`csrc/norm.c`), from the bf16 gradient without widening it",
        "a contiguous bf16 gradient of x's shape (as the product after a bf16 LayerNorm gives it); the C "
        "kernels built",
        "part of the bf16 paths (the `active` row under bf16 autocast)",
        native.layer_norm_backward_bf16,
        takes=_bf16_gradient,
        ready=native.built,
    ),
    Path(
        "ops.layer_norm_backward",
        "`aten.native_layer_norm_backward` on the widened gradient",
        "otherwise",
        "torch's",
        _torch_layer_norm_backward,
    ),
)


@torch.library.impl("sret::layer_norm_backward", "CPU")
def layer_norm_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`layer_norm` for x, weight and bias, by :data:`LAYER_NORM_BACKWARD`."""
    return choose(LAYER_NORM_BACKWARD, grad, x, mean, rstd, weight)


@torch.library.register_fake("sret::layer_norm_backward")
def _layer_norm_backward_fake(grad, x, mean, rstd, weight) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.impl("sret::scaled_residual_bf16", "CPU")
def scaled_residual_bf16(x: Tensor, branch: Tensor, skip: Tensor) -> Tensor:
    """`skip * x + branch` of fp32 `x` and a bf16 `branch`, in fp32, in one pass of SReT's C kernel."""
    return native.scaled_residual_bf16(x, branch, float(skip))


@torch.library.register_fake("sret::scaled_residual_bf16")
def _scaled_residual_bf16_fake(x, branch, skip) -> Tensor:
    return torch.empty_like(x)


RESIDUAL = (
    Path(
        "ops.scaled_residual",
        "one pass of SReT's C kernel (`csrc/norm.c`) in fp32, not a promotion and an `addcmul`",
        "a bf16 branch (under bf16 autocast) of the fp32 stream's shape, both contiguous; the C kernels "
        "built",
        "part of the bf16 paths (the `active` row under bf16 autocast)",
        lambda x, branch, skip: torch.ops.sret.scaled_residual_bf16(x, branch, skip),
        takes=lambda x, branch, skip: native.passes_apply(x, branch),
        ready=native.built,
    ),
    Path(
        "ops.scaled_residual",
        "`torch.addcmul`",
        "otherwise",
        "torch's",
        lambda x, branch, skip: torch.addcmul(branch, x, skip),
    ),
)


def scaled_residual(x: Tensor, branch: Tensor, skip: Tensor) -> Tensor:
    """`skip * x + branch` in one pass, by :data:`RESIDUAL`."""
    return choose(RESIDUAL, x, branch, skip)
