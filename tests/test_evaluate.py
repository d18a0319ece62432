"""Evaluation and prediction from a checkpoint written by `sret train`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from typer.testing import CliRunner

from sret.cli import app
from sret.data import build_datasets
from sret.evaluate import evaluate, load_trained, predict
from sret.train import resolve_config, train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    cfg = resolve_config("digits", output=str(out), name="r", epochs=3, train_subset=512, threads=1)
    return train(cfg)


def test_eval_scores_the_runs_held_out_split(run: Path, tmp_path: Path) -> None:
    result = evaluate(run / "best.safetensors", confusion_png=tmp_path / "cm.png")
    assert int(result.confusion.sum()) == 360 and len(result.per_class) == 10
    assert result.acc1 > 0.5 and result.acc5 >= result.acc1
    assert result.acc1 == pytest.approx(float(result.confusion.diag().sum()) / 360)
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    best = max(json.loads(x)["val_acc1"] for x in (run / "metrics.jsonl").read_text().splitlines())
    assert result.acc1 == pytest.approx(best, abs=1e-6)


def test_eval_cli_prints_table_and_json(run: Path) -> None:
    text = CliRunner().invoke(app, ["eval", str(run / "last.safetensors")])
    assert text.exit_code == 0, text.output
    assert "top-1" in text.stdout and "per-class accuracy" in text.stdout
    js = CliRunner().invoke(app, ["eval", str(run / "last.safetensors"), "--dataset", "digits", "--json"])
    payload = json.loads(js.stdout)
    assert set(payload["per_class"]) == {str(i) for i in range(10)}
    assert Path(payload["confusion_png"]).is_file()


def test_predict_names_classes_and_matches_eval_input(run: Path, tmp_path: Path) -> None:
    digits = load_digits()
    _, val_idx = train_test_split(
        np.arange(len(digits.target)), test_size=0.2, stratify=digits.target, random_state=0
    )
    paths = []
    for i in range(3):  # the first validation digits, saved as 8x8 grey PNG files
        paths.append(tmp_path / f"{i}.png")
        pixels = np.uint8(np.clip(digits.images[val_idx[i]] * 255 / 16, 0, 255))
        Image.fromarray(pixels).save(paths[-1])
    val = build_datasets("digits").val
    ranked = predict(run / "best.safetensors", paths, topk=3)
    model = load_trained(run / "best.safetensors").model
    with torch.no_grad():
        expected = model(val.tensors[0][:3]).softmax(-1)
    for row, probs in zip(ranked, expected, strict=True):
        assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1]
        assert row[0][0] == str(int(probs.argmax()))
        assert row[0][1] == pytest.approx(float(probs.max()), abs=1e-5)
    out = CliRunner().invoke(app, ["predict", str(run / "best.safetensors"), str(paths[0]), "--topk", "2"])
    assert out.exit_code == 0 and out.stdout.count("%") == 2


def test_predict_and_eval_errors_are_one_line(run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    cases = [
        (["predict", str(run / "best.safetensors"), str(bad)], "bad.png"),
        (["predict", str(tmp_path / "none.safetensors"), str(bad)], "checkpoint not found"),
        (["eval", str(run / "best.safetensors"), "--dataset", "cifar10"], "needs --data-dir"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
