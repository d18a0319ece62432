"""Anytime depth on CIFAR-10: train the `anytime` grid, evaluate every cell, write docs/anytime/.

    python benchmarks/anytime.py --data-dir ../shared/data/cifar10_jpeg --out runs/anytime

Trains the grid with `sret ablate anytime` (resumable), then scores each cell's final weights on the
validation split: the fixed-depth models at their own loop count, the anytime model at every loop
count from 1 to 4 and with early exit at several confidence thresholds. Every score is a JSON file
under OUT/scores/ (a rerun skips those that exist); the summary (CSV, JSON, Markdown table) and the
plot are rewritten from them at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from matplotlib.figure import Figure

from sret.checkpoint import model_from_weights
from sret.evaluate import evaluate
from sret.info import count_macs

ROOT = Path(__file__).resolve().parents[1]
FIXED = {"loops1": 1, "loops2": 2, "loops3": 3}
ANYTIME_LOOPS = (1, 2, 3, 4)
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def score(out: Path, cell: str, loops: int | None, confidence: float | None) -> dict:
    """One evaluation of a cell's final weights, cached as JSON."""
    tag = f"{cell}-loops{loops}" if confidence is None else f"{cell}-exit{confidence}"
    path = out / "scores" / f"{tag}.json"
    if path.is_file():
        return json.loads(path.read_text())
    weights = out / "cells" / cell / "last.safetensors"
    result = evaluate(
        weights, batch_size=500, loops=loops if confidence is None else None, exit_confidence=confidence
    )
    fixed = confidence is None
    macs = count_macs(model_from_weights(weights, loops=loops)[0]) if fixed else result.mean_macs
    doc = dict(
        cell=cell,
        loops=loops,
        confidence=confidence,
        acc1=result.acc1,
        macs=macs,
        exit_loops=result.exit_loops,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    print(f"{tag}: top-1 {result.acc1:.4f}, {macs / 1e6:.2f} MMACs", flush=True)
    return doc


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/anytime")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--docs", default=str(ROOT / "docs" / "anytime"))
    parser.add_argument("--score-only", action="store_true", help="Score the seeds whose cells all finished.")
    args = parser.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    if not args.score_only:
        grid = [sys.executable, "-m", "sret", "ablate", "anytime", "--data-dir", args.data_dir]
        subprocess.run([*grid, "--out", str(out), "--jobs", str(args.jobs)], check=True)
    seeds = sorted(
        {p.stem.rsplit("-s", 1)[1] for p in (out / "results").glob("*.json")},
        key=int,
    )
    seeds = [
        s for s in seeds if all((out / "results" / f"{v}-s{s}.json").is_file() for v in [*FIXED, "anytime"])
    ]
    rows = []
    for variant, loops in FIXED.items():
        scores = [score(out, f"{variant}-s{s}", loops, None) for s in seeds]
        rows.append(
            dict(
                arm=f"dedicated, {loops} loop{'s' * (loops > 1)}",
                kind="dedicated",
                loops=loops,
                confidence=None,
                scores=scores,
            )
        )
    for loops in ANYTIME_LOOPS:
        scores = [score(out, f"anytime-s{s}", loops, None) for s in seeds]
        rows.append(
            dict(
                arm=f"anytime at {loops} loop{'s' * (loops > 1)}",
                kind="anytime",
                loops=loops,
                confidence=None,
                scores=scores,
            )
        )
    for confidence in THRESHOLDS:
        scores = [score(out, f"anytime-s{s}", None, confidence) for s in seeds]
        rows.append(
            dict(
                arm=f"anytime, exit at p >= {confidence}",
                kind="exit",
                loops=None,
                confidence=confidence,
                scores=scores,
            )
        )
    write(rows, docs, len(seeds))


def write(rows: list[dict], docs: Path, seeds: int) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    table = []
    for row in rows:
        acc, acc_std = mean_std([100 * s["acc1"] for s in row["scores"]])
        macs, _ = mean_std([s["macs"] / 1e6 for s in row["scores"]])
        table.append(dict(arm=row["arm"], kind=row["kind"], loops=row["loops"], confidence=row["confidence"],
                          top1_mean=round(acc, 2), top1_std=round(acc_std, 2), mmacs=round(macs, 2),
                          seeds=len(row["scores"])))  # fmt: skip
    with open(docs / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (docs / "summary.json").write_text(
        json.dumps(dict(rows=table, scores=[r["scores"] for r in rows]), indent=1)
    )
    lines = ["| arm | top-1 % (mean ± std) | MMACs / image |", "|---|---:|---:|"]
    lines += [
        f"| {t['arm']} | {t['top1_mean']:.2f} ± {t['top1_std']:.2f} | {t['mmacs']:.2f} |" for t in table
    ]
    (docs / "summary.md").write_text(f"{seeds} seeds each.\n\n" + "\n".join(lines) + "\n")
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for kind, style, label in (("dedicated", "o-", "dedicated model per loop count"),
                               ("anytime", "s-", "one anytime model, loops set"),
                               ("exit", "^--", "anytime model, early exit")):  # fmt: skip
        part = [t for t in table if t["kind"] == kind]
        xs, ys = [t["mmacs"] for t in part], [t["top1_mean"] for t in part]
        ax.errorbar(xs, ys, yerr=[t["top1_std"] for t in part], fmt=style, capsize=3, label=label)
        for t in part:
            note = f"{t['loops']}" if t["loops"] else f"{t['confidence']}"
            ax.annotate(
                note, (t["mmacs"], t["top1_mean"]), textcoords="offset points", xytext=(4, -10), fontsize=8
            )
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("CIFAR-10 top-1 % (mean ± std over seeds)")
    ax.set_title("Anytime depth: accuracy against compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(docs / "anytime.png", dpi=100)


if __name__ == "__main__":
    main()
