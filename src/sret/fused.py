"""Fused oneDNN kernels for eager CPU inference.

A linear layer in eager PyTorch costs a bias broadcast-copy into the output before the matrix product,
and a GELU after it costs another full pass over the (widest) activations; likewise a convolution and
its ReLU. oneDNN, which PyTorch ships on x86 and Arm, runs bias and activation inside the kernel's
epilogue. SReT's small widths (64-256 channels, hidden layers of a few hundred) make those extra
passes a large share of the time, so in eager fp32 inference on CPU the model calls oneDNN's fused
ops, which torch's own compiler uses for the same purpose. The outputs agree with the composite ops to
float rounding (the same GEMM, bias and erf-GELU).

Everywhere else (autograd, autocast, CUDA, torch.compile, torch.export, ONNX, TorchScript) the plain
ops run, so graphs, exports and gradients never see these kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _has_onednn_ops() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_convolution_pointwise")


ONEDNN_OPS = _has_onednn_ops()


def plain_eager_fp32(x: Tensor) -> bool:
    """Whether `x` runs through eager fp32 ops: no autocast, and no compiler, tracer or scripting
    recording the graph (which must see the plain ops). Shared by the hand-made paths of the model."""
    return (
        x.dtype == torch.float32
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
    )


def use_onednn(x: Tensor) -> bool:
    """Whether `x` is headed through eager fp32 CPU inference, where the fused kernels apply."""
    return (
        ONEDNN_OPS
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and plain_eager_fp32(x)
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor, gelu: bool = False) -> Tensor:
    """`F.linear(x, weight, bias)`, followed by exact (erf) GELU when `gelu`."""
    if use_onednn(x):
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    x = F.linear(x, weight, bias)
    return F.gelu(x) if gelu else x


def conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    """`relu(conv2d(x, weight, bias, stride, padding))`."""
    if use_onednn(x):
        pair = [padding, padding], [stride, stride], [1, 1]
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *pair, 1, "relu", [], "")
    return F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding), inplace=True)
