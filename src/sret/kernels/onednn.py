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
small to repay the call): each chooses by its rows of :mod:`sret.kernels.table`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sret.kernels import native
from sret.kernels.table import Path, choose


def _has_onednn_ops() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise")


ONEDNN_OPS = _has_onednn_ops()
# oneDNN's bf16 kernels need AVX-512 (bf16 dot products or AMX tiles where the CPU has them); on older
# CPUs bf16 products take torch's path.
ONEDNN_BF16 = ONEDNN_OPS and torch.ops.mkldnn._is_mkldnn_bf16_supported()

# Smallest product (multiply-accumulates) given to oneDNN: a oneDNN call costs more fixed time than
# torch's default, which outweighs its faster kernel below a few million MACs (sret_nano's layers
# trained slower through it; benchmarks/README.md).
ONEDNN_MIN_MACS = 1 << 23


# The weight gradient as a 1x1 convolution's (:data:`WEIGHT_GRAD`) gains only from oneDNN's AVX-512
# kernels: on a CPU held to AVX2 it took up to twice MKL's time at SReT's narrowing layers
# (benchmarks/README.md). ATen's capability is what torch itself runs at (ATEN_CPU_CAPABILITY).
CONV_WEIGHT_GRAD = torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def enabled() -> bool:
    """Whether oneDNN's fused ops can run: in this torch build, and switched on (`torch.backends.mkldnn`)."""
    return ONEDNN_OPS and torch.backends.mkldnn.enabled


def applies(x: Tensor, macs: int) -> bool:
    """Whether oneDNN takes a product of `macs` multiply-accumulates on `x`: fp32 on the CPU (or bf16
    where oneDNN has bf16 kernels), and large enough to repay the call."""
    dtype_ok = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and ONEDNN_BF16)
    return x.device.type == "cpu" and dtype_ok and macs >= ONEDNN_MIN_MACS


# ---- linear: x @ weight.T + bias, then GELU if asked ----------------------------------------------
def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _torch_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


ONEDNN = (
    "fp32 (bf16 under bf16 autocast with oneDNN's bf16 kernels) on the CPU, at least 2^23 "
    "multiply-accumulates; oneDNN's fused ops in this torch, switched on"
)
LINEAR = (
    Path(
        "onednn.linear",
        "oneDNN's GEMM, bias (and GELU) in its epilogue",
        ONEDNN,
        "products 1.1-2x faster than MKL's sgemm at SReT's shapes; sret_t's inference batch 602 -> 556 ms "
        "with the epilogues (the stem's ReLU too), its training step 2036 -> 1968 ms",
        _onednn_linear,
        takes=lambda x, weight, bias, gelu: applies(x, x.numel() * weight.shape[0]),
        ready=enabled,
    ),
    Path("onednn.linear", "`F.linear` (MKL's sgemm), then `F.gelu`", "otherwise", "torch's", _torch_linear),
)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """`x @ weight.T + bias`, then exact (erf) GELU if `gelu`, outside autograd.

    `weight` may be a transposed view (a backward's `grad @ W` is `linear(grad, W.t())`)."""
    return choose(LINEAR, x, weight, bias, gelu)


# ---- a linear layer's weight gradient: grad.T @ x ----------------------------------------------------
def _conv_weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """The weight gradient of a 1x1 convolution over the rows, laid out channels-last so that no copy
    is made."""

    def as_image(rows: Tensor) -> Tensor:  # (M, C) -> (1, C, M, 1), channels-last view
        return rows.view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)

    args = [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    grads = torch.ops.aten.convolution_backward(
        as_image(grad), as_image(x), weight[:, :, None, None], None, *args
    )
    return grads[1].reshape(weight.shape)


WEIGHT_GRAD = (
    Path(
        "onednn.weight_grad",
        "the weight gradient of a 1x1 convolution over channels-last rows (oneDNN, no copy)",
        f"layers that do not widen (in >= out features), {ONEDNN}; torch at AVX-512",
        "0.5-0.93x MKL's time per call at SReT's narrowing layers, sret_t's training step 2163 -> 2125 "
        "ms; held to AVX2 it took 1.9-2.8x MKL's time",
        _conv_weight_grad,
        takes=lambda grad, x, weight: x.shape[1] >= grad.shape[1] and applies(x, x.numel() * grad.shape[1]),
        ready=lambda: CONV_WEIGHT_GRAD and enabled(),
    ),
    Path(
        "onednn.weight_grad",
        "`grad.T @ x` (MKL's sgemm)",
        "otherwise",
        "torch's",
        lambda grad, x, _: grad.t() @ x,
    ),
)


def weight_grad(grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """A linear layer's weight gradient `grad.T @ x` from rows of output gradients and inputs."""
    return choose(WEIGHT_GRAD, grad, x, weight)


def linear_backward(
    grad: Tensor, x: Tensor, weight: Tensor, need_x: bool = True
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Gradients of `F.linear(x, weight, bias)` for the input (only where asked), weight and bias from
    the output's (contiguous) gradient."""
    rows = grad.reshape(-1, grad.shape[-1])
    grad_weight = weight_grad(rows, x.reshape(-1, x.shape[-1]), weight)
    grad_x = linear(grad, weight.t()) if need_x else None
    return grad_x, grad_weight, rows.sum(0)


# ---- GELU's backward: gelu(h) again, and the gradient through it --------------------------------------
GELU_BACKWARD = (
    Path(
        "onednn.gelu_backward",
        "one pass of SReT's C kernel (`csrc/gelu.c`)",
        "contiguous tensors of one shape, both fp32 or both bf16 (under bf16 autocast with oneDNN's bf16 "
        "kernels, computed in fp32); the C kernels built",
        "sret_t's training step 1697 -> 1609 ms (measured when the kernel also summed fc1's bias gradient); "
        "in bf16, part of the bf16 paths (the `active` row under bf16 autocast)",
        native.gelu_backward,
        takes=native.gelu_backward_applies,
        ready=native.built,
    ),
    Path(
        "onednn.gelu_backward",
        "`F.gelu` and `aten.gelu_backward`",
        "otherwise",
        "torch's",
        lambda h, grad: (F.gelu(h), torch.ops.aten.gelu_backward(grad, h)),
    ),
)


def gelu_backward(h: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """From the pre-activation `h` and the gradient of `gelu(h)`: `gelu(h)` (a following linear layer's
    input) and the gradient of `h` (in SReT's kernel written over `grad`)."""
    return choose(GELU_BACKWARD, h, grad)


# ---- convolution, then ReLU ---------------------------------------------------------------------------
def _conv_macs(x: Tensor, weight: Tensor, stride: int) -> int:
    return x.shape[0] * (x.shape[-2] // stride) * (x.shape[-1] // stride) * weight.numel()


def _onednn_conv_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    pair = [padding, padding], [stride, stride], [1, 1]
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *pair, 1, "relu", [], "")


def _torch_conv_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    return F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), inplace=True)


CONV_RELU = (
    Path(
        "onednn.conv_relu",
        "oneDNN's convolution, ReLU in its epilogue",
        ONEDNN,
        "part of the 602 -> 556 ms of `onednn.linear`'s epilogues",
        _onednn_conv_relu,
        takes=lambda x, weight, bias, stride, padding: applies(x, _conv_macs(x, weight, stride)),
        ready=enabled,
    ),
    Path("onednn.conv_relu", "`F.conv2d`, then `F.relu` in place", "otherwise", "torch's", _torch_conv_relu),
)


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    """`relu(conv2d(x, weight, bias))`. oneDNN's fused ReLU maps NaN to 0 where torch's keeps it: call
    it only on a finite input (see :func:`sret.kernels.ops.conv_bn_relu`)."""
    return choose(CONV_RELU, x, weight, bias, stride, padding)


def conv_relu_layers(
    x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], stride: int, padding: int
) -> Tensor:
    """:func:`conv_relu` for each (weight, bias) in turn."""
    for weight, bias in zip(weights, biases, strict=True):
        x = conv_relu(x, weight, bias, stride, padding)
    return x
