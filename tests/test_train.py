"""Training: config resolution, run folder, Ctrl-C, NaN guard, DDP, distillation (exact resume after a
hard exit: test_reliability.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY_ARGS
from typer.testing import CliRunner

from sret.cli import app
from sret.io import UserError
from sret.train import (
    FAULT_INTERRUPT_AFTER_STEP,
    STATE_FILE,
    TrainConfig,
    final_metrics,
    resolve_config,
    train,
)


def test_recipe_sets_and_flags_resolve_in_order() -> None:
    cfg = resolve_config("digits", ["epochs=7", "lr=5e-4", "scale=[0.5, 1.0]"], epochs=9, model=None)
    assert (cfg.epochs, cfg.lr, cfg.scale, cfg.model) == (9, 5e-4, [0.5, 1.0], "sret_nano")
    paper = resolve_config("imagenet_sret_t")
    assert (paper.epochs, paper.batch_size, paper.warmup_epochs) == (300, 1024, 30)
    assert paper.effective_lr == pytest.approx(2e-3)
    assert resolve_config("imagenet_sret_s", batch_size=256).effective_lr == pytest.approx(5e-4)
    with pytest.raises(UserError, match="unknown config option"):
        resolve_config("digits", ["nope=1"])
    with pytest.raises(UserError, match="recipe not found"):
        resolve_config("no_such_recipe")


def test_tiny_run_writes_everything(tiny) -> None:
    run = train(tiny(model_ema=True, model_ema_decay=0.9))
    names = {p.name for p in run.iterdir()}
    expected = {"config.yaml", "classes.json", "metrics.jsonl", "curves.png", "last.safetensors"}
    assert expected | {"best.safetensors", "last_ema.safetensors", STATE_FILE, "tensorboard"} <= names
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_acc1", "val_acc5", "lr", "img_per_s", "ema_val_acc1"} <= set(rows[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert TrainConfig.from_dict(saved) == tiny(model_ema=True, model_ema_decay=0.9)
    state = torch.load(run / STATE_FILE, weights_only=True)  # no pickled objects in the state
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["history"]) == 2
    assert state["optimizer"]["param_groups"][0]["fused"]  # torch's fused AdamW kernel on CPU
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny())


def test_ctrl_c_says_where_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_INTERRUPT_AFTER_STEP, "2")  # Ctrl-C after step 2, checkpointed at step 1 and 2
    args = ["train", "--output", str(tmp_path), "--name", "r", "--epochs", "1", *TINY_ARGS]
    args += ["--save-every-steps", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    said = "".join(result.stderr.split())  # the console wraps long lines
    assert "".join(f"continue with `sret train --resume {tmp_path / 'r'}`".split()) in said
    assert "Traceback" not in result.output
    assert torch.load(tmp_path / "r" / STATE_FILE, weights_only=True)["global_step"] == 2  # intact


def test_ctrl_c_before_the_first_checkpoint_does_not_claim_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_INTERRUPT_AFTER_STEP, "1")
    args = ["train", "--output", str(tmp_path), "--name", "r", "--epochs", "1", *TINY_ARGS]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    said = " ".join(result.stderr.split())
    assert "before the first checkpoint: nothing was kept" in said and "keeps the last checkpoint" not in said
    assert not (tmp_path / "r" / STATE_FILE).exists()
    monkeypatch.delenv(FAULT_INTERRUPT_AFTER_STEP)
    assert final_metrics(train(resume=tmp_path / "r"))["epoch"] == 1  # which starts it again, as it says


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, tiny) -> None:
    cfg = tiny(epochs=3, lr=1e30, smoothing=0.0, save_every_steps=1)
    with pytest.raises(UserError, match=r"loss is (nan|inf) .* last good checkpoint .* is kept"):
        train(cfg)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    assert state["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    from sret.checkpoint import load_state

    weights = load_state(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in state["model"].items())


def test_distillation_from_checkpoint_and_from_logits(tmp_path: Path, tiny) -> None:
    from typer.testing import CliRunner

    from sret.cli import app
    from sret.data import build_datasets, subset
    from sret.evaluate import load_trained
    from sret.train import soft_distillation_loss

    logits = torch.randn(4, 10)
    soft = torch.softmax(logits / 2.0, -1)
    entropy = -(soft * soft.log()).sum(-1).mean()  # soft cross-entropy = T² (H(teacher) + KL)
    assert float(soft_distillation_loss(logits, logits, 2.0)) == pytest.approx(4 * float(entropy), rel=1e-5)
    assert float(soft_distillation_loss(torch.randn(4, 10), logits, 2.0)) > float(4 * entropy)

    teacher = train(tiny(name="teacher", epochs=1)) / "last.safetensors"
    student = train(
        tiny(name="kd", epochs=1, teacher=str(teacher), distill_alpha=0.7, distill_temperature=2.0)
    )
    assert final_metrics(student)["train_loss"] > 0

    out = tmp_path / "logits.safetensors"
    result = CliRunner().invoke(
        app, ["distill-logits", str(out), "--teacher", str(teacher), "--set", "train_subset=128"]
    )
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    train_set = subset(build_datasets("digits").train, 128, 0)
    with torch.no_grad():
        expected = load_trained(teacher).model(torch.stack([train_set[i][0] for i in range(128)]))
    assert torch.allclose(load_file(out)["logits"], expected, atol=1e-5)
    from_file = train(tiny(name="kd_file", epochs=1, teacher_logits=str(out), distill_alpha=1.0))
    assert final_metrics(from_file)["train_loss"] > 0
    torch.save({"logits": expected[:5]}, tmp_path / "short.pt")
    with pytest.raises(UserError, match="expected a 'logits' tensor"):
        train(tiny(name="bad", teacher_logits=str(tmp_path / "short.pt")))
    with pytest.raises(UserError, match="unmixed"):
        tiny(name="bad", teacher_logits=str(out), mixup=0.8)


def test_bf16_autocast_trains_on_cpu(tmp_path: Path, tiny) -> None:
    run = train(tiny(epochs=1, amp="bf16", mixup=0.8, cutmix=1.0, clip_grad=1.0))
    metrics = final_metrics(run)
    assert metrics["train_loss"] > 0 and 0.0 <= metrics["val_acc1"] <= 1.0


def test_compiled_training_saves_plain_weights(tmp_path: Path, tiny) -> None:
    """--compile wraps only the training forward: checkpoints keep the model's own parameter names."""
    from safetensors.torch import load_file

    from sret import create_model

    run = train(tiny(epochs=1, compile="aot_eager"))  # capture + autograd, no codegen: fast
    assert final_metrics(run)["train_loss"] > 0
    saved = load_file(run / "last.safetensors")
    assert set(saved) == set(create_model("sret_nano", num_classes=10).state_dict())
    with pytest.raises(UserError, match=r"compile must be none or one of .*inductor"):
        tiny(name="bad", compile="turbo")


def test_ranks_split_each_global_batch_of_the_single_process_order() -> None:
    from sret.train import Dist, EpochSampler

    data = list(range(96))
    one = EpochSampler(data, Dist(0, 1, torch.device("cpu")), seed=3, batch_size=16)
    ranks = [EpochSampler(data, Dist(r, 2, torch.device("cpu")), seed=3, batch_size=8) for r in (0, 1)]
    for epoch in (0, 5):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        order, shards = list(one), [list(s) for s in ranks]
        for b in range(6):
            together = set(shards[0][b * 8 : (b + 1) * 8]) | set(shards[1][b * 8 : (b + 1) * 8])
            assert together == set(order[b * 16 : (b + 1) * 16])
    one.set_epoch(5, start_batch=2)
    assert list(one) == order[32:]  # a resumed epoch continues on the unseen samples


def test_ddp_two_processes_match_one(tmp_path: Path) -> None:
    common = [
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--output",
        str(tmp_path),
        "--set",
        "train_subset=128",
        "--set",
        "val_subset=64",
        "--set",
        "smoothing=0.0",
        "--set",
        "shuffle=none",
        "--set",
        "threads=1",
        "--set",
        "warmup_epochs=0",
    ]
    single = CliRunner().invoke(app, ["train", *common, "--name", "one"])  # one process: this one
    assert single.exit_code == 0, single.output
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sret",
        "train",
        *common,
        "--name",
        "two",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run(launcher, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = final_metrics(tmp_path / "one"), final_metrics(tmp_path / "two")
    assert "2x cpu" in double.stderr
    # BatchNorm in the stem sees each rank's half batch (SyncBatchNorm needs GPUs), hence the tolerance.
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=2e-2)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=2e-2)
    assert abs(two["val_acc1"] - one["val_acc1"]) <= 3 / 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "sret_huge"], "model must be an SReT"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "data directory not found"),
        (["--dataset", "cifar10"], "needs --data-dir"),
        (["--set", "drop_path=1.5"], "drop_path must be in [0.0, 1.0)"),
        (["--set", "epochs=many"], "option epochs"),
        (["--resume", "/nonexistent/run"], "not a run folder"),
        (["--set", "lr=[1"], "cannot parse --set lr=[1: expected ',' or ']'"),
    ],
)
def test_cli_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sret.cli import app

    result = CliRunner().invoke(app, ["train", "--output", str(tmp_path), *args])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert message in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr


def test_broken_yaml_is_one_line_naming_file_and_place(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sret.cli import app

    (tmp_path / "recipe.yaml").write_text("epochs: 3\nlr: [1\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: {sret_nano\n")
    for args, message in [
        (["--recipe", str(tmp_path / "recipe.yaml")], f"cannot parse recipe {tmp_path / 'recipe.yaml'}"),
        (["--resume", str(tmp_path / "run")], f"cannot parse run config {tmp_path / 'run' / 'config.yaml'}"),
    ]:
        result = CliRunner().invoke(app, ["train", *args])
        assert result.exit_code == 1 and message in result.stderr and "(line " in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_default_run_reaches_95_percent(tmp_path: Path) -> None:
    """The README's main command: `sret train` with no arguments (run from an empty folder)."""
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "sret", "train"], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    acc = final_metrics(run)["val_acc1"]
    print(f"default run: val acc1 {acc:.4f} in {elapsed:.0f}s")
    assert acc >= 0.95
