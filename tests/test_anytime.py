"""Anytime depth: one set of weights at any loop count, anytime training and early exit."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

import sret
from sret.ablate import load_grid
from sret.anytime import early_exit, sample_loops
from sret.cli import app
from sret.evaluate import evaluate, macs_per_depth, predict
from sret.info import count_macs, model_info
from sret.kernels import native
from sret.model import RecursionSchedule, SReT, SReTConfig, StageConfig
from sret.train import resolve_config, train


def small(**kw) -> SReT:
    stages = (
        StageConfig(16, 2, blocks=1, loops=2, groups=(4, 2), permute=(False, True)),
        StageConfig(32, 4, blocks=2, loops=3, groups=(2, 1, 1), permute=(False,) * 3),
    )
    return SReT(
        SReTConfig(stages, img_size=32, num_classes=5, shuffle="fixed", drop_path_rate=0.0, **kw)
    ).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits run trained for anytime depth (sret_nano: 2 loops per stage)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve_config(
        "digits",
        output=str(out),
        name="anytime",
        epochs=2,
        train_subset=256,
        val_subset=128,
        threads=1,
        anytime="uniform",
        anytime_distill=0.5,
    )
    return train(cfg)


# ---- the schedule at any depth -------------------------------------------------------------------
def test_fewer_loops_keep_each_blocks_closing_nll_and_more_repeat_the_last_loop() -> None:
    stage = StageConfig(16, 2, blocks=2, loops=3, groups=(4, 2, 1), permute=(False, True, False))
    trained = RecursionSchedule.build(stage, "application")
    assert [(a.block, a.loop, a.nll, a.layout) for a in trained] == [
        (0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 3, 3), (1, 1, 4, 4), (1, 2, 5, 5),
    ]  # fmt: skip
    one = RecursionSchedule.build(stage, "application", loops=1)
    assert [(a.block, a.groups, a.nll, a.layout) for a in one] == [(0, 4, 2, 0), (1, 4, 5, 3)]
    five = RecursionSchedule.build(stage, "application", loops=5)
    assert [a.nll for a in five] == [0, 1, 2, 2, 2, 3, 4, 5, 5, 5]
    assert [a.groups for a in five][:5] == [4, 2, 1, 1, 1]
    assert [a.nll for a in RecursionSchedule.build(stage, "block", loops=4)] == [0] * 4 + [1] * 4


def test_one_model_runs_at_every_depth_without_reloading_and_comes_back_exactly() -> None:
    torch.manual_seed(0)
    model = small()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        outs = {}
        for k in (1, 2, 3, 4, (1, 3)):
            model.set_loops(k)
            outs[k] = model(x)
            torch.testing.assert_close(model(x), outs[k], rtol=0, atol=0)  # deterministic
        assert model.loops == (1, 3)
        model.set_loops(None)
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    assert not torch.allclose(outs[1], full)
    with pytest.raises(ValueError, match="one per stage"):
        model.set_loops((1, 2, 3))
    with pytest.raises(ValueError, match=">= 1"):
        model.set_loops(0)


def test_info_counts_params_and_macs_at_any_depth() -> None:
    """`sret info --loops k`: MACs as a stock FlopCounterMode counts them at that depth; fewer loops
    leave NLLs idle."""
    trained = model_info("sret_t")
    for k in (1, 2, 3):
        info = model_info("sret_t", loops=k)
        model = sret.create_model("sret_t", loops=k).eval()
        # SReT's kernels, where they run, are ops with flop formulas; else torch's math attention
        counted = contextlib.nullcontext() if native.library() else sdpa_kernel([SDPBackend.MATH])
        with torch.no_grad(), counted, FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, 224, 224))
        assert counter.get_total_flops() // 2 == pytest.approx(info.macs, rel=0.01)
        assert info.macs == count_macs(model)
        assert info.loops == (k, k, k) and info.params == trained.params
        assert (info.active_params < info.params) is (k == 1)
    assert model_info("sret_t", loops=2).macs == trained.macs
    assert model_info("sret_t", loops=3).macs > trained.macs


def test_cli_loops_options() -> None:
    runner = CliRunner()
    doc = json.loads(runner.invoke(app, ["info", "sret_nano", "--loops", "1", "--json"]).stdout)
    assert doc["loops"] == [1, 1, 1] and doc["macs"] == model_info("sret_nano", loops=1).macs
    per_stage = json.loads(runner.invoke(app, ["info", "sret_nano", "--loops", "1,2,3", "--json"]).stdout)
    assert per_stage["loops"] == [1, 2, 3]
    bad = runner.invoke(app, ["info", "sret_nano", "--loops", "two"])
    assert bad.exit_code == 2 and "--loops takes whole numbers" in bad.output
    wrong = runner.invoke(app, ["info", "sret_nano", "--loops", "1,2"])
    assert wrong.exit_code == 2 and "one per stage" in wrong.output


# ---- anytime training ----------------------------------------------------------------------------
def test_sample_loops_covers_the_range_and_deep_weighting_favours_full_depth() -> None:
    rng = random.Random(0)
    uniform = [sample_loops(rng, (3, 1), 1, "uniform") for _ in range(3000)]
    assert {u[1] for u in uniform} == {1} and {u[0] for u in uniform} == {1, 2, 3}
    deep = [sample_loops(rng, (3,), 1, "deep")[0] for _ in range(3000)]
    assert deep.count(3) > deep.count(2) > deep.count(1)
    assert {sample_loops(rng, (4,), 3)[0] for _ in range(200)} == {3, 4}
    assert sample_loops(random.Random(5), (3, 3)) == sample_loops(random.Random(5), (3, 3))


def test_anytime_training_gives_a_model_that_evaluates_at_every_depth(run: Path) -> None:
    config = (run / "config.yaml").read_text()
    assert "anytime: uniform" in config and "anytime_distill: 0.5" in config
    scores = {k: evaluate(run / "best.safetensors", loops=k).acc1 for k in (1, 2, 3)}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores[2] > 0.3  # the trained depth learned something in 2 short epochs


# ---- early exit ----------------------------------------------------------------------------------
def test_early_exit_stops_where_confident_and_counts_what_it_spent() -> None:
    torch.manual_seed(0)
    model = small()
    x = torch.randn(6, 3, 32, 32)
    macs = macs_per_depth(model)
    assert len(macs) == 3 and macs[0] < macs[1] < macs[2]
    with torch.no_grad():
        model.set_loops((1, 1))
        shallow = model(x)
        model.set_loops((2, 3))
        deep = model(x)
        model.set_loops(None)
    sure = early_exit(model, x, confidence=1e-6, macs=macs)
    assert sure.loops.tolist() == [1] * 6 and sure.macs.tolist() == [macs[0]] * 6
    torch.testing.assert_close(sure.logits, shallow)
    never = early_exit(model, x, confidence=1.0, macs=macs)
    assert never.loops.tolist() == [3] * 6 and never.macs.tolist() == [sum(macs)] * 6
    torch.testing.assert_close(never.logits, deep, rtol=1e-5, atol=1e-5)
    middle = early_exit(model, x, confidence=float(shallow.softmax(-1).amax(-1).median()), macs=macs)
    assert 1 in middle.loops.tolist() and set(middle.loops.tolist()) <= {1, 2, 3}
    assert model.loops == (2, 3)  # restored


def test_early_exit_from_the_cli(run: Path, tmp_path: Path) -> None:
    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(images[-1])
    result = predict(run / "best.safetensors", images, exit_confidence=0.5)
    assert set(result.loops) == {str(p) for p in images} and set(result.loops.values()) <= {1, 2}
    text = CliRunner().invoke(
        app, ["predict", str(run / "best.safetensors"), str(images[0]), "--exit-confidence", "0.9"]
    )
    assert text.exit_code == 0 and "stopped at" in text.output, text.output
    js = CliRunner().invoke(
        app, ["eval", str(run / "best.safetensors"), "--exit-confidence", "0.9", "--json"]
    )
    doc = json.loads(js.stdout)
    assert sum(doc["exit_loops"].values()) == 360 and doc["mean_macs"] > 0


def test_export_and_bench_take_loops(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.pt2"
    done = CliRunner().invoke(
        app,
        [
            "export",
            str(run / "best.safetensors"),
            "--format",
            "exported-program",
            "-o",
            str(out),
            "--loops",
            "1",
            "--shuffle",
            "fixed",
        ],
    )
    assert done.exit_code == 0, done.output
    exported = torch.export.load(out).module()
    model = sret.model_from_weights(run / "best.safetensors", loops=1, shuffle="fixed")[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-4)
    args = ["bench", "sret_nano", "--loops", "1", "--batch", "2", "--warmup", "0", "--repeats", "1"]
    doc = json.loads(CliRunner().invoke(app, [*args, "--no-reference", "--no-memory", "--json"]).stdout)
    assert doc["rows"][0]["gmacs"] * 1e9 == pytest.approx(model_info("sret_nano", loops=1).macs, rel=1e-6)


def test_a_grid_variant_may_carry_its_own_training_options() -> None:
    grid = load_grid("anytime", data_dir="somewhere")
    anytime = next(v for v in grid.variants if v.name == "anytime")
    assert anytime.settings == {"anytime": "uniform", "anytime_distill": 0.5}
    assert grid.configs["anytime"].anytime == "uniform" and grid.configs["loops3"].anytime == "none"
