"""Benchmark smoke tests: the report has every field with sane values (timings are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from sret import kernels
from sret.bench import (
    AttentionTimer,
    BenchConfig,
    Contender,
    PartTimer,
    build_model,
    contenders,
    kernel_paths,
    model_parts,
    run_benchmark,
)
from sret.cli import app
from sret.kernels import native, onednn

ROW_FIELDS = {
    "model",
    "label",
    "reference",
    "mode",
    "grad_checkpointing",
    "batch",
    "img_size",
    "params_m",
    "gmacs",
    "latency_ms",
    "latency_min_ms",
    "images_per_s",
    "gflops",
    "peak_fraction",
    "ratio_to_reference",
    "activation_mem_mib",
    "peak_mem_mib",
    "attention_ms",
    "parts",
    "outside_parts_ms",
    "latencies_ms",
}


def test_cli_bench_json_inference() -> None:
    args = ["bench", "sret_nano", "--img-size", "32", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    args += ["--no-memory", "--json"]  # memory children are covered by the training test
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"device", "torch", "threads", "config", "matmul_peak_gflops", "rows", "comparisons"} <= set(doc)
    assert doc["matmul_peak_gflops"] > 0 and doc["threads"] >= 1
    assert doc["sret_kernels"] == kernels.summary(torch.empty(0))  # eager fp32 CPU inference: on
    assert [(r["entry"], r["runs"], r["ready"]) for r in doc["sret_paths"]] == [
        (path.entry, path.runs, ready) for path, ready in kernels.paths()
    ]
    labels = [r["label"] for r in doc["rows"]]
    assert labels == ["sret_nano", "deit_tiny_patch16_224", "pit_ti_224"]
    for row in doc["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["mode"] == "infer" and row["img_size"] == 32
        for key in ("params_m", "gmacs", "latency_ms", "images_per_s", "gflops", "peak_fraction"):
            assert row[key] > 0, key
        assert row["activation_mem_mib"] is None and row["peak_mem_mib"] is None
    assert doc["rows"][1]["ratio_to_reference"] == 1.0
    assert any(c["what"].startswith("sret_nano GFLOP/s / deit_tiny") for c in doc["comparisons"])


def test_training_with_checkpointing_comparison() -> None:
    cfg = BenchConfig(batch=2, img_size=32, train=True, warmup=0, repeats=1)
    entries = contenders(["sret_nano"], references=(), compare_checkpointing=True)
    doc = run_benchmark(entries, cfg)
    assert doc["sret_kernels"].startswith("sret.kernels: on")  # eager fp32 CPU training
    json.dumps(doc)  # serialisable as is
    assert [r["label"] for r in doc["rows"]] == ["sret_nano", "sret_nano +ckpt"]
    assert [r["grad_checkpointing"] for r in doc["rows"]] == [False, True]
    assert doc["train_mac_factor"] == 3
    for row in doc["rows"]:
        assert row["mode"] == "train" and row["gflops"] > 0
        assert row["peak_mem_mib"] > row["activation_mem_mib"] > 0
        assert row["ratio_to_reference"] is None
    whats = {c["what"] for c in doc["comparisons"]}
    assert "sret_nano: step time with / without checkpointing" in whats
    assert "sret_nano: activation memory without / with checkpointing" in whats


def test_every_model_gets_the_same_drop_path_rate() -> None:
    """timm's references default to no stochastic depth and SReT to 0.1: a training step would then do
    different work, so the bench sets one rate for all."""
    from timm.layers import DropPath

    def rates(model: torch.nn.Module) -> list[float]:
        return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]

    cfg = BenchConfig(drop_path=0.2, img_size=32)
    sret_model, _ = build_model(Contender("sret_nano"), cfg)
    deit, _ = build_model(Contender("deit_tiny_patch16_224"), cfg)
    assert rates(sret_model) == rates(timm.create_model("sret_nano", drop_path_rate=0.2))
    assert max(rates(deit)) == pytest.approx(0.2)


def test_models_without_stochastic_depth_or_img_size_still_build() -> None:
    model, size = build_model(Contender("dla34"), BenchConfig(img_size=64))
    assert size == 64 and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--img-size", "0"], "img_size must be >= 1, got 0"),
        (["--img-size", "8"], "sret_nano cannot run at img_size 8: stage 0 has 1 tokens"),
        (["--img-size", "12", "--no-reference", "deit_tiny_patch16_224"], "deit_tiny_patch16_224 cannot run"),
    ],
)
def test_cli_bench_bad_configurations_are_one_line_errors(args: list[str], message: str) -> None:
    """Caught before any timing: the model runs once on one image while its MACs are counted."""
    result = CliRunner().invoke(app, ["bench", "sret_nano", "--no-memory", "--repeats", "1", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.count("error:") == 1


def test_attention_timer_counts_forward_and_backward_and_restores_sdpa() -> None:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    timer = AttentionTimer()
    q, k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(3))
    with timer.timing():
        out = torch.nn.functional.scaled_dot_product_attention(q * 1, k, v)
    forward = timer.seconds
    assert forward > 0 and torch.nn.functional.scaled_dot_product_attention is sdpa
    out.sum().backward()
    assert timer.seconds > forward  # the backward hooks fired
    attend = kernels.attend
    qkv = torch.randn(2, 16, 3 * 16, requires_grad=True)
    with timer.timing():  # SReT's entry point (its own C kernel where it runs, else SDPA)
        out = kernels.attend(qkv * 1, 2, 2, 8**-0.5)
    forward = timer.seconds
    assert forward > 0 and kernels.attend is attend
    out.sum().backward()
    assert timer.seconds > forward
    with timer.timing():  # a new step starts from zero
        assert timer.seconds == 0.0


@pytest.mark.parametrize("train", [False, True])
def test_bench_reports_attention_time_per_model(train: bool) -> None:
    cfg = BenchConfig(
        batch=2, img_size=32, train=train, warmup=0, repeats=2, memory=False, attention_time=True
    )
    doc = run_benchmark(contenders(["sret_nano"], references=("deit_tiny_patch16_224",)), cfg)
    for row in doc["rows"]:
        assert 0 < row["attention_ms"] < row["latency_ms"]
    assert any("attention ms / deit_tiny" in c["what"] for c in doc["comparisons"])
    with pytest.raises(ValueError, match="needs --device cpu and no --compile"):
        BenchConfig(attention_time=True, compile=True)


def test_model_parts_open_module_lists_and_skip_parameterless_modules() -> None:
    model, _ = build_model(Contender("sret_nano"), BenchConfig(img_size=32))
    names = [name for name, _ in model_parts(model)]
    assert names == ["patch_embed", "stages.0", "stages.1", "stages.2", "pools.0", "pools.1", "norm", "head"]
    deit, _ = build_model(Contender("deit_tiny_patch16_224"), BenchConfig(img_size=32))
    assert [name for name, _ in model_parts(deit)] == ["patch_embed", "blocks", "norm", "head"]


def test_part_timer_times_backward_of_tuple_outputs_and_inputs_without_gradient() -> None:
    """PiT's stages pass (tokens, class token) tuples, of which only the class token reaches the loss;
    its patch embedding is fed images, which need no gradient: both still get a backward time."""
    model, _ = build_model(Contender("pit_ti_224"), BenchConfig(img_size=64))
    timer = PartTimer(model)
    with timer.timing():
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert set(timer.forward) == {"patch_embed", "transformers", "norm", "head"}
    assert all(t > 0 for t in timer.forward.values())
    assert all(t > 0 for t in timer.backward.values()), timer.backward
    with timer.timing():  # a new step starts from zero
        assert set(timer.forward.values()) == set(timer.backward.values()) == {0.0}


@pytest.mark.parametrize("train", [False, True])
def test_bench_reports_time_and_macs_per_part(train: bool) -> None:
    cfg = BenchConfig(batch=2, img_size=32, train=train, warmup=0, repeats=2, memory=False, part_time=True)
    doc = run_benchmark(contenders(["sret_nano"], references=("deit_tiny_patch16_224",)), cfg)
    json.dumps(doc)
    for row in doc["rows"]:
        parts = row["parts"]
        # every MAC of the model happens inside one part (position embeddings and pooling of
        # tokens cost none)
        assert sum(p["macs"] for p in parts) == pytest.approx(row["gmacs"] * 1e9, rel=1e-9)
        assert all(p["forward_ms"] > 0 for p in parts)
        assert all((p["backward_ms"] > 0) if train else p["backward_ms"] is None for p in parts)
        assert sum(p["forward_ms"] + (p["backward_ms"] or 0) for p in parts) < row["latency_ms"]
        assert 0 < row["outside_parts_ms"] < row["latency_ms"]
        assert all(p["gflops"] is None if p["macs"] == 0 else p["gflops"] > 0 for p in parts)
    with pytest.raises(ValueError, match="needs --device cpu and no --compile"):
        BenchConfig(part_time=True, compile=True)


def test_bench_says_what_runs_under_autocast_and_compile() -> None:
    """The kernels' own description, in the step's context: bf16 autocast runs the entry points in bf16
    where oneDNN has bf16 kernels and the plain modules elsewhere, compiled steps the plain modules,
    and the report says so."""
    amp, compiled = kernel_paths(BenchConfig(amp="bf16")), kernel_paths(BenchConfig(compile=True))
    says = "on in bf16 under autocast" if onednn.ONEDNN_BF16 else "the plain modules, in torch's autocast"
    assert amp["sret_kernels"].startswith(f"sret.kernels: {says}")
    assert compiled["sret_kernels"].startswith("sret.kernels: the plain modules - compiled")
    args = ["bench", "sret_nano", "--img-size", "32", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--no-memory", "--no-reference", "--amp", "bf16"])
    assert result.exit_code == 0, result.output
    assert says in result.output and "SReT's paths" in result.output


def test_cli_bench_prints_the_part_table() -> None:
    args = ["bench", "sret_nano", "--img-size", "32", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    result = CliRunner().invoke(app, [*args, "--no-memory", "--no-reference", "--train", "--part-time"])
    assert result.exit_code == 0, result.output
    assert "time per part" in result.output and "(rest)" in result.output
    assert all(f"stages.{i}" in result.output for i in range(3))


OTHER_IMPLEMENTATION = """
import timm
from timm.models import register_model
from torch import nn


class Wrapped(nn.Module):  # an older-timm style constructor: no **kwargs
    def __init__(self, drop_path_rate=0.0, img_size=224):
        super().__init__()
        self.inner = timm.create_model("sret_nano", drop_path_rate=drop_path_rate, img_size=img_size)

    def forward(self, x):
        return self.inner(x)


@register_model
def SReT_Nano(pretrained=False, **kwargs):  # hands timm's pretrained_cfg on, as old entry points do
    return Wrapped(**kwargs)
"""


def test_bench_times_a_model_from_a_file_beside_ours(tmp_path) -> None:
    """`--model-file` imports a file registering timm models (an entry point written for older timm
    included); a model of the same name in another implementation gets an images/s ratio, and the
    memory children import the file too."""
    path = tmp_path / "other.py"
    path.write_text(OTHER_IMPLEMENTATION)
    args = ["bench", "sret_nano", "SReT_Nano", "--model-file", str(path), "--no-reference"]
    args += ["--img-size", "32", "--batch", "2", "--warmup", "0", "--repeats", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["model"] for r in doc["rows"]] == ["sret_nano", "SReT_Nano"]
    assert doc["rows"][1]["peak_mem_mib"] > 0
    assert any(c["what"] == "sret_nano images/s / SReT_Nano images/s" for c in doc["comparisons"])


def test_bench_model_file_errors_name_the_file(tmp_path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import a_package_that_is_not_installed\n")
    for path, message in ((broken, "could not import"), (tmp_path / "absent.py", "model file(s) not found")):
        result = CliRunner().invoke(app, ["bench", "sret_nano", "--model-file", str(path), "--no-memory"])
        assert result.exit_code == 2 and message in result.output and str(path.name) in result.output
        assert "Traceback" not in result.output


def test_bench_compares_sret_with_its_plain_modules() -> None:
    """`--compare-plain` runs each SReT model a second time with the kernels off (a reference model
    only once), and prints the ratio: a fast path slower than torch's own shows below 1."""
    entries = contenders(["sret_nano"], references=("deit_tiny_patch16_224",), compare_plain=True)
    assert [e.label for e in entries] == ["sret_nano", "sret_nano plain", "deit_tiny_patch16_224"]
    cfg = BenchConfig(batch=2, img_size=32, warmup=0, repeats=1, memory=False)
    doc = run_benchmark(entries, cfg)
    assert any(c["what"] == "sret_nano images/s / sret_nano plain images/s" for c in doc["comparisons"])
    assert kernels.active(torch.empty(0))  # the plain step switched them off only inside itself


def _cpu_calls():
    """benchmarks/cpu_calls.py as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_calls.py"
    spec = importlib.util.spec_from_file_location("cpu_calls", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_calls_reads_the_shapes_the_step_runs() -> None:
    stages = _cpu_calls().stage_shapes(timm.create_model("sret_t"), batch=2)
    assert [s["rows"] for s in stages] == [2 * 784, 2 * 196, 2 * 49]
    assert stages[0]["linears"] == [(64, 64), (64, 192), (64, 232), (232, 64)]  # fc1 230 padded to 232
    assert [s["attention"] for s in stages] == [[(2, 392), (8, 98)], [(1, 196), (4, 49)], [(1, 49)]]
    assert [s["fc1"] for s in stages] == [[232], [464], [928]]


def test_cpu_calls_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "calls.json"
    argv = ["cpu_calls.py", "--model", "sret_nano", "--batch", "2", "--repeats", "1", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    _cpu_calls().main()
    result = json.loads(out.read_text())
    assert result["model"] == "sret_nano" and result["matmul_peak_gflops"] > 0
    assert result["products"] and result["gelu_epilogue"] and len(result["stem"]) == 3
    assert all(row["forward_ms"] > 0 for row in result["products"] + result["stem"])
    assert result["stem"][0]["input_grad_ms"] is None  # the image needs no gradient
    assert bool(result["attention"]) == (native.library() is not None)
