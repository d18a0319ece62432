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


@pytest.fixture
def run(trained_run: Path) -> Path:
    """The session's trained run (see conftest.py), read only."""
    return trained_run


def test_eval_scores_the_runs_held_out_split(run: Path, tmp_path: Path) -> None:
    result = evaluate(run / "best.safetensors", confusion_png=tmp_path / "cm.png")
    assert int(result.confusion.sum()) == 360 and len(result.per_class) == 10
    assert result.acc1 > 0.5 and result.acc5 >= result.acc1
    assert result.acc1 == pytest.approx(float(result.confusion.diag().sum()) / 360)
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
    best = max(json.loads(x)["val_acc1"] for x in (run / "metrics.jsonl").read_text().splitlines())
    assert result.acc1 == pytest.approx(best, abs=1e-6)


def test_eval_cli_prints_table_and_json(run_copy: Path) -> None:
    run = run_copy  # the confusion matrices go beside the weights
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
    result = predict(run / "best.safetensors", paths, topk=3)
    assert list(result.ranked) == [str(p) for p in paths] and result.skipped == []
    model = load_trained(run / "best.safetensors").model
    with torch.no_grad():
        expected = model(val.tensors[0][:3]).softmax(-1)
    for row, probs in zip(result.ranked.values(), expected, strict=True):
        assert len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1]
        assert row[0][0] == str(int(probs.argmax()))
        assert row[0][1] == pytest.approx(float(probs.max()), abs=1e-5)
    out = CliRunner().invoke(app, ["predict", str(run / "best.safetensors"), str(paths[0]), "--topk", "2"])
    assert out.exit_code == 0 and out.stdout.count("%") == 2


def test_a_weights_file_alone_keeps_its_class_names_and_preprocessing(run: Path, tmp_path: Path) -> None:
    from sret.checkpoint import read_metadata

    alone = tmp_path / "copied.safetensors"
    alone.write_bytes((run / "best.safetensors").read_bytes())  # no classes.json, no config.yaml here
    info = json.loads((run / "classes.json").read_text())
    assert read_metadata(alone)["info"] == info
    trained, original = load_trained(alone), load_trained(run / "best.safetensors")
    assert trained.classes == original.classes == info["classes"]
    assert trained.pre == original.pre
    # no run folder: the data set and held-out split come from the metadata, as the run had them
    split = ("dataset", "val_fraction", "seed")
    assert trained.run_config == {k: original.run_config[k] for k in split}

    from sret.checkpoint import create_model, save_weights

    args = {"num_classes": 2, "img_size": 40}
    pets = {"classes": ["cat", "dog"], "preprocess": {"img_size": 40, "crop_pct": 0.9, "mean": [0.5] * 3}}
    save_weights(create_model("sret_nano", **args), tmp_path / "pets.safetensors", "sret_nano", args, pets)
    loaded = load_trained(tmp_path / "pets.safetensors")
    assert loaded.classes == ["cat", "dog"]
    assert (loaded.pre.img_size, loaded.pre.crop_pct, loaded.pre.mean) == (40, 0.9, (0.5, 0.5, 0.5))


def _digit_pngs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    paths = []
    for i in range(count):
        paths.append(folder / f"{i:02d}.png")
        Image.fromarray(np.uint8(digits.images[i] * 255 / 16)).save(paths[-1])
    return paths


def test_predict_takes_folders_in_batches_and_skips_bad_images_on_request(run: Path, tmp_path: Path) -> None:
    paths = _digit_pngs(tmp_path / "imgs" / "sub", 5)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, not an image suffix")
    whole = predict(run / "best.safetensors", paths, topk=2, batch_size=64)
    by_folder = predict(run / "best.safetensors", [tmp_path / "imgs"], topk=2, batch_size=2)
    assert list(by_folder.ranked) == [str(p) for p in paths]  # sorted, recursive, images only
    for image, ranked in whole.ranked.items():
        assert [c for c, _ in by_folder.ranked[image]] == [c for c, _ in ranked]
        for (_, p), (_, q) in zip(by_folder.ranked[image], ranked, strict=True):
            assert p == pytest.approx(q, abs=1e-5)

    bad = tmp_path / "imgs" / "sub" / "zz.png"
    bad.write_bytes(b"truncated")
    skipping = predict(run / "best.safetensors", [tmp_path / "imgs"], batch_size=2, skip_bad_images=True)
    assert skipping.skipped == [str(bad)] and list(skipping.ranked) == [str(p) for p in paths]
    out = CliRunner().invoke(
        app, ["predict", str(run / "best.safetensors"), str(tmp_path / "imgs"), "--skip-bad-images", "--json"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc[str(bad)] is None and len(doc) == 6
    assert out.stderr.count("\n") == 1 and "zz.png" in out.stderr


def test_predict_and_eval_errors_are_one_line(run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["predict", str(run / "best.safetensors"), str(bad)], "bad.png"),
        (["predict", str(tmp_path / "none.safetensors"), str(bad)], "checkpoint not found"),
        (["predict", str(run / "best.safetensors"), str(tmp_path / "missing.png")], "image not found"),
        (["predict", str(run / "best.safetensors"), str(empty)], "no image files"),
        (["eval", str(run / "best.safetensors"), "--dataset", "cifar10"], "needs --data-dir"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1
