"""The authors' published checkpoints: tags, file names and top-1 in the pretrained configs and in
docs/weights.md; converting one to safetensors and reading it back for evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch

import sret
from sret.evaluate import load_trained
from sret.model import default_cfgs

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "official_sret_t.pth"


def published() -> dict[str, dict]:
    """tag -> pretrained config, for every tag that names an authors' file."""
    out = {}
    for arch, entry in default_cfgs.items():
        for tag, cfg in entry.cfgs.items():
            if cfg.file:
                out[f"{arch}.{tag}"] = cfg.to_dict()
    return out


def test_every_published_checkpoint_has_a_tag_a_file_and_its_top1() -> None:
    tags = published()
    assert len(tags) == 13  # the authors' table, less the [16-14-1,1-1-1] slicing of SReT_LT (a variant)
    assert "sret_s.distill_in1k" not in timm.list_models("sret*", include_tags=True)  # never published
    for tag, cfg in tags.items():
        assert cfg["file"].endswith(".pth") and cfg["origin_url"] == "https://github.com/szq0214/SReT"
        assert re.search(r"top-1 \d\d\.\d %", cfg["description"]), tag
        assert cfg["crop_pct"] == (0.875 if cfg["input_size"][-1] == 224 else 1.0)


def test_docs_weights_table_matches_the_pretrained_configs() -> None:
    text = (ROOT / "docs" / "weights.md").read_text()
    rows = re.findall(r"^\| `(sret_[\w.]+)` \| (.+?) \| `([\w.]+\.pth)` \| ([\d.]+) \|", text, re.M)
    tags = published()
    assert {tag for tag, *_ in rows} == set(tags)
    for tag, name, file, top1 in rows:
        cfg = tags[tag]
        assert cfg["file"] == file, tag
        assert cfg["description"].startswith(f"{name}, ImageNet-1k top-1 {top1} %"), tag


def test_a_file_without_preprocessing_is_fed_as_its_architecture_says(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    sret.save_weights(sret.create_model("sret_t_noslice_384"), path, "sret_t_noslice_384")
    pre = load_trained(path).pre
    assert (pre.img_size, pre.crop_pct, pre.interpolation) == (384, 1.0, "bicubic")


@pytest.mark.skipif(not REFERENCE.is_file(), reason="needs ../shared/reference (the authors' layout)")
def test_authors_checkpoint_converts_to_safetensors_that_evaluate_as_the_paper_does(tmp_path: Path) -> None:
    path = tmp_path / "sret_t.in1k.safetensors"
    sret.save_weights(sret.create_model("sret_t", checkpoint_path=REFERENCE), path, "sret_t")
    trained = load_trained(path)
    pre = trained.pre
    assert (pre.img_size, pre.crop_pct, pre.interpolation) == (224, 0.875, "bicubic")  # DeiT's eval
    x = torch.randn(2, 3, 224, 224)
    original = sret.create_model("sret_t", checkpoint_path=REFERENCE).eval()
    with torch.no_grad():
        assert torch.equal(trained.model(x), original(x))
