"""Markdown tables from a folder written by benchmarks/cpu_suite.sh: one table per configuration (fp32
and bf16, inference and training, torch's AVX2 paths), and the ratios the speed goals are stated in;
or, with --summary, one table of sret_t's figures over every configuration (benchmarks/README.md).

    python benchmarks/cpu_tables.py [--summary] OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIGS = {
    "fp32_infer": "fp32 inference",
    "fp32_train": "fp32 training",
    "bf16_infer": "bf16 autocast inference",
    "bf16_train": "bf16 autocast training",
    "avx2_fp32_infer": "fp32 inference, held to AVX2",
    "avx2_fp32_train": "fp32 training, held to AVX2",
    "avx2_bf16_infer": "bf16 autocast inference, held to AVX2",
}


def table(doc: dict) -> list[str]:
    lines = [
        "| model | img/s | latency ms | GFLOP/s | % of matmul peak | GFLOP/s vs deit_tiny |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in doc["rows"]:
        ratio = row["ratio_to_reference"]
        lines.append(
            f"| {row['label']} | {row['images_per_s']:.1f} | {row['latency_ms']:.0f} | {row['gflops']:.1f} "
            f"| {100 * row['peak_fraction']:.0f} % | {ratio:.2f} |"
        )
    return lines


def headline(comparison: dict) -> bool:
    """The ratios of sret_t itself: against deit_tiny, the authors' SReT_T, its unsliced twin and its
    plain modules."""
    what = comparison["what"]
    return what.split(" ")[0] == "sret_t" and not what.startswith("sret_t plain")


def images_per_s(doc: dict, label: str) -> str:
    row = next((r for r in doc["rows"] if r["label"] == label), None)
    return f"{row['images_per_s']:.1f}" if row else ""


def summary(folder: Path) -> None:
    """One row per configuration: images/s of sret_t and of the models timed beside it, and the ratios
    of sret_t's GFLOP/s to deit_tiny's and of its images/s to the authors' SReT_T and to its plain
    modules (held to AVX2)."""
    out = [
        "| configuration | matmul peak GFLOP/s | sret_t img/s | deit_tiny img/s | SReT_T img/s "
        "| sret_t ÷ deit_tiny GFLOP/s | sret_t ÷ SReT_T img/s | sret_t ÷ its plain modules |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, title in CONFIGS.items():
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        ratios = {c["what"]: c["value"] for c in doc["comparisons"]}
        official = ratios.get("sret_t images/s / SReT_T images/s")
        plain = ratios.get("sret_t images/s / sret_t plain images/s")
        out.append(
            f"| {title} | {doc['matmul_peak_gflops']:.0f} | {images_per_s(doc, 'sret_t')} "
            f"| {images_per_s(doc, 'deit_tiny_patch16_224')} | {images_per_s(doc, 'SReT_T')} "
            f"| {ratios['sret_t GFLOP/s / deit_tiny_patch16_224 GFLOP/s']:.2f} "
            f"| {f'{official:.2f}' if official else ''} | {f'{plain:.2f}' if plain else ''} |"
        )
    print("\n".join(out))


def main(folder: Path) -> None:
    out = []
    for name, title in CONFIGS.items():
        path = folder / f"{name}.json"
        if not path.exists():
            continue
        doc = json.loads(path.read_text())
        cfg = doc["config"]
        out += [
            f"### {title}",
            "",
            f"{doc['device']}, torch {doc['torch']}, {doc['threads']} threads, "
            f"batch {cfg['batch']}, median of {cfg['repeats']} interleaved repeats; matmul peak "
            f"{doc['matmul_peak_gflops']:.0f} GFLOP/s",
            "",
        ]
        out += table(doc)
        out += (
            [""] + [f"- {c['what']}: **{c['value']:.2f}**" for c in doc["comparisons"] if headline(c)] + [""]
        )
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
