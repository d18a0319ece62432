"""oneDNN's GEMM and convolution kernels, which PyTorch ships beside MKL's.

Three things make PyTorch's default CPU path slow on SReT's layers, which are narrow (64-256 channels,
hidden layers of a few hundred) and many:

- A linear layer's products run in MKL's sgemm; oneDNN's GEMM runs the same products faster on the
  CPUs this project is measured on (`benchmarks/README.md`), most at the 64-channel first stage.
- In inference a linear layer costs a bias broadcast-copy into its output and a GELU after it another
  pass over the (widest) activations; likewise a convolution and its ReLU. oneDNN runs bias and
  activation inside the kernel's epilogue.
- A linear layer's weight gradient has no oneDNN entry for activation-sized operands; a 1x1
  convolution's weight gradient does (:func:`weight_grad`).

Every function here gives the composite op's result to float rounding, and runs torch's own op
wherever oneDNN does not apply (no oneDNN build, `torch.backends.mkldnn` disabled, or a product too
small to repay the call).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sret.kernels import native


def _has_onednn_ops() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise")


ONEDNN_OPS = _has_onednn_ops()

# Smallest product (multiply-accumulates) given to oneDNN: a oneDNN call costs more fixed time than
# torch's default, which outweighs its faster kernel below a few million MACs (sret_nano's layers
# trained slower through it; benchmarks/README.md).
ONEDNN_MIN_MACS = 1 << 23


# The weight gradient as a 1x1 convolution's (:func:`weight_grad`) gains only from oneDNN's AVX-512
# kernels: on a CPU held to AVX2 it took up to twice MKL's time at SReT's narrowing layers
# (benchmarks/README.md). ATen's capability is what torch itself runs at (ATEN_CPU_CAPABILITY).
CONV_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def applies(x: Tensor, macs: int | None = None) -> bool:
    """Whether oneDNN runs a product of `macs` multiply-accumulates (any size when None) on the fp32
    CPU tensor `x`."""
    return (
        ONEDNN_OPS
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and (macs is None or macs >= ONEDNN_MIN_MACS)
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """`x @ weight.T + bias`, then exact (erf) GELU if `gelu`, outside autograd.

    `weight` may be a transposed view (a backward's `grad @ W` is `linear(grad, W.t())`)."""
    if applies(x, x.numel() * weight.shape[0]):
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


def weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """A linear layer's weight gradient `grad.T @ x` from rows of output gradients and inputs.

    Where oneDNN applies with AVX-512 kernels, in fp32, and the layer does not widen (in >= out
    features), it runs as the weight gradient of a 1x1 convolution over the rows, laid out
    channels-last so that no copy is made (faster than MKL's GEMM at SReT's shapes on the CPU it was
    measured on, benchmarks/README.md). For widening layers MKL's GEMM was as fast or faster.
    """
    conv = CONV_WEIGHT_GRAD and x.dtype == torch.float32 and x.shape[1] >= grad.shape[1]
    if not (conv and applies(x, x.numel() * grad.shape[1])):
        return grad.t() @ x

    def as_image(rows: Tensor) -> Tensor:  # (M, C) -> (1, C, M, 1), channels-last view
        return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)

    args = [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    grads = torch.ops.aten.convolution_backward(
        as_image(grad), as_image(x), weight[:, :, None, None], None, *args
    )
    return grads[1].reshape(weight.shape)


def linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, need_x: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of `F.linear(x, weight, bias)` for the input (only where asked), weight and bias from
    the output's (contiguous) gradient."""
    rows = grad.reshape(-1, grad.shape[-1])
    grad_weight = weight_grad(rows, x.reshape(-1, x.shape[-1]), weight)
    grad_x = linear(grad, weight.t()) if need_x else None
    return grad_x, grad_weight, rows.sum(0)


def gelu_backward(h: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """From the pre-activation `h` and the gradient of `gelu(h)`: `gelu(h)` (a following linear layer's
    input) and the gradient of `h`, in `h`'s dtype. One pass in :mod:`sret.kernels.native` where it
    runs (overwriting `grad`), two torch ops elsewhere."""
    if native.gelu_backward_applies(h, grad):
        return native.gelu_backward(h, grad)
    return F.gelu(h), torch.ops.aten.gelu_backward(grad, h)


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    """`relu(conv2d(x, weight, bias))`, the ReLU inside oneDNN's kernel where the product is large
    enough to gain from it.

    oneDNN's fused ReLU maps NaN to 0 where torch's keeps it: call it only on a finite input (see
    :func:`sret.kernels.ops.conv_bn_relu`)."""
    macs = x.shape[0] * (x.shape[-2] // stride) * (x.shape[-1] // stride) * weight.numel()
    if applies(x, macs):
        pair = [padding, padding], [stride, stride], [1, 1]
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *pair, 1, "relu", [], "")
    return F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), inplace=True)


def conv_relu_layers(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], stride: int, padding: int
) -> Tensor:
    """:func:`conv_relu` for each (weight, bias) in turn."""
    for weight, bias in zip(weights, biases, strict=True):
        x = conv_relu(x, weight, bias, stride, padding)
    return x
