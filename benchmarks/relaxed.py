"""Relaxed recursion on CIFAR-10: train, recursify, fine-tune, score; write docs/relaxed_recursion/.

    python benchmarks/relaxed.py --data-dir ../shared/data/cifar10_jpeg --out runs/relaxed

1. `sret ablate relaxed`: the non-recursive `source` (5 epochs) and the `recursive` model trained from
   scratch for the same total steps as a fine-tuned source (7 epochs), 3 seeds each.
2. `sret recursify` of every source at 2 loops and each rank of RANKS (OUT/finetune/recursified/),
   each scored on the validation split as converted, before any fine-tuning.
3. `sret ablate relaxed_finetune --out OUT/finetune`: 2 epochs of fine-tuning for every converted
   model and for the source itself (`source_ft`).

Everything resumes: finished cells and existing conversions and scores (JSON under OUT/scores/) are
kept. The summary (CSV, JSON, Markdown with paired t-tests) and the plot are rewritten at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import scipy.stats
import yaml
from matplotlib.figure import Figure

from sret.evaluate import evaluate
from sret.recursify import recursify_file

ROOT = Path(__file__).resolve().parents[1]
RANKS = (0, 4, 16, "full")
LOOPS = 2


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cached(path: Path, make) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    doc = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return doc


def convert(out: Path, seed: int, rank: int | str) -> dict:
    """Recursify one source, and score the converted model before fine-tuning."""
    source = out / "cells" / f"source-s{seed}" / "last.safetensors"
    target = out / "finetune" / "recursified" / f"source-s{seed}-L{LOOPS}-r{rank}.safetensors"

    def make() -> dict:
        result, path = recursify_file(str(source), LOOPS, rank, out=target)
        run = yaml.safe_load((source.parent / "config.yaml").read_text())  # the source's data and split
        acc1 = evaluate(path, run["dataset"], run["data_dir"], batch_size=500).acc1
        print(f"source-s{seed} -> rank {rank}: {result.params_after:,} params, top-1 {acc1:.4f}", flush=True)
        return dict(seed=seed, rank=rank, params=result.params_after, acc1=acc1,
                    max_abs_diff=result.max_abs_diff, top1_agreement=result.top1_agreement)  # fmt: skip

    return cached(out / "scores" / f"converted-s{seed}-r{rank}.json", make)


def results(folder: Path, variant: str, seeds: list[int]) -> list[dict]:
    docs = [json.loads((folder / "results" / f"{variant}-s{s}.json").read_text()) for s in seeds]
    failed = [d["cell"] for d in docs if d.get("status") != "ok"]
    if failed:
        raise SystemExit(f"cells failed: {failed} (see their logs)")
    return [dict(seed=d["seed"], params=d["params"], acc1=d["final_acc1"]) for d in docs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="runs/relaxed")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--docs", default=str(ROOT / "docs" / "relaxed_recursion"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="relaxed", help="Part 1 (variants `source`, `recursive`).")
    parser.add_argument("--finetune-grid", default="relaxed_finetune", help="Part 2.")
    args = parser.parse_args()
    out, docs, seeds = Path(args.out), Path(args.docs), list(range(args.seeds))
    ablate = [sys.executable, "-m", "sret", "ablate"]
    jobs = ["--data-dir", args.data_dir, "--jobs", str(args.jobs)]
    subprocess.run([*ablate, args.grid, "--out", str(out), *jobs], check=True)
    converted = {rank: [convert(out, s, rank) for s in seeds] for rank in RANKS}
    subprocess.run([*ablate, args.finetune_grid, "--out", str(out / "finetune"), *jobs], check=True)
    rows = [
        ("source: each block once, 5 epochs", "source", results(out, "source", seeds)),
        ("source fine-tuned 2 more epochs", "source", results(out / "finetune", "source_ft", seeds)),
        ("recursive from scratch, 7 epochs", "scratch", results(out, "recursive", seeds)),
    ]
    for rank in RANKS:
        rows.append((f"recursified, rank {rank}, as converted", "converted", converted[rank]))
        tuned = results(out / "finetune", f"rank{rank}", seeds)
        rows.append((f"recursified, rank {rank}, fine-tuned 2 epochs", "relaxed", tuned))
    write(rows, docs, len(seeds))


def paired(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean difference (points) of a - b over seeds, and the paired t-test's p."""
    xs, ys = [100 * r["acc1"] for r in a], [100 * r["acc1"] for r in b]
    diff = statistics.mean(x - y for x, y in zip(xs, ys, strict=True))
    return diff, float(scipy.stats.ttest_rel(xs, ys).pvalue)


def write(rows: list[tuple[str, str, list[dict]]], docs: Path, seeds: int) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    table = []
    for arm, kind, scores in rows:
        acc, std = mean_std([100 * s["acc1"] for s in scores])
        table.append(dict(arm=arm, kind=kind, params=scores[0]["params"], top1_mean=round(acc, 2),
                          top1_std=round(std, 2), seeds=len(scores)))  # fmt: skip
    with open(docs / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    by_arm = {arm: scores for arm, _, scores in rows}
    reference = by_arm["source fine-tuned 2 more epochs"]
    scratch = by_arm["recursive from scratch, 7 epochs"]
    tests, lower = [], None
    for arm, kind, scores in rows:
        if kind != "relaxed":
            continue
        against = [("untied (source fine-tuned)", reference), ("recursive from scratch", scratch)]
        if lower is not None:
            against.append(("the next lower rank", lower))
        for name, other in against:
            diff, p = paired(scores, other)
            tests.append(dict(arm=arm, against=name, diff=round(diff, 2), p=round(p, 4)))
        lower = scores
    (docs / "summary.json").write_text(json.dumps(dict(rows=table, tests=tests, scores=by_arm), indent=1))
    lines = ["| arm | params | top-1 % (mean ± std) |", "|---|---:|---:|"]
    lines += [f"| {t['arm']} | {t['params']:,} | {t['top1_mean']:.2f} ± {t['top1_std']:.2f} |" for t in table]
    lines += [
        "",
        "Paired over seeds (points of top-1):",
        "",
        "| arm | against | difference | p |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {t['arm']} | {t['against']} | {t['diff']:+.2f} | {t['p']:.3f} |" for t in tests]
    (docs / "summary.md").write_text(f"{seeds} seeds each.\n\n" + "\n".join(lines) + "\n")
    plot(table, docs / "relaxed_recursion.png")


def plot(table: list[dict], path: Path) -> None:
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    styles = {
        "source": ("D", "untied source (5 epochs, and +2 fine-tuning)"),
        "scratch": ("s", "recursive from scratch (7 epochs)"),
        "converted": ("v", "recursified, as converted"),
        "relaxed": ("o", "recursified + 2 epochs fine-tuning"),
    }
    for kind, (marker, label) in styles.items():
        part = [t for t in table if t["kind"] == kind]
        xs, ys = [t["params"] / 1e3 for t in part], [t["top1_mean"] for t in part]
        ax.errorbar(xs, ys, yerr=[t["top1_std"] for t in part], fmt=marker, capsize=3, label=label)
        for t in part:
            if kind in ("converted", "relaxed"):
                note = "r" + t["arm"].split("rank ")[1].split(",")[0]
                ax.annotate(note, (t["params"] / 1e3, t["top1_mean"]), textcoords="offset points",
                            xytext=(5, -3), fontsize=8)  # fmt: skip
    ax.set_xlabel("parameters (thousands)")
    ax.set_ylabel("CIFAR-10 top-1 % (mean ± std over seeds)")
    ax.set_title(f"Relaxed recursion: blocks tied in pairs ({LOOPS} loops), per-loop rank-r deltas")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
