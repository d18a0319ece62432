"""GPU paths: bf16 autocast, fused scaled_dot_product_attention kernels, torch.compile, training.

Skipped where no CUDA device is present (CI has none); `benchmarks/gpu.sh` runs them on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sret
from sret.train import final_metrics, resolve_config, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_SDPA = ("_flash_attention", "_efficient_attention", "_cudnn_attention")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 references in full precision: no TF32 in matmuls or convolutions; each test compiles from
    a clean torch.compile cache (graphs of one model class would otherwise carry over between tests)."""
    torch._dynamo.reset()
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def attention_ops(fn) -> set[str]:
    """Names of the scaled-dot-product-attention kernels `fn` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "dot_product" in e.key or "attention" in e.key}


@pytest.mark.parametrize("name", ["sret_t", "sret_t_noslice"])
def test_bf16_inference_runs_fused_attention_and_matches_fp32(name: str) -> None:
    torch.manual_seed(0)
    cpu = sret.create_model(name).eval()
    model = sret.create_model(name).eval()
    model.load_state_dict(cpu.state_dict())
    model.cuda()
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        ref = cpu(x)
        fp32 = model(x.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x.cuda())
            ops = attention_ops(lambda: model(x.cuda()))
    assert rel_err(fp32.cpu(), ref) < 1e-4
    assert bf16.dtype == torch.bfloat16 and rel_err(bf16.cpu(), ref) < 3e-2
    assert any(kernel in op for op in ops for kernel in FUSED_SDPA), ops
    assert not any("_math" in op for op in ops), ops


@pytest.mark.parametrize("shuffle", ["fixed", "random"])
def test_compile_fullgraph_eval_and_bf16_training(shuffle: str) -> None:
    torch.manual_seed(0)
    model = sret.create_model("sret_t", shuffle=shuffle, drop_path_rate=0.1).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(16, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (16,), device="cuda")

    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-4

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(compiled(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


def test_compiled_training_gradients_match_eager() -> None:
    """Same weights, batch and (fixed) permutation, no stochastic depth: inductor's gradients are
    eager's up to fp32 rounding. Compared over all parameters at once: the stem's conv biases feed a
    training-mode BatchNorm, so their true gradient is zero and what they get is rounding noise."""
    torch.manual_seed(0)
    model = sret.create_model("sret_t", shuffle="fixed", drop_path_rate=0.0).cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")

    def grads(fn) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), y).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    eager = grads(model)
    assert rel_err(grads(torch.compile(model, fullgraph=True)), eager) < 1e-3


@pytest.mark.parametrize(
    ("amp", "compile_"),
    [("bf16", "none"), ("fp16", "none"), ("bf16", "inductor")],
    ids=["bf16", "fp16", "compile"],
)
def test_sret_train_on_gpu(tmp_path: Path, amp: str, compile_: str) -> None:
    cfg = resolve_config(
        "digits",
        output=str(tmp_path),
        name="gpu",
        device="cuda",
        amp=amp,
        compile=compile_,
        epochs=10,
        warmup_epochs=1,
    )
    metrics = final_metrics(train(cfg))
    assert metrics["val_acc1"] > 0.5  # 10 classes; the full 40-epoch recipe reaches ~0.98


def test_grad_checkpointing_cuts_cuda_activation_memory() -> None:
    model = sret.create_model("sret_deep_100").cuda().train()
    x = torch.randn(8, 3, 224, 224, device="cuda")

    def activation_mib() -> float:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    plain = activation_mib()
    model.set_grad_checkpointing()
    assert plain / activation_mib() > 5
