"""Relaxed recursion: per-loop adapters, and `sret recursify` of our models and of timm ViTs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

import sret
from sret.checkpoint import model_from_weights, read_metadata
from sret.cli import app
from sret.evaluate import evaluate
from sret.export import ExportRefused, export_model
from sret.info import active_params, count_macs, info_source, model_info
from sret.kernels import disabled
from sret.model import LoopAdapter, SReT, SReTConfig, StageConfig
from sret.recursify import compare, convert, from_vit, recursify, recursify_file
from sret.train import resolve_config, train


def flat(**kw) -> SReT:
    """A non-recursive SReT (every block once, NLL after each) with trained-looking, distinct blocks."""
    stages = (
        StageConfig(16, 2, blocks=4, loops=1, groups=(2,), permute=(False,)),
        StageConfig(32, 4, blocks=2, loops=1, groups=(1,), permute=(False,)),
    )
    torch.manual_seed(0)
    model = SReT(SReTConfig(stages, img_size=32, num_classes=5, shuffle="fixed", drop_path_rate=0.0, **kw))
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms start at 1/0 and coefficients at 1: make them differ
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def relaxed(rank: int | str, vectors: bool = False, loops: int = 2) -> SReT:
    stages = (
        StageConfig(
            16, 2, blocks=1, loops=loops, groups=(2,) * loops, permute=(False,) + (True,) * (loops - 1)
        ),
        StageConfig(32, 4, blocks=2, loops=loops, groups=(1,) * loops, permute=(False,) * loops),
    )
    torch.manual_seed(0)
    cfg = SReTConfig(stages, img_size=32, num_classes=5, shuffle="fixed", drop_path_rate=0.0)
    return SReT(cfg, loop_lora_rank=rank, loop_vectors=vectors).eval()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- adapters in the model -----------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "vectors"), [(0, True), (3, False), (3, True), ("full", False)])
def test_a_new_adapter_changes_nothing_and_adds_exactly_its_size(rank: int | str, vectors: bool) -> None:
    paper, model = relaxed(0), relaxed(rank, vectors)
    missing, unexpected = model.load_state_dict(paper.state_dict(), strict=False)
    assert not unexpected and all(".adapters." in k for k in missing)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), paper(x))  # a zero delta is exactly the paper's model
    expected = 0
    for stage in paper.stages:
        block_vectors = sum(p.numel() for p in stage.blocks[0].parameters() if p.ndim == 1)
        for application in stage.schedule:
            block = stage.blocks[application.block]
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                out, inp = block.get_submodule(path).weight.shape
                expected += 0 if rank == 0 else out * inp if rank == "full" else rank * (out + inp)
            expected += block_vectors if vectors else 0
    assert n_params(model) - n_params(paper) == expected
    info = model_info("sret_nano", loop_lora_rank=rank, loop_vectors=vectors)
    assert info.params_by_component["adapters"] == info.params - model_info("sret_nano").params


def test_rank_zero_without_vectors_is_the_paper_model() -> None:
    model = relaxed(0)
    assert not model.cfg.adapted and all(len(s.adapters) == 0 for s in model.stages)
    assert all(app.adapter is None for s in model.stages for app in s.schedule)


def test_adapters_are_part_of_the_schedule_and_follow_anytime_depth() -> None:
    model = relaxed(2, loops=2)
    stage = model.stages[1]
    assert [(a.block, a.loop, a.adapter) for a in stage.schedule] == [
        (0, 0, 0),
        (0, 1, 1),
        (1, 0, 2),
        (1, 1, 3),
    ]
    model.set_loops(3)  # a loop beyond the trained ones runs the last trained loop's adapter
    assert [a.adapter for a in model.stages[1].schedule] == [0, 1, 1, 2, 3, 3]
    model.set_loops(1)
    assert [a.adapter for a in model.stages[1].schedule] == [0, 2]
    idle = sum(
        p.numel()
        for s in model.stages
        for i in (1, 3)
        if i < len(s.adapters)
        for p in s.adapters[i].parameters()
    )
    nll_idle = sum(p.numel() for s in model.stages for p in s.nlls[0::2].parameters())
    assert active_params(model) == n_params(model) - idle - nll_idle


def test_adapters_train_through_the_kernels_as_through_plain_torch() -> None:
    model = relaxed(3, vectors=True).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for ctx in (disabled, torch.enable_grad):
        model.zero_grad()
        torch.manual_seed(1)
        with ctx():
            model(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if ".adapters." in n})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_macs_of_the_adapters_are_counted_like_any_op() -> None:
    model = relaxed(4)
    # each application's merge up @ down is one (out x r) @ (r x in) product
    merge = sum(
        4 * block.get_submodule(path).weight.numel()
        for s in model.stages
        for app in s.schedule
        for block in [s.blocks[app.block]]
        for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert count_macs(model) - count_macs(relaxed(0)) == merge


def test_impossible_adapters_are_one_error() -> None:
    with pytest.raises(
        ValueError, match=r"loop_lora_rank 17 exceeds the rank of stage 0's qkv layer \(48, 16\)"
    ):
        relaxed(17)
    with pytest.raises(ValueError, match="loop_lora_rank must be"):
        relaxed(-1)
    with pytest.raises(ValueError, match="loop_lora_targets must name"):
        SReT(relaxed(0).cfg, loop_lora_rank=2, loop_lora_targets=("qkv", "fc3"))
    only = SReT(relaxed(0).cfg, loop_lora_rank=2, loop_lora_targets=["qkv"])
    assert isinstance(only.stages[0].adapters[0], LoopAdapter)
    assert set(only.stages[0].adapters[0].weights) == {"qkv"}


# ---- recursify -----------------------------------------------------------------------------------
def test_one_loop_reproduces_the_source() -> None:
    source = flat()
    model = recursify(source, 1)
    diff, scale, agreement = compare(source, model)
    assert diff <= 1e-5 * scale and agreement == 1.0


@pytest.mark.parametrize("init", ["average", "first"])
def test_two_loops_at_full_rank_reproduce_the_source(init: str) -> None:
    source = flat()
    for rank in ("full", 16):  # 16 is every layer's full rank in stage 0, not in stage 1
        result = convert(source, 2, rank, init)
        assert result.model.cfg.loop_vectors  # the tied blocks' norms and biases differ: kept
        if rank == "full":
            assert result.max_abs_diff <= 1e-5 * result.logit_scale
    tied = convert(source, 2, 0, init)
    low = convert(source, 2, 4, init)
    assert tied.max_abs_diff > low.max_abs_diff > 0  # reported: the gap a fine-tuning must close
    assert tied.params_after < low.params_after < n_params(source)


def test_the_shared_weight_is_the_average_and_the_deltas_its_svd() -> None:
    source = flat()
    model = recursify(source, 2, rank=2)
    a, b = (source.stages[0].blocks[i].attn.qkv.weight for i in (0, 1))
    shared = model.stages[0].blocks[0].attn.qkv.weight
    torch.testing.assert_close(shared, (a + b) / 2)
    delta = model.stages[0].adapters[1].weights["qkv"]()
    u, s, vh = torch.linalg.svd((b - shared).double())
    torch.testing.assert_close(delta.double(), (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-5, atol=1e-6)


def test_impossible_conversions_are_one_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage 1 has 2 blocks, which 4 loops do not divide"):
        recursify(flat(), 4)
    with pytest.raises(ValueError, match="exceeds the rank of stage 0's qkv layer"):
        recursify(flat(), 2, rank=17)
    with pytest.raises(ValueError, match="blocks each run once; stage 0 runs its blocks 2 times"):
        recursify(relaxed(0), 2)
    path = tmp_path / "src.safetensors"
    sret.save_weights(flat(), path, "sret_nano", sret.recursify.checkpoint_args(flat(), "sret_nano"))
    runner = CliRunner()
    out = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["recursify", str(path), "--loops", "3", "--out", str(out)])
    assert result.exit_code == 1 and "4 blocks, which 3 loops do not divide" in result.output
    assert not out.exists()


# ---- files, the CLI and fine-tuning --------------------------------------------------------------
@pytest.fixture(scope="module")
def flat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run of a non-recursive sret_nano (2 blocks per stage, each once)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve_config(
        "digits", output=str(out), name="flat", epochs=1, train_subset=128, val_subset=64, threads=1,
        model_args={"loops": 1, "blocks": 2},
    )  # fmt: skip
    return train(cfg)


def test_cli_recursify_writes_a_checkpoint_that_evaluates_and_fine_tunes(
    flat_run: Path, tmp_path: Path
) -> None:
    source = flat_run / "last.safetensors"
    out = tmp_path / "relaxed.safetensors"
    result = CliRunner().invoke(app, ["recursify", str(source), "-L", "2", "-r", "full", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "params: " in result.output and "top-1 agreement 100%" in result.output
    meta = read_metadata(out)
    assert meta["model_args"]["loop_lora_rank"] == "full" and meta["info"]["classes"]
    model, _ = model_from_weights(out)
    original, _ = model_from_weights(source)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - original(x)).abs().max() <= 1e-5 * original(x).abs().max()
    name, args = info_source(str(out))
    assert model_info(name, **args).params == n_params(model)
    shown = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["params"] == n_params(model)

    cfg = resolve_config("digits", checkpoint=str(out), output=str(tmp_path), name="ft", epochs=1,
                         train_subset=64, val_subset=32, threads=1)  # fmt: skip
    assert cfg.model_args["loop_lora_rank"] == "full"  # the architecture came from the checkpoint
    tuned, _ = model_from_weights(train(cfg) / "last.safetensors")
    assert tuned.cfg.loop_lora_rank == "full" and tuned.loops == (2, 2, 2)


def test_relaxed_models_export_exactly_except_to_torchscript(flat_run: Path, tmp_path: Path) -> None:
    _, path = recursify_file(str(flat_run / "last.safetensors"), 2, 4, out=tmp_path / "r4.safetensors")
    result = export_model(path, "exported-program", tmp_path / "r4.pt2", shuffle="fixed")
    assert result.max_abs_diff <= 1e-4
    with pytest.raises(ExportRefused, match="TorchScript"):
        export_model(path, "torchscript", tmp_path / "r4.ts", shuffle="fixed")


# ---- timm ViTs -----------------------------------------------------------------------------------
def test_an_average_pooled_vit_converts_exactly() -> None:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=64,
        num_classes=7,
        class_token=False,
        global_pool="avg",
        init_values=0.5,
    ).eval()
    plain = from_vit(vit)
    diff, scale, agreement = compare(vit, plain)
    assert diff <= 1e-5 * scale and agreement == 1.0
    relaxed_vit = convert(vit, 3, "full")
    assert relaxed_vit.max_abs_diff <= 1e-5 * relaxed_vit.logit_scale
    assert relaxed_vit.model.cfg.stages[0].blocks == 4 and relaxed_vit.model.loops == (3,)


def test_a_class_token_vit_converts_with_its_gap_reported() -> None:
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=7).eval()
    result = convert(deit, 2, 8)
    assert result.max_abs_diff > 0 and result.params_after < result.params_before
    with pytest.raises(ValueError, match="layers SReT does not"):
        from_vit(timm.create_model("vit_tiny_patch16_224", img_size=64, qk_norm=True))


def test_a_converted_file_is_scored_on_its_source_runs_held_out_split(flat_run: Path, tmp_path: Path) -> None:
    _, path = recursify_file(str(flat_run / "last.safetensors"), 2, "full", out=tmp_path / "full.safetensors")
    source = evaluate(flat_run / "last.safetensors")
    converted = evaluate(path)  # no config.yaml beside it: the split comes from its metadata
    assert converted.acc1 == source.acc1 and converted.loss == pytest.approx(source.loss, rel=1e-4)
