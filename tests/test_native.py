"""SReT's C kernels: the results and gradients of torch's attention, GELU, (bf16) LayerNorm and
residual, and a clean fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sret import kernels
from sret.kernels import native
from sret.model import SReT, SReTConfig, StageConfig

needs_kernel = pytest.mark.skipif(native.library() is None, reason="no AVX2 CPU or no C compiler here")


def reference(qkv: torch.Tensor, groups: int, heads: int, scale: float) -> torch.Tensor:
    """Heads split out of the qkv projection, attended by torch's math kernel, merged back."""
    B, N, width = qkv.shape
    n, dim = N // groups, width // 3
    q, k, v = qkv.reshape(B * groups, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, N, dim)


@needs_kernel
@pytest.mark.parametrize(
    "batch, groups, tokens, heads, head_dim",
    [
        (2, 8, 98, 2, 32),  # sret_t's first stage, first loop
        (2, 1, 392, 2, 32),
        (3, 4, 49, 4, 32),
        (2, 2, 50, 3, 42),  # sret_s's heads: a masked last vector
        (1, 1, 37, 8, 48),  # the deep models' heads: three vectors, odd token count
        (2, 2, 16, 2, 16),  # sret_nano
        (2, 1, 1, 1, 32),  # a single token
    ],
)
def test_kernel_matches_torch_attention_forward_and_backward(
    batch: int, groups: int, tokens: int, heads: int, head_dim: int
) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(batch, groups * tokens, 3 * heads * head_dim, requires_grad=True)
    scale = head_dim**-0.5
    assert native.applies(qkv, tokens, head_dim)
    grad = torch.randn(batch, groups * tokens, heads * head_dim)
    ours = kernels.attend(qkv, groups, heads, scale)
    ref = reference(qkv, groups, heads, scale)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    (ours_grad,) = torch.autograd.grad(ours, qkv, grad)
    (ref_grad,) = torch.autograd.grad(ref, qkv, grad)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # inference keeps no log-sum-exp, same result
        torch.testing.assert_close(kernels.attend(qkv, groups, heads, scale), ours, rtol=0, atol=0)


@needs_kernel
def test_kernel_uses_every_thread_count_alike() -> None:
    qkv = torch.randn(2, 4 * 49, 3 * 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.attend(qkv, 4, 4, 32**-0.5)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(kernels.attend(qkv, 4, 4, 32**-0.5), one, rtol=0, atol=0)


@needs_kernel
def test_model_runs_the_kernel_and_matches_torch_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SReT with padded groups (masked: torch's kernel) and unpadded ones (the C kernel) gives, loss
    and gradients, what it gives on torch's attention alone."""
    cfg = SReTConfig(
        (
            StageConfig(64, 2, blocks=1, loops=2, groups=(4, 2), permute=(False, True)),
            StageConfig(128, 4, blocks=1, loops=2, groups=(3, 1)),  # 16 tokens in 3 groups: padded
        ),
        img_size=64,
        num_classes=10,
        shuffle="fixed",
        drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    model = SReT(cfg).train()
    x = torch.randn(2, 3, 64, 64)
    calls: list[int] = []
    kernel = native.attention_forward
    monkeypatch.setattr(native, "attention_forward", lambda *a: calls.append(1) or kernel(*a))

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(x).square().sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    assert len(calls) == 3  # both loops of the first stage, the unpadded loop of the second
    monkeypatch.setattr(native, "applies", lambda *a: False)
    theirs = loss_and_grads()
    assert len(calls) == 3
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unavailable_kernel_falls_back_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compiler that fails: a warning naming the cause, and torch's attention runs instead."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("SRET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 without output
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="sret.kernels.native"):
            assert not native.built()
            qkv = torch.randn(2, 8, 3 * 64)
            assert kernels.first(kernels.ATTEND, qkv, 1, 2, 32**-0.5, None) is kernels.ATTEND[-1]
            out = kernels.attend(qkv, 1, 2, 32**-0.5)
        assert [r.getMessage() for r in caplog.records if "native kernels off" in r.getMessage()]
        assert "failed" in caplog.text and list(tmp_path.iterdir()) == []  # no half-written library
        torch.testing.assert_close(out, reference(qkv, 1, 2, 32**-0.5))
        monkeypatch.setenv("SRET_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None
    finally:
        native.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 5, 232), (3, 7, 37), (1, 1, 8)])
def test_gelu_backward_matches_torch(shape: tuple[int, ...]) -> None:
    """One pass gives GELU and its gradient, torch's two ops, tails and large |x| included; the
    gradient is written over the incoming one."""
    torch.manual_seed(0)
    h = torch.randn(shape) * 4
    grad = torch.randn(shape)
    assert native.gelu_backward_applies(h, grad)
    buffer = grad.clone()
    hidden, grad_h = native.gelu_backward(h, buffer)
    assert grad_h is buffer
    torch.testing.assert_close(hidden, F.gelu(h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_h, torch.ops.aten.gelu_backward(grad, h), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 5, 232), (3, 7, 37)])
def test_gelu_backward_in_bf16_rounds_the_fp32_result(shape: tuple[int, ...]) -> None:
    """bf16 tensors (bf16 autocast's MLP backward): computed in fp32 from the widened values, rounded
    to bf16 once (so within one bf16 rounding of torch's fp32 result on the same inputs)."""
    torch.manual_seed(0)
    h, grad = (torch.randn(shape) * 4).bfloat16(), torch.randn(shape).bfloat16()
    assert native.gelu_backward_applies(h, grad)
    assert not native.gelu_backward_applies(h, grad.float())  # mixed dtypes take torch's ops
    hidden, grad_h = native.gelu_backward(h, grad.clone())
    assert hidden.dtype == grad_h.dtype == torch.bfloat16
    one_rounding = {"rtol": 2**-8, "atol": 1e-6}
    torch.testing.assert_close(hidden.float(), F.gelu(h.float()), **one_rounding)
    ref_grad = torch.ops.aten.gelu_backward(grad.float(), h.float())
    torch.testing.assert_close(grad_h.float(), ref_grad, **one_rounding)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 98, 64), (3, 7, 37), (1, 1, 256)])
def test_layer_norm_matches_torch_fp32_layer_norm(shape: tuple[int, ...]) -> None:
    """fp32 in, computed in fp32, rounded to bf16 once (within one bf16 rounding of torch's fp32
    LayerNorm), with the row statistics torch's backward takes."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(shape) * 3 + 1, torch.randn(shape[-1]), torch.randn(shape[-1])
    assert native.passes_apply(x) and not native.passes_apply(x.bfloat16())
    y, mean, rstd = native.layer_norm(x, weight, bias, 1e-6, True)
    ref, ref_mean, ref_rstd = torch.ops.aten.native_layer_norm(x, [shape[-1]], weight, bias, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, ref_rstd, rtol=1e-5, atol=1e-6)
    assert native.layer_norm(x, weight, bias, 1e-6, False)[1:] == (None, None)
    x[0, 0, 0] = float("nan")  # a NaN spoils its own row only
    y, _, _ = native.layer_norm(x, weight, bias, 1e-6, False)
    assert y[0, 0].isnan().all() and not y.flatten(0, -2)[1:].isnan().any()


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 98, 64), (3, 7, 37), (70, 256)])
def test_layer_norm_backward_from_a_bf16_gradient_matches_torch(shape: tuple[int, ...]) -> None:
    """From the bf16 gradient, the fp32 input and the kept statistics: torch's LayerNorm backward on the
    widened gradient, to fp32 rounding (the column sums in double, torch's in float)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(shape) * 3 + 1, torch.randn(shape[-1]), torch.randn(shape[-1])
    _, mean, rstd = native.layer_norm(x, weight, bias, 1e-6, True)
    grad = torch.randn(shape).bfloat16()
    ours = native.layer_norm_backward_bf16(grad, x, mean, rstd, weight)
    refs = torch.ops.aten.native_layer_norm_backward(
        grad.float(), x, [shape[-1]], mean, rstd, weight, bias, [True, True, True]
    )
    for a, b in zip(ours, refs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 98, 64), (3, 7, 37), (5,)])
def test_scaled_residual_of_a_bf16_branch_matches_addcmul(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, branch = torch.randn(shape), torch.randn(shape).bfloat16()
    assert native.passes_apply(x, branch) and not native.passes_apply(x, branch.float())
    out = native.scaled_residual_bf16(x, branch, 0.7)
    torch.testing.assert_close(out, torch.addcmul(branch, x, torch.tensor([0.7])), rtol=1e-6, atol=1e-6)


def test_kernel_is_skipped_where_it_does_not_apply() -> None:
    qkv = torch.randn(1, 8, 3 * 64)
    assert not native.applies(qkv.double(), 8, 32)
    assert not native.applies(torch.randn(1, 8, 6 * 64)[..., ::2], 8, 32)  # not contiguous
    assert not native.applies(torch.randn(1, 8, 3 * 128), 8, 64)  # heads wider than 48
    assert not native.applies(torch.randn(1, 1024, 3 * 64), native.MAX_TOKENS + 1, 32)
    assert not native.gelu_backward_applies(qkv, qkv[:, :4])  # shapes differ
    assert not native.gelu_backward_applies(qkv.double(), qkv.double())
