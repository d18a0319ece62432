"""Kernel choices for eager fp32 CPU work.

Three things make PyTorch's default CPU path slow on SReT's layers, which are narrow (64-256 channels,
hidden layers of a few hundred, 32-wide attention heads) and many:

- A linear layer's matrix products run in MKL's sgemm. oneDNN's GEMM, which PyTorch also ships, runs
  the same products faster on the CPUs this project is measured on (`benchmarks/README.md`), most at
  the 64-channel first stage. Training therefore runs the forward
  product and the input gradient of linear layers through oneDNN (:class:`OneDNNLinear`), wherever
  the product is large enough to repay a oneDNN call (:data:`ONEDNN_MIN_MACS`).
- In inference, a linear layer costs a bias broadcast-copy into the output before its product and a
  GELU after it another full pass over the (widest) activations; likewise a convolution and its ReLU.
  oneDNN runs bias and activation inside the kernel's epilogue, as torch's own compiler does.
- The fused attention kernel is slow on short sequences with narrow heads: token groups attend in
  SReT's own C kernel (:mod:`sret.native`) where it runs, else short ones by plain matrix products
  (:func:`qkv_attention`).

The results agree with the composite ops to float rounding (the same products, bias, erf-GELU and
softmax). Everywhere else (autocast, CUDA, torch.compile, torch.export, ONNX, TorchScript, torch.func
transforms) the plain ops run, so graphs and exports never see these kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from sret import native


def _has_onednn_ops() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise")


ONEDNN_OPS = _has_onednn_ops()


def recording() -> bool:
    """Whether a compiler, tracer, scripting, torch.func transform or dispatch mode (FlopCounterMode,
    FakeTensorMode) records or counts the ops: they must see plain aten ops, not the model's own
    kernels and autograd functions."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch._C._are_functorch_transforms_active()
        or is_in_torch_dispatch_mode()
    )


def plain_eager_fp32(x: Tensor) -> bool:
    """Whether `x` runs through eager fp32 ops: no autocast and nothing :func:`recording`. Shared by
    the hand-made paths of the model."""
    return x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type) and not recording()


# Smallest product (multiply-accumulates) given to oneDNN: a oneDNN call costs more fixed time than
# torch's default, which outweighs its faster kernel below a few million MACs (sret_nano's layers
# trained slower through it; benchmarks/README.md).
ONEDNN_MIN_MACS = 1 << 23


def use_onednn(x: Tensor, macs: int | None = None) -> bool:
    """Whether `x` is headed through eager fp32 CPU ops, where oneDNN's kernels apply, in a product
    of `macs` multiply-accumulates large enough to gain from them (any size when None)."""
    return (
        ONEDNN_OPS
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and plain_eager_fp32(x)
        and (macs is None or macs >= ONEDNN_MIN_MACS)  # last: under export, sizes are symbolic
    )


def matmul_t(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias` outside autograd, in oneDNN's GEMM where :func:`use_onednn` holds.

    `weight` may be a transposed view (a backward's `grad @ W` is `matmul_t(grad, W.t())`)."""
    if use_onednn(x, x.numel() * weight.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """A linear layer's weight gradient `grad.T @ x` from rows of output gradients and inputs.

    Where oneDNN applies and the layer does not widen (in >= out features), it runs as the weight
    gradient of a 1x1 convolution over the rows, laid out channels-last so that no copy is made:
    oneDNN's kernel, which the linear op does not expose for activation-sized operands, took 0.5-0.93x
    MKL's time at SReT's shapes. For widening layers MKL's GEMM was as fast or faster.
    """
    if not (use_onednn(x, x.numel() * grad.shape[1]) and x.shape[1] >= grad.shape[1]):
        return grad.t() @ x

    def as_image(rows: Tensor) -> Tensor:  # (M, C) -> (1, C, M, 1), channels-last view
        return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)

    args = [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    grads = torch.ops.aten.convolution_backward(
        as_image(grad), as_image(x), weight[:, :, None, None], None, *args
    )
    return grads[1].reshape(weight.shape)


def linear_backward(
    grad: Tensor,
    x: Tensor | None,
    weight: Tensor,
    need_x: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of `F.linear(x, weight, bias)` for the input, weight and bias from the output's
    (contiguous) gradient, each only where needed (`x` may be None without `need_weight`)."""
    rows = grad.reshape(-1, grad.shape[-1])
    grad_weight = weight_grad(rows, x.reshape(-1, x.shape[-1]), weight) if need_weight else None
    grad_bias = rows.sum(0) if need_bias else None
    grad_x = matmul_t(grad, weight.t()) if need_x else None
    return grad_x, grad_weight, grad_bias


def gelu_backward(
    h: Tensor, grad: Tensor, need_hidden: bool, need_bias: bool
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """From the pre-activation `h` and the gradient of `gelu(h)`: `gelu(h)` if `need_hidden`, the
    gradient of `h`, and its sums over all but the last dim if `need_bias` (a following linear layer's
    input and its bias gradient). One pass in :mod:`sret.native` where it runs (overwriting `grad`),
    three torch ops elsewhere."""
    if native.gelu_backward_applies(h, grad):
        return native.gelu_backward(h, grad, need_hidden, need_bias)
    hidden = F.gelu(h) if need_hidden else None
    grad_h = torch.ops.aten.gelu_backward(grad, h)
    return hidden, grad_h, grad_h.reshape(-1, grad_h.shape[-1]).sum(0) if need_bias else None


class OneDNNLinear(torch.autograd.Function):
    """`F.linear` whose products run in oneDNN in fp32 CPU training (see :func:`weight_grad`)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return matmul_t(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        return linear_backward(grad.contiguous(), x, weight, *ctx.needs_input_grad)


def linear(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, followed by exact (erf) GELU when `gelu`."""
    onednn = use_onednn(x, x.numel() * weight.shape[0])
    if onednn and not torch.is_grad_enabled():
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    x = OneDNNLinear.apply(x, weight, bias) if onednn else F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


# Longest sequence attended by plain matrix products instead of torch's fused CPU kernel.
UNFUSED_ATTENTION_TOKENS = 64


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float) -> Tensor:
    """`F.scaled_dot_product_attention`, run as two matrix products and a softmax for short
    sequences in eager fp32 CPU work.

    torch's CPU flash-attention kernel works through 32-query blocks one small GEMM at a time; for
    SReT's 49-token groups with 32-wide heads that took longer than the unfused products, forward and
    backward, whose attention matrices are small at that length (benchmarks/README.md). At 98 tokens (as the
    model lays them out) the fused kernel was as fast or faster timed alone, and even within noise in
    the whole model; it keeps memory flat, so it runs there.

    The scale multiplies the queries, not the scores: the product needs a contiguous copy of the
    (strided) queries anyway, and the scores are the larger tensor wherever a group has more tokens
    than a head has channels (49 against 32 in SReT's short groups).
    """
    unfused = (
        q.device.type == "cpu"
        and plain_eager_fp32(q)
        and mask is None
        and dropout_p == 0.0
        and q.shape[-2] <= UNFUSED_ATTENTION_TOKENS  # last: under export, sizes are symbolic
    )
    if unfused:
        return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def qkv_attention(
    qkv: Tensor, groups: int, heads: int, mask: Tensor | None, dropout_p: float, scale: float
) -> Tensor:
    """Multi-head attention within `groups` contiguous token groups of a qkv projection's output.

    qkv: (B, groups * n, 3 * C); mask: None, or (B * groups, 1, 1, n) True where a key may be attended.
    Returns (B, groups * n, C). In eager fp32 CPU work, unmasked and without dropout, this runs
    :mod:`sret.native`'s kernel where it is available; otherwise heads are split for :func:`attention`.
    """
    B, N, width = qkv.shape
    n, dim = N // groups, width // 3
    if mask is None and dropout_p == 0.0 and plain_eager_fp32(qkv) and native.applies(qkv, n, dim // heads):
        return native.sliced_attention(qkv, groups, heads, scale)
    q, k, v = qkv.reshape(B * groups, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return attention(q, k, v, mask, dropout_p, scale).transpose(1, 2).reshape(B, N, dim)


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of `bn(conv(x))` as one convolution, using the running statistics."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return conv.weight * scale[:, None, None, None], (bias - bn.running_mean) * scale + bn.bias


def conv_bn_relu_applies(x: Tensor) -> bool:
    """Whether :func:`conv_bn_relu` may run on the input `x`: eager fp32 CPU inference on a finite
    input. oneDNN's fused ReLU maps NaN to 0 where torch's keeps it, so an input with a non-finite
    value takes the plain ops and gives their result, whatever else is in the batch. The test is the
    sum: any NaN or infinity makes it non-finite, in one reduction (a sum that overflows only sends a
    finite input the plain way, with the same result)."""
    return use_onednn(x) and not torch.is_grad_enabled() and bool(torch.isfinite(x.sum()))


def conv_bn_relu(x: Tensor, layers: Sequence[tuple[nn.Conv2d, nn.BatchNorm2d]]) -> Tensor:
    """`relu(bn(conv(x)))` for each (conv, bn) in turn, in inference: BatchNorm folded into the
    convolution (a weight-sized computation instead of a pass over the activations) and the ReLU run
    inside oneDNN's kernel where the product is large enough to gain from it."""
    for conv, bn in layers:
        weight, bias = fold_batchnorm(conv, bn)
        (stride, _), (padding, _) = conv.stride, conv.padding
        macs = x.shape[0] * (x.shape[-2] // stride) * (x.shape[-1] // stride) * weight.numel()
        if use_onednn(x, macs):
            pair = [padding, padding], [stride, stride], [1, 1]
            x = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *pair, 1, "relu", [], "")
        else:
            x = F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), inplace=True)
    return x
