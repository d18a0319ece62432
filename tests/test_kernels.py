"""sret.kernels: each entry point against the plain module it stands for, forward and backward, and
the operators as tools see them (FlopCounterMode, FakeTensorMode, torch.func, torch.compile)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

import sret
from sret import kernels
from sret.info import count_macs
from sret.kernels import native, onednn
from sret.kernels.table import always
from sret.model import (
    ConvPool,
    ConvStem,
    FeedForward,
    SlicedAttention,
    SReT,
    SReTConfig,
    StageConfig,
    token_groups,
)

needs_native = pytest.mark.skipif(native.library() is None, reason="no AVX2 CPU or no C compiler here")
# The bf16 fast paths run only where oneDNN has bf16 kernels (AVX-512 CPUs); elsewhere bf16 autocast
# runs the plain modules, which test_bf16_autocast_without_onednn_bf16_runs_the_plain_modules checks.
needs_onednn_bf16 = pytest.mark.skipif(not onednn.ONEDNN_BF16, reason="needs oneDNN's bf16 kernels (AVX-512)")


def tiny_cfg(**kw) -> SReTConfig:
    stages = (
        StageConfig(16, 2, blocks=2, loops=2, groups=(4, 2), permute=(False, True)),
        StageConfig(32, 4, blocks=1, loops=3, groups=(2, 1, 2), permute=(False, False, True)),
    )
    return SReTConfig(
        stages, mlp_ratio=2.0, img_size=32, num_classes=5, shuffle="fixed", drop_path_rate=0.0, **kw
    )


def outputs_and_grads(module: torch.nn.Module, *inputs: Tensor, plain: bool) -> tuple[Tensor, list[Tensor]]:
    """The output for `inputs` and the gradients of a fixed random projection of it with respect to
    the inputs and every parameter, through the kernels or (`plain`) the plain modules."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    params = [p for p in module.parameters() if p.requires_grad]
    with kernels.disabled() if plain else torch.enable_grad():
        out = module(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return out.detach(), list(
        torch.autograd.grad((out * weights).sum(), [*leaves, *params], allow_unused=True)
    )


def assert_same(module: torch.nn.Module, *inputs: Tensor, atol: float = 1e-5) -> None:
    ours, ours_grads = outputs_and_grads(module, *inputs, plain=False)
    ref, ref_grads = outputs_and_grads(module, *inputs, plain=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=atol)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


# ---- each entry point against its plain module ------------------------------------------------------
@pytest.mark.parametrize(("tokens", "groups"), [(98, 8), (49, 1), (196, 2), (50, 3), (10, 4)])
@pytest.mark.parametrize("permute", [False, True])
def test_sliced_attention_matches_the_plain_module(tokens: int, groups: int, permute: bool) -> None:
    """Unpadded layouts attend in SReT's C kernel (where it runs) or torch's, padded ones with a key
    mask; a gain is folded into the output projection."""
    torch.manual_seed(0)
    attn = SlicedAttention(64, 2)
    layout = token_groups(tokens, groups, torch.randperm(tokens) if permute else None)
    gain = torch.tensor([0.7], requires_grad=True)

    class WithLayout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.gain = attn, torch.nn.Parameter(gain)

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, layout, self.gain)

    assert_same(WithLayout(), torch.randn(3, tokens, 64))
    with torch.no_grad():
        x = torch.randn(2, tokens, 64)
        with kernels.disabled():
            ref = attn(x, layout)
        torch.testing.assert_close(attn(x, layout), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden", [37, 64, 230])
def test_mlp_matches_the_plain_module(hidden: int) -> None:
    """Hidden widths not a multiple of 8 run padded; the gain is folded into fc2."""
    torch.manual_seed(0)
    mlp = FeedForward(32, hidden)
    gain = torch.nn.Parameter(torch.tensor([1.3]))

    class WithGain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.gain = mlp, gain

        def forward(self, x: Tensor) -> Tensor:
            return self.mlp(x, self.gain)

    assert_same(WithGain(), torch.randn(2, 7, 32))


def test_mlp_training_keeps_one_hidden_tensor() -> None:
    """Autograd would hold fc1's output and its GELU for backward; the kernel holds only the former
    (the GELU is recomputed in backward)."""
    mlp = FeedForward(16, 40)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def hidden_tensors_saved(plain: bool) -> int:
        shapes = []
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t)
        with hooks, kernels.disabled() if plain else torch.enable_grad():
            mlp(x)
        return sum(shape.numel() == 2 * 5 * 40 for shape in shapes)  # activations, not weights

    assert (hidden_tensors_saved(False), hidden_tensors_saved(True)) == (1, 2)


def test_scaled_residual_matches_addcmul() -> None:
    x, branch = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    skip = torch.tensor([0.7], requires_grad=True)
    g = torch.randn(2, 5, 8)
    ours, plain = kernels.scaled_residual(x, branch, skip), skip * x + branch
    torch.testing.assert_close(ours, plain)
    for a, b in zip(
        torch.autograd.grad(ours, (x, branch, skip), g),
        torch.autograd.grad(plain, (x, branch, skip), g),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_stem_matches_the_plain_module_and_keeps_non_finite_values() -> None:
    """BatchNorm folded and ReLU fused in eval; a NaN image gives NaN alone, whatever the batch."""
    torch.manual_seed(0)
    stem = ConvStem(3, 64)
    for bn in (stem.bn1, stem.bn2, stem.bn3):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    stem.eval()
    x = torch.randn(4, 3, 224, 224)
    x[1, 0, 5, 5] = float("nan")
    with torch.no_grad():
        ours = stem(x)
        with kernels.disabled():
            ref = stem(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert ours[1].isnan().any() and not ours[[0, 2, 3]].isnan().any()


def test_attention_fallback_matches_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without SReT's kernel, groups of any length attend through torch's SDPA: its outputs and
    gradients."""
    monkeypatch.setattr(native, "applies", lambda *a: False)
    for tokens in (49, 98):
        qkv = torch.randn(2, 2 * tokens, 3 * 64, requires_grad=True)
        with torch.profiler.profile() as prof:
            ours = kernels.attend(qkv, 2, 2, 32**-0.5)
        assert any("scaled_dot_product" in e.name for e in prof.events())
        q, k, v = qkv.reshape(4, tokens, 3, 2, 32).permute(2, 0, 3, 1, 4).unbind(0)
        ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 2 * tokens, 64)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ref)
        torch.testing.assert_close(
            torch.autograd.grad(ours, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0], rtol=1e-4, atol=1e-5
        )


@pytest.mark.skipif(not onednn.ONEDNN_OPS, reason="this torch build has no oneDNN fused ops")
def test_onednn_runs_where_it_gains_and_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = SReT(tiny_cfg()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), torch.profiler.profile() as prof:
        model(x)  # products this small cost more through oneDNN: torch's ops run
    assert not any("pointwise" in e.name for e in prof.events())
    monkeypatch.setattr(onednn, "ONEDNN_MIN_MACS", 0)
    with torch.no_grad(), torch.profiler.profile() as prof:
        out = model(x)
    calls = [e.name for e in prof.events() if "pointwise" in e.name]
    assert any("_linear_pointwise" in c for c in calls) and any("_convolution_pointwise" in c for c in calls)
    with torch.no_grad(), monkeypatch.context() as torch_only:
        torch_only.setattr(onednn, "ONEDNN_OPS", False)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    model.train()
    ours = outputs_and_grads(model, x, plain=False)
    monkeypatch.setattr(onednn, "ONEDNN_OPS", False)
    theirs = outputs_and_grads(model, x, plain=False)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_model_matches_the_plain_modules_in_training() -> None:
    """Every kernel together (permutations, residuals, MLPs, attention, with padded groups): the loss
    and every gradient of the plain modules."""
    torch.manual_seed(0)
    assert_same(SReT(tiny_cfg()).train(), torch.randn(2, 3, 32, 32), atol=1e-4)


# ---- bf16 under autocast ------------------------------------------------------------------------------
# Relative L2 error allowed against the fp32 result, for an output or a gradient: bf16 keeps 8
# significant bits (a rounding of up to 2^-9 relative per stored value), and a layer stores its
# operands, its products and, in backward, the gradients once or twice each. The kernels and the plain
# modules under autocast round in different places, so each is held to this bound against fp32 rather
# than to the other.
BF16_RTOL = 2e-2


def relative_error(a: Tensor, ref: Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def assert_bf16_close(module: torch.nn.Module, *inputs: Tensor) -> None:
    """Output and every gradient under bf16 autocast, through the kernels and through the plain
    modules, each within BF16_RTOL of the plain fp32 result."""
    ref, ref_grads = outputs_and_grads(module, *inputs, plain=True)
    for plain in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = outputs_and_grads(module, *inputs, plain=plain)
        assert relative_error(out, ref) < BF16_RTOL, ("plain" if plain else "kernels", "output")
        for i, (a, b) in enumerate(zip(grads, ref_grads, strict=True)):
            if b is not None and b.any():
                assert relative_error(a, b) < BF16_RTOL, ("plain" if plain else "kernels", "grad", i)


@pytest.mark.parametrize(("tokens", "groups", "permute"), [(98, 8, True), (196, 2, False), (50, 3, True)])
def test_sliced_attention_in_bf16_matches_fp32(tokens: int, groups: int, permute: bool) -> None:
    torch.manual_seed(0)
    attn = SlicedAttention(64, 2)
    layout = token_groups(tokens, groups, torch.randperm(tokens) if permute else None)

    class WithLayout(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.gain = attn, torch.nn.Parameter(torch.tensor([0.7]))

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, layout, self.gain)

    assert_bf16_close(WithLayout(), torch.randn(3, tokens, 64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: a bf16 result
        assert attn(torch.randn(2, tokens, 64), layout).dtype == torch.bfloat16


@pytest.mark.parametrize("hidden", [37, 64])
def test_mlp_in_bf16_matches_fp32(hidden: int) -> None:
    torch.manual_seed(0)
    mlp = FeedForward(32, hidden)

    class WithGain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.gain = mlp, torch.nn.Parameter(torch.tensor([1.3]))

        def forward(self, x: Tensor) -> Tensor:
            return self.mlp(x, self.gain)

    assert_bf16_close(WithGain(), torch.randn(2, 7, 32))


def test_model_in_bf16_is_as_close_to_fp32_as_autocast_is() -> None:
    """Every kernel together under autocast. Through a whole model in training the gradients drift
    further from fp32 than one layer's (BatchNorm's batch statistics in the stem cancel large terms),
    so the kernels are held to the plain modules' own distance from fp32 under autocast (with 25 %
    slack), and the output to BF16_RTOL; the gradients reach the fp32 parameters in fp32."""
    torch.manual_seed(0)
    model = SReT(tiny_cfg()).train()
    x = torch.randn(2, 3, 32, 32)
    ref, ref_grads = outputs_and_grads(model, x, plain=True)
    errors = {}
    for plain in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = outputs_and_grads(model, x, plain=plain)
        assert all(g.dtype == torch.float32 for g in grads[1:] if g is not None)
        flat = torch.cat([g.flatten() for g in grads[1:] if g is not None])
        flat_ref = torch.cat([g.flatten() for g in ref_grads[1:] if g is not None])
        errors[plain] = (
            relative_error(out, ref),
            relative_error(grads[0], ref_grads[0]),
            relative_error(flat, flat_ref),
        )
    assert errors[False][0] < BF16_RTOL
    for ours, autocast in zip(errors[False], errors[True], strict=True):
        assert ours <= 1.25 * autocast + 1e-3, errors
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert relative_error(model(x), ref) < BF16_RTOL


@needs_native
@needs_onednn_bf16
def test_bf16_layer_norm_writes_bf16_with_torch_gradients() -> None:
    """Under bf16 autocast the model's LayerNorms write bf16 (what the next product casts to anyway):
    the value within one bf16 rounding of fp32 LayerNorm, the gradients torch's LayerNorm backward
    gives for the same (bf16) incoming gradient, in fp32."""
    torch.manual_seed(0)
    norm = sret.model.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 9, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    ref = F.layer_norm(x, (48,), norm.weight, norm.bias, 1e-6)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2**-8, atol=1e-5)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, norm.weight, norm.bias], grad)
    refs = torch.autograd.grad(ref, [x, norm.weight, norm.bias], grad.float())
    for a, b in zip(ours, refs, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.equal(norm(x), ref)  # outside autocast: torch's LayerNorm


@needs_native
def test_bf16_attention_kernel_is_the_fp32_kernel_rounded() -> None:
    """The bf16 vector kernels widen exactly, compute in fp32 and round as torch rounds (to nearest
    even, NaN kept): bit for bit the fp32 kernels on the widened inputs, then `.bfloat16()`, forward
    (with the same log-sum-exp) and backward."""
    torch.manual_seed(0)
    for batch, groups, n, heads, depth in [(2, 4, 49, 2, 32), (1, 3, 10, 1, 40), (2, 1, 196, 4, 48)]:
        qkv = torch.randn(batch, groups * n, 3 * heads * depth).bfloat16()
        out, lse = native.attention_forward(qkv, groups, heads, depth**-0.5, True)
        ref, ref_lse = native.attention_forward(qkv.float(), groups, heads, depth**-0.5, True)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16()) and torch.equal(lse, ref_lse)
        grad = torch.randn_like(out)
        dqkv = native.attention_backward(grad, qkv, out, lse, groups, heads, depth**-0.5)
        ref = native.attention_backward(
            grad.float(), qkv.float(), out.float(), lse, groups, heads, depth**-0.5
        )
        assert dqkv.dtype == torch.bfloat16 and torch.equal(dqkv, ref.bfloat16())
    qkv = torch.randn(1, 8, 3 * 32).bfloat16()
    qkv[0, 3, 0] = float("nan")  # a NaN query attends to NaN; the other queries stay finite
    out, _ = native.attention_forward(qkv, 1, 1, 0.2, False)
    assert out[0, 3].isnan().all() and not out[0, [0, 1, 2, 4, 5, 6, 7]].isnan().any()


@needs_onednn_bf16
def test_pooling_stays_fp32_under_bf16_autocast() -> None:
    """The depthwise pooling convolution runs in fp32 under bf16 autocast (its fp32 kernels are the
    faster ones): the fp32 result and gradients exactly, and an fp32 output for the fp32 stream."""
    torch.manual_seed(0)
    pool = ConvPool(8, 16)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pool(x)
    ref = pool.conv(x)
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    grad = torch.randn_like(y)
    ours = torch.autograd.grad(y, [x, pool.conv.weight], grad)
    refs = torch.autograd.grad(ref, [x, pool.conv.weight], grad)
    assert all(torch.equal(a, b) for a, b in zip(ours, refs, strict=True))


# ---- the operators, as tools see them -----------------------------------------------------------------
def test_kernels_step_aside_for_fp16_autocast_and_compilers(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 autocast runs the kernels in bf16 where oneDNN has bf16 kernels, else the plain modules."""
    x = torch.randn(2, 3)
    assert kernels.active(x) and not kernels.active(x.double()) and kernels.precision() == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = onednn.ONEDNN_BF16
        assert kernels.active(x) is bf16 and kernels.active(x.bfloat16()) is bf16
        assert kernels.precision() == (torch.bfloat16 if bf16 else None)
        monkeypatch.setattr(onednn, "ONEDNN_BF16", False)
        assert not kernels.active(x) and kernels.precision() is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert not kernels.active(x) and kernels.precision() is None
    with kernels.disabled():
        assert not kernels.active(x)
    assert torch.compile(lambda t: t * kernels.active(t), fullgraph=True, backend="eager")(x).eq(0).all()


def test_every_choice_ends_in_an_unconditional_otherwise() -> None:
    """Each choice is one entry point's rows, the last taken when no other holds; only the gate's rows
    run nothing (`active` answers with the row it takes)."""
    for rows in kernels.CHOICES:
        last = rows[-1]
        assert last.when == "otherwise" and last.takes is always and last.ready is always
        assert len({path.entry for path in rows}) == 1
        assert all((path.run is None) is (rows is kernels.GATE) for path in rows)


def test_modules_with_dropout_or_batchnorm_run_plain_where_the_kernels_cannot() -> None:
    """The kernels drop nothing and fold BatchNorm's running statistics without a backward: a module
    with dropout runs plain in training, one with BatchNorm in training or under autograd."""
    x, image = torch.randn(2, 5, 16), torch.randn(1, 3, 16, 16)
    dropping, stem = FeedForward(16, 32, drop=0.1), ConvStem(3, 16)
    assert not kernels.active(x, dropping.train()) and kernels.active(x, dropping.eval())
    assert kernels.active(x, FeedForward(16, 32).train())  # dropout of 0 drops nothing
    assert not kernels.active(image, stem.eval())  # under autograd
    with torch.no_grad():
        assert kernels.active(image, stem) and not kernels.active(image, stem.train())


def test_summary_and_paths_describe_the_callers_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the entry points run in bf16 where oneDNN has bf16 kernels, and the plain
    modules in torch's autocast where it has none; the start line says which."""
    x = torch.empty(0)
    assert kernels.summary(x).startswith("sret.kernels: on, C kernels")
    ready = dict(((path.entry, path.runs), ready) for path, ready in kernels.paths())
    assert ready[kernels.ATTEND[0].entry, kernels.ATTEND[0].runs] is native.built()
    assert not ready[kernels.LAYER_NORM[0].entry, kernels.LAYER_NORM[0].runs]
    plain = f"sret.kernels: {kernels.GATE[2].runs} - {kernels.GATE[2].when}"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = onednn.ONEDNN_BF16
        if bf16:
            assert kernels.summary(x).startswith("sret.kernels: on in bf16 under autocast")
        else:
            assert kernels.summary(x) == plain
        gate = [ready for path, ready in kernels.paths() if path.entry == "active"]
        assert gate[2] is not bf16 and gate[-2] is bf16
        ready = dict(((path.entry, path.runs), ready) for path, ready in kernels.paths())
        assert ready[kernels.LAYER_NORM[0].entry, kernels.LAYER_NORM[0].runs] is (bf16 and native.built())
        monkeypatch.setattr(onednn, "ONEDNN_BF16", False)
        assert kernels.summary(x) == plain
    assert kernels.summary(x, compiled=True).endswith(kernels.GATE[1].when)
    assert kernels.active(x)  # describing a compiled step left nothing behind


def r(*shape: int) -> Tensor:
    return torch.randn(shape)


@pytest.mark.parametrize(
    ("op", "args"),
    [
        (torch.ops.sret.linear, (r(2, 5, 8), r(12, 8), r(12))),
        (torch.ops.sret.linear_backward, (r(2, 5, 12), r(2, 5, 8), r(12, 8), True)),
        (torch.ops.sret.mlp, (r(2, 5, 8), r(13, 8), r(13), r(8, 13), r(8), True)),
        (torch.ops.sret.mlp_backward, (r(2, 5, 8), r(2, 5, 8), r(2, 5, 16), r(13, 8), r(8, 13), True)),
        (torch.ops.sret.conv_bn_relu, (r(1, 3, 16, 16), [r(4, 3, 3, 3), r(8, 4, 3, 3)], [r(4), r(8)], 2, 1)),
    ],
)
def test_operators_pass_torch_opcheck(op, args) -> None:
    """Schema, fake implementation (shapes, strides, dtypes) and dispatch, as torch checks them."""
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_native
def test_attention_operators_pass_torch_opcheck() -> None:
    qkv = torch.randn(2, 4 * 49, 3 * 64)
    for args in ((qkv, 4, 2, 0.17, True), (qkv.bfloat16(), 4, 2, 0.17, False)):
        torch.library.opcheck(
            torch.ops.sret.sliced_attention, args, test_utils=("test_schema", "test_faketensor")
        )
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = torch.ops.sret.sliced_attention(qkv.to(dtype), 4, 2, 0.17, True)
        args = (torch.randn_like(out), qkv.to(dtype), out, lse, 4, 2, 0.17)
        torch.library.opcheck(
            torch.ops.sret.sliced_attention_backward, args, test_utils=("test_schema", "test_faketensor")
        )


@needs_native
def test_norm_pass_operators_pass_torch_opcheck() -> None:
    x = torch.randn(2, 5, 24)
    for keep in (True, False):
        args = (x, r(24), r(24), 1e-6, keep)
        torch.library.opcheck(torch.ops.sret.layer_norm, args, test_utils=("test_schema", "test_faketensor"))
    y, mean, rstd = torch.ops.sret.layer_norm(x, r(24), r(24), 1e-6, True)
    for grad in (torch.randn_like(y), torch.randn(2, 24, 5).transpose(1, 2)):  # the kernel, torch
        args = (grad, x, mean, rstd, r(24))
        torch.library.opcheck(
            torch.ops.sret.layer_norm_backward, args, test_utils=("test_schema", "test_faketensor")
        )
    args = (x, torch.randn_like(x).bfloat16(), r(1))
    torch.library.opcheck(
        torch.ops.sret.scaled_residual_bf16, args, test_utils=("test_schema", "test_faketensor")
    )


@needs_native
@pytest.mark.parametrize("name", ["sret_t", "sret_lt_noslice", "sret_s", "sret_nano", "sret_deep_100"])
def test_flop_counter_sees_the_kernels_with_their_real_cost(name: str) -> None:
    """A stock FlopCounterMode, kernels active, counts each zoo model's MACs within 1% of `sret info`."""
    model = sret.create_model(name).eval()
    x = torch.zeros(1, 3, *model.img_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.sret.sliced_attention] > 0 and counts[torch.ops.sret.mlp] > 0
    assert counter.get_total_flops() // 2 == pytest.approx(count_macs(model), rel=0.01)


def test_flop_counter_counts_the_backward_operators() -> None:
    model = SReT(tiny_cfg())
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.sret.mlp_backward] == 2 * counts[torch.ops.sret.mlp]
    assert counts[torch.ops.sret.linear_backward] == 2 * counts[torch.ops.sret.linear]


def test_fake_tensors_run_the_whole_model() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = SReT(tiny_cfg())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 3, 32, 32))
        model.eval()
        assert model(x).shape == (2, 5)
        model.train()
        model(x).sum().backward()


def test_torch_func_grad_through_the_kernels_equals_autograd() -> None:
    torch.manual_seed(0)
    model = SReT(tiny_cfg()).eval()  # BatchNorm's running statistics would be a mutation under the transform
    x = torch.randn(2, 3, 32, 32)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    model.zero_grad()
    with kernels.disabled():
        model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_without_onednn_bf16_runs_the_plain_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU whose oneDNN has no bf16 kernels (AVX2 only), bf16 autocast leaves every fast path to
    the plain modules: autocast's own dtypes (fp32 LayerNorm, bf16 pooling) and torch's values."""
    monkeypatch.setattr(onednn, "ONEDNN_BF16", False)
    torch.manual_seed(0)
    norm, pool = sret.model.LayerNorm(48, eps=1e-6), ConvPool(8, 16)
    x, image = torch.randn(2, 9, 48), torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.precision() is None and not kernels.active(x)
        y, pooled = norm(x), pool(image)
        ref_y, ref_pooled = F.layer_norm(x, (48,), norm.weight, norm.bias, 1e-6), pool.conv(image)
    assert y.dtype == ref_y.dtype == torch.float32 and torch.equal(y, ref_y)
    assert pooled.dtype == ref_pooled.dtype == torch.bfloat16 and torch.equal(pooled, ref_pooled)


@pytest.mark.skipif(native.isa() != "AVX512", reason="checks the AVX2 build from an AVX-512 CPU")
def test_kernel_tests_pass_held_to_avx2() -> None:
    """This file's and test_native.py's tests in one process where torch runs at AVX2
    (`ATEN_CPU_CAPABILITY=avx2`), as on an AVX2-only CPU: the C kernels built for AVX2 (8-float
    vectors, masks as vectors) and every selection that follows the capability."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    files = [__file__, str(Path(__file__).with_name("test_native.py"))]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "not held_to_avx2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout, done.stdout[-500:]
