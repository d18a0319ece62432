"""What a run leaves to look at: metrics per epoch (JSONL), curves (PNG) and TensorBoard logs; and what
a grid of runs leaves: accuracy against MACs and parameters (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sret.io import atomic_write


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch, side by side (matplotlib, no display needed)."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    loss, acc, lr = fig.subplots(1, 3)
    loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss.plot(epochs, [r["val_loss"] for r in history], label="val")
    acc.plot(epochs, [r["train_acc"] for r in history], label="train")
    acc.plot(epochs, [r["val_acc1"] for r in history], label="val top-1")
    if "ema_val_acc1" in history[0]:
        acc.plot(epochs, [r["ema_val_acc1"] for r in history], label="val top-1 (EMA)")
    lr.plot(epochs, [r["lr"] for r in history])
    for ax, title in ((loss, "loss"), (acc, "accuracy"), (lr, "learning rate (epoch start)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss.legend()
    acc.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def plot_ablation(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Best top-1 (mean ± std over seeds) against MACs and against parameters, one marker per variant."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5), layout="constrained")
    by_macs, by_params = fig.subplots(1, 2, sharey=True)
    markers = "osD^v<>pPX*h"
    for i, row in enumerate(r for r in rows if r["seeds"]):
        acc, err = 100 * row["best_acc1_mean"], 100 * row["best_acc1_std"]
        err = 0.0 if err != err else err  # one seed: no error bar
        style = dict(yerr=err, fmt=markers[i % len(markers)], capsize=4, markersize=8, label=row["variant"])
        by_macs.errorbar(row["macs"] / 1e6, acc, color=f"C{i % 10}", **style)
        by_params.errorbar(row["params"] / 1e6, acc, color=f"C{i % 10}", **style)
    by_macs.set_xlabel("MMACs per image")
    by_params.set_xlabel("parameters (M)")
    by_macs.set_ylabel("best validation top-1 % (mean ± std over seeds)")
    for ax in (by_macs, by_params):
        ax.grid(alpha=0.3)
    by_params.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_learning_curves(cells: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Validation top-1 per epoch of a grid's variants: the mean over finished seeds, with a band of
    ± one standard deviation where there are two or more."""
    import numpy as np
    from matplotlib.figure import Figure

    curves: dict[str, list[list[float]]] = {}
    for cell in cells:
        if cell.get("status") == "ok" and cell.get("curve"):
            curves.setdefault(cell["variant"], []).append(cell["curve"])
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, (variant, runs) in enumerate(curves.items()):
        length = min(len(run) for run in runs)
        values = 100 * np.array([run[:length] for run in runs])
        epochs, mean = np.arange(1, length + 1), values.mean(axis=0)
        ax.plot(
            epochs, mean, color=f"C{i % 10}", label=f"{variant} ({len(runs)} seed{'s' * (len(runs) > 1)})"
        )
        if len(runs) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i % 10}", alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 % (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


class MetricsLog:
    """Keeps `metrics.jsonl`, `curves.png` and TensorBoard in step with the run's history.

    The JSONL file is rewritten from the history stored in the checkpoint, so after a crash and
    resume it never holds an epoch twice; TensorBoard purges events past the resumed epoch.
    """

    def __init__(self, run_dir: Path, enabled: bool, purge_epoch: int = 0) -> None:
        self.dir, self.enabled, self.logged = run_dir, enabled, purge_epoch
        self.tb: Any = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_epoch + 1)

    def write(self, history: list[dict[str, float]]) -> None:
        if not self.enabled or not history:
            return
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))
        plot_curves(history, self.dir / "curves.png")
        if self.tb is not None:
            for row in history[self.logged :]:
                for key, value in row.items():
                    if key != "epoch":
                        self.tb.add_scalar(key, value, int(row["epoch"]))
            self.tb.flush()
        self.logged = len(history)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
