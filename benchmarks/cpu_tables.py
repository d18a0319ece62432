"""Markdown tables from a folder written by benchmarks/cpu_suite.sh: one table per configuration (fp32
and bf16, inference and training, torch's AVX2 paths), and the ratios the speed goals are stated in.

    python benchmarks/cpu_tables.py OUT_DIR
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
    main(Path(sys.argv[1]))
