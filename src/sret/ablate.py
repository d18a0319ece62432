"""`sret ablate`: a grid of model variants x seeds, trained with one recipe, summarised with error bars.

A grid file (YAML) names a recipe, the training settings every cell shares (`set:`), the number of
seeds and the variants, each a set of model-config overrides in the language of `sret.variants`::

    recipe: cifar10
    set: {dataset: imagefolder, epochs: 20}
    seeds: 3
    variants:
      plain: {loops: 1, nll: none, residual_coefficients: false}
      sret: {}

Every cell (variant, seed) is one `sret train` run in its own process, under `OUT/cells/`, with the
same recipe, data and budget; `--jobs` cells run at a time with the cores split between them. The
grid is resumable at every level: a finished cell is never rerun, an interrupted one continues from
its last checkpoint (`sret train --resume`, which is exact), and a failed cell is reported with its
error and retried on the next run, without stopping the others. When all cells have run, the
summary (per variant: mean ± std over seeds of best and final top-1, parameters, MACs, training
images/s, time) is written as Markdown, CSV and JSON, with a plot of accuracy against MACs and
against parameters.

A variant may run its own number of seeds (`seeds:` beside its overrides, e.g. a one-seed check at
twice the epochs). `compare:` registers the (variant, reference) pairs to test before any cell runs;
their cells run first, seed by seed, and the summary gives each pair's paired difference over the
shared seeds with a 95 % confidence interval and a Holm-corrected p-value. A grid whose cells have not
all finished still writes its summary, marked partial.

In a training setting, `{seed}` stands for the cell's seed and `{out}` for the grid's output folder,
so a cell can start from the weights an earlier grid (or step) made for the same seed::

    variants:
      finetune: {set: {checkpoint: "{out}/sources/model-s{seed}.safetensors"}}
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import heapq
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scipy.stats
import torch

from sret.checkpoint import create_model
from sret.evaluate import load_trained
from sret.info import count_macs
from sret.io import UserError, atomic_write, read_mapping
from sret.plots import plot_ablation, plot_learning_curves
from sret.runtime import cpu_description, die_with_parent
from sret.train import STATE_FILE, TrainConfig, load_recipe, resolve_config
from sret.variants import resolve_overrides

GRIDS = Path(__file__).parent / "grids"
GRID_KEYS = ("description", "recipe", "model", "base", "set", "seeds", "variants", "compare")
# Options the grid itself decides for every cell: where it writes, its seed and its threads.
OWNED = ("output", "name", "seed", "threads", "model_args")
SUMMARY_FIELDS = (
    "variant",
    "seeds",
    "failed",
    "params",
    "macs",
    "best_acc1_mean",
    "best_acc1_std",
    "final_acc1_mean",
    "final_acc1_std",
    "img_per_s",
    "train_s",
    "wall_s",
    "resumed",
    "overrides",
    "error",
)
# How a cell ran, not what it learned: these differ between identical runs.
RUN_FIELDS = ("img_per_s", "train_s", "wall_s", "resumed")
RUN_ONLY = ("data_dir", "workers", "cache_images")  # where and how cells read data, not what they learn


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # as the grid wrote them
    model_args: dict[str, Any]  # resolved: what the cells' `model_args` hold
    settings: dict[str, Any] = field(default_factory=dict)  # the variant's own training options (`set:`)
    seeds: int | None = None  # the variant's own seed count (else the grid's)


@dataclass(frozen=True)
class Cell:
    variant: Variant
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant.name}-s{self.seed}"


@dataclass
class Grid:
    """A resolved grid: every cell's training config is known (and valid) before any cell runs."""

    path: str
    recipe: str
    model: str
    settings: dict[str, Any]  # training options shared by every cell
    seeds: int
    variants: list[Variant]
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)  # model overrides under every variant's
    compare: list[tuple[str, str]] = field(default_factory=list)  # (variant, reference) pairs to test
    configs: dict[str, TrainConfig] = field(default_factory=dict, repr=False)  # by variant, seed 0

    def seeds_of(self, variant: Variant) -> int:
        return variant.seeds if variant.seeds is not None else self.seeds

    @property
    def cells(self) -> list[Cell]:
        """Seed-major order: every variant's first seed finishes before any second seed starts, and the
        compared variants' cells (the registered questions) before the others'."""
        compared = {name for pair in self.compare for name in pair}
        order = sorted(self.variants, key=lambda v: v.name not in compared)  # stable: grid order within
        most = max(self.seeds_of(v) for v in self.variants)
        return [Cell(v, s) for first in (True, False) for s in range(most) for v in order
                if (v.name in compared or not compared) == first and s < self.seeds_of(v)]  # fmt: skip

    def fingerprint(self) -> str:
        """What makes the cells' results comparable: recipe, settings and variants (not paths)."""
        spec = dict(
            recipe=self.recipe,
            model=self.model,
            settings={k: v for k, v in self.settings.items() if k not in RUN_ONLY},
            variants={
                v.name: [v.model_args, v.settings] if v.settings else v.model_args for v in self.variants
            },
        )
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Reading a grid
# --------------------------------------------------------------------------------------------------
def find_grid(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = GRIDS / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in GRIDS.glob("*.yaml")))
    raise UserError(f"grid not found: {name_or_path} (shipped: {names})")


def load_grid(
    name_or_path: str = "cifar10",
    seeds: int | None = None,
    data_dir: str | None = None,
    settings: dict[str, Any] | None = None,
) -> Grid:
    """Read and check a grid: every variant builds, every cell's config is valid; UserError if not."""
    path = find_grid(name_or_path)
    spec = read_mapping(path, "grid")
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"grid {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(GRID_KEYS)})")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UserError(f"grid {path}: needs `variants:`, a mapping of name: {{model overrides}}")
    shared = spec.get("set") or {}
    if not isinstance(shared, dict):
        raise UserError(f"grid {path}: `set:` must be a mapping of training option: value")
    shared = {**shared, **(settings or {})}
    if data_dir is not None:
        shared["data_dir"] = data_dir
    owned = sorted(set(shared) & set(OWNED))
    if owned:
        raise UserError(f"grid {path}: {', '.join(owned)} are set by `sret ablate` for each cell")
    recipe = str(spec.get("recipe", "digits"))
    model = str(
        spec.get("model") or shared.pop("model", None) or load_recipe(recipe).get("model", "sret_nano")
    )
    try:
        resolve_config(recipe, model=model, **shared)
    except UserError as e:
        raise UserError(f"grid {path}: {e}") from None
    n_seeds = seeds if seeds is not None else spec.get("seeds", 3)
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise UserError(f"grid {path}: seeds must be a whole number >= 1, got {n_seeds!r}")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise UserError(f"grid {path}: `base:` must be a mapping of model option: value")
    shown = f"sret/grids/{path.name}" if path.resolve().parent == GRIDS.resolve() else str(path)
    grid = Grid(shown, recipe, model, shared, n_seeds, [], str(spec.get("description", "")), base)
    for name, overrides in variants.items():
        grid.variants.append(_variant(grid, str(name), overrides or {}))
    grid.compare = _pairs(path, spec.get("compare") or [], {v.name for v in grid.variants})
    return grid


def _pairs(path: Path, pairs: Any, names: set[str]) -> list[tuple[str, str]]:
    """`compare:` as (variant, reference) pairs of known variants."""
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
        raise UserError(f"grid {path}: `compare:` must be a list of [variant, reference] pairs")
    unknown = sorted({str(n) for p in pairs for n in p} - names)
    if unknown:
        raise UserError(f"grid {path}: `compare:` names unknown variant(s) {', '.join(unknown)}")
    return [(str(a), str(b)) for a, b in pairs]


def _variant(grid: Grid, name: str, overrides: Any) -> Variant:
    """Resolve one variant and build its model once, so an impossible one fails before training."""
    where = f"grid {grid.path}: variant {name!r}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"{where}: names may hold letters, digits, '-' and '_' only")
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: overrides must be a mapping of model option: value, got {overrides!r}")
    overrides = dict(overrides)
    settings = overrides.pop("set", None) or {}
    if not isinstance(settings, dict) or set(settings) & set(OWNED):
        raise UserError(
            f"{where}: `set:` must be a mapping of training options other than {', '.join(OWNED)}"
        )
    seeds = overrides.pop("seeds", None)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise UserError(f"{where}: seeds must be a whole number >= 1, got {seeds!r}")
    try:
        model_args = resolve_overrides(grid.model, grid.base, overrides)
        cfg = resolve_config(
            grid.recipe, model=grid.model, model_args=model_args, **{**grid.settings, **settings}
        )
        create_model(cfg.model, img_size=cfg.img_size, **model_args)
    except (UserError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    grid.configs[name] = cfg
    return Variant(name, overrides, model_args, settings, seeds)


def plan(grid: Grid, num_classes: int = 10) -> str:
    """What the grid will train, before any cell runs: per variant its seeds, epochs, parameters (with
    a `num_classes` head; the data decides the real one) and MACs per image."""
    lines = [
        f"| variant | seeds | epochs | params ({num_classes}-class head) | MMACs |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in grid.variants:
        cfg = grid.configs[variant.name]
        model = create_model(cfg.model, img_size=cfg.img_size, num_classes=num_classes, **variant.model_args)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        macs = count_macs(model, cfg.img_size) / 1e6
        seeds = grid.seeds_of(variant)
        lines.append(f"| {variant.name} | {seeds} | {cfg.epochs} | {params:.3f} M | {macs:.1f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Running the cells
# --------------------------------------------------------------------------------------------------
class Layout:
    """Where a grid keeps its files under OUT."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self.cells, self.logs, self.results = self.out / "cells", self.out / "logs", self.out / "results"

    def run_dir(self, cell: Cell) -> Path:
        return self.cells / cell.name

    def result(self, cell: Cell) -> Path:
        return self.results / f"{cell.name}.json"

    def log(self, cell: Cell) -> Path:
        return self.logs / f"{cell.name}.log"


def cell_command(grid: Grid, cell: Cell, layout: Layout, threads: int) -> list[str]:
    """`sret train` for a cell: a resume if its run folder exists, else a new run with the grid's config."""
    base = [sys.executable, "-m", "sret", "train"]
    run_dir = layout.run_dir(cell)
    if (run_dir / "config.yaml").is_file():
        moved = [f"{k}={json.dumps(grid.settings[k])}" for k in RUN_ONLY if k in grid.settings]
        return [*base, "--resume", str(run_dir), *(arg for item in moved for arg in ("--set", item))]
    settings = {**grid.settings, **cell.variant.settings}
    options = {
        **{k: fill_placeholders(v, cell, layout) for k, v in settings.items()},
        "model": grid.model,
        "model_args": cell.variant.model_args,
        "seed": cell.seed,
        "threads": threads,
        "output": str(layout.cells),
        "name": cell.name,
    }
    sets = [f"{k}={json.dumps(v)}" for k, v in options.items()]
    return [*base, "-r", grid.recipe, *(arg for item in sets for arg in ("--set", item))]


def fill_placeholders(value: Any, cell: Cell, layout: Layout) -> Any:
    """A string setting with `{seed}` and `{out}` replaced by the cell's seed and the output folder."""
    if not isinstance(value, str):
        return value
    return value.replace("{seed}", str(cell.seed)).replace("{out}", str(layout.out))


def read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarise_cell(grid: Grid, cell: Cell, layout: Layout, wall_s: float) -> dict[str, Any]:
    """The finished cell's scores (from its metrics file) and its model's size (from its weights)."""
    run_dir = layout.run_dir(cell)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cfg = grid.configs[cell.variant.name]
    model = load_trained(run_dir / "last.safetensors").model
    return dict(
        cell=cell.name,
        variant=cell.variant.name,
        seed=cell.seed,
        status="ok",
        epochs=len(rows),
        best_acc1=max(r["val_acc1"] for r in rows),
        final_acc1=rows[-1]["val_acc1"],
        final_val_loss=rows[-1]["val_loss"],
        params=sum(p.numel() for p in model.parameters()),
        macs=count_macs(model, cfg.img_size),
        img_per_s=statistics.fmean(r["img_per_s"] for r in rows),
        train_s=sum(r["time_s"] for r in rows),
        wall_s=wall_s,
        curve=[r["val_acc1"] for r in rows],  # validation top-1 per epoch: the grid's learning curves
        cpu=cpu_description(),  # kernels round differently between CPUs: where the cell ran
        torch=torch.__version__,
    )


def cell_error(log: Path, returncode: int) -> str:
    """The cell's one-line error: its `error:` line, else the last line it wrote, else the exit code."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"exit code {returncode}"


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One `sret ablate` per output folder at a time (two would train the same cells)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `sret ablate` is running in {out}") from None
        yield


def check_same_grid(grid: Grid, layout: Layout) -> None:
    """OUT holds one grid: refuse to mix cells of another recipe or variant set into it."""
    stamp = layout.out / "grid.json"
    mine = dict(
        fingerprint=grid.fingerprint(),
        grid=grid.path,
        recipe=grid.recipe,
        model=grid.model,
        settings=grid.settings,
        variants={v.name: v.overrides for v in grid.variants},
    )
    saved = read_result(stamp)
    if saved is not None and saved.get("fingerprint") != mine["fingerprint"]:
        raise UserError(
            f"{layout.out} holds the cells of another grid ({saved.get('grid')}, other settings or "
            "variants): choose another --out, or delete it to start again"
        )
    atomic_write(stamp, lambda tmp: Path(tmp).write_text(json.dumps(mine, indent=1, default=str)))


def run_grid(
    grid: Grid,
    out: str | os.PathLike,
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every unfinished cell (`jobs` at a time), or only the cells named in `only` (to rerun one
    cell elsewhere and check it against the grid's spread), then write the summary; returns the cell
    results."""
    layout = Layout(out)
    if jobs < 1:
        raise UserError(f"jobs must be >= 1, got {jobs}")
    names = [c.name for c in grid.cells]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise UserError(f"grid {grid.path} has no cell {', '.join(unknown)} (cells: {', '.join(names)})")
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with exclusive(layout.out):
        check_same_grid(grid, layout)
        for folder in (layout.cells, layout.logs, layout.results):
            folder.mkdir(parents=True, exist_ok=True)
        todo = [c for c in grid.cells if (read_result(layout.result(c)) or {}).get("status") != "ok"]
        done = len(grid.cells) - len(todo)
        if only:
            todo = [c for c in todo if c.name in only]
        log(
            f"grid {grid.path}: {len(grid.variants)} variants, {len(grid.cells)} cells ({done} already "
            f"finished, {len(todo)} to run), {jobs} at a time, {threads} thread(s) each; "
            f"output in {layout.out}"
        )
        Scheduler(grid, layout, todo, jobs, threads, log, done).run()
        return write_current_summary(grid, layout)


def write_current_summary(grid: Grid, layout: Layout) -> list[dict[str, Any]]:
    """The summary of every cell's result so far (pending cells marked); returns the cell results."""
    results = [read_result(layout.result(c)) or pending(c) for c in grid.cells]
    write_summary(grid, results, layout.out)
    return results


def missing(cell: Cell) -> dict[str, Any]:
    return dict(
        cell=cell.name, variant=cell.variant.name, seed=cell.seed, status="failed", error="did not run"
    )


def pending(cell: Cell) -> dict[str, Any]:
    """A cell that has not run yet (a partial grid): neither a result nor a failure."""
    return dict(cell=cell.name, variant=cell.variant.name, seed=cell.seed, status="pending", error="")


class Scheduler:
    """Keeps `jobs` cell processes running; records each cell's result as it ends."""

    def __init__(
        self,
        grid: Grid,
        layout: Layout,
        todo: list[Cell],
        jobs: int,
        threads: int,
        log: Callable[[str], None],
        done: int,
    ) -> None:
        self.grid, self.layout, self.todo, self.jobs, self.threads, self.log = (
            grid,
            layout,
            todo,
            jobs,
            threads,
            log,
        )
        self.total, self.finished = len(grid.cells), done
        self.running: dict[str, tuple[Cell, subprocess.Popen, float, Any]] = {}  # by cell name
        self.resumed: set[str] = set()  # cells continued from an earlier run's checkpoint
        self.times: dict[str, list[float]] = {}

    def run(self) -> None:
        pending = list(self.todo)
        try:
            while pending or self.running:
                while pending and len(self.running) < self.jobs:
                    self.launch(pending.pop(0))
                time.sleep(0.2)
                for name in [n for n, (_, p, _, _) in self.running.items() if p.poll() is not None]:
                    self.finish(name, pending)
        except KeyboardInterrupt:
            for _, proc, _, _ in self.running.values():
                proc.wait()  # the cells got the same Ctrl-C: let them write their checkpoints
            self.log(f"interrupted: rerun the same command to continue ({self.layout.out} keeps every cell)")
            raise

    def launch(self, cell: Cell) -> None:
        command = cell_command(self.grid, cell, self.layout, self.threads)
        if (self.layout.run_dir(cell) / STATE_FILE).is_file():  # before the cell can write one; else
            self.resumed.add(cell.name)  # `--resume` starts it over
        log = open(self.layout.log(cell), "a")  # noqa: SIM115 (closed when the cell ends)
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "COLUMNS": "120"}
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
        )
        self.running[cell.name] = (cell, proc, time.monotonic(), log)

    def finish(self, name: str, pending: list[Cell]) -> None:
        cell, proc, started, log = self.running.pop(name)
        log.close()
        wall = time.monotonic() - started
        if proc.returncode == 0:
            try:
                result = summarise_cell(self.grid, cell, self.layout, wall)
            except (OSError, ValueError, KeyError, UserError) as e:
                result = {**missing(cell), "error": f"finished, but its results are unreadable: {e}"}
        else:
            result = {**missing(cell), "error": cell_error(self.layout.log(cell), proc.returncode)}
        result["wall_s"], result["resumed"] = wall, name in self.resumed
        atomic_write(self.layout.result(cell), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        self.finished += 1
        write_current_summary(self.grid, self.layout)  # a partial summary as each cell finishes
        if result["status"] == "ok":  # a failure's time says nothing of what a cell costs
            self.times.setdefault(cell.variant.name, []).append(full_time(result))
        self.log(f"[{self.finished}/{self.total}] {progress_line(result)}  ETA {self.eta(pending)}")

    def eta(self, pending: list[Cell]) -> str:
        """Remaining wall time: each left cell costs its variant's mean so far, or, for a variant not
        yet timed, the mean time per epoch times its epochs (a grid's long cells come last)."""
        if not self.times:
            return "?"
        per_epoch = statistics.fmean(
            t / self.grid.configs[v].epochs for v, ts in self.times.items() for t in ts
        )

        def cost(cell: Cell) -> float:
            if cell.variant.name in self.times:
                return statistics.fmean(self.times[cell.variant.name])
            return per_epoch * self.grid.configs[cell.variant.name].epochs

        now = time.monotonic()
        left = [max(cost(c) - (now - started), 0.0) for c, _, started, _ in self.running.values()]
        return format_seconds(finish_time(left, [cost(c) for c in pending], self.jobs))


def finish_time(running: list[float], queued: list[float], jobs: int) -> float:
    """When the last cell ends: running cells hold their slots for the time they have left; each
    queued cell takes the first slot to free up, in order (as the scheduler launches them)."""
    slots = sorted(running + [0.0] * (jobs - len(running)))  # a sorted list is a heap
    for cost in queued:
        heapq.heapreplace(slots, slots[0] + cost)
    return max(slots, default=0.0)


def full_time(result: dict[str, Any]) -> float:
    """What a finished cell cost: a resumed cell's wall time covers only its last run, so its epochs'
    training time (every run's, from the metrics) stands in for it; the ETA would otherwise shrink."""
    return result["train_s"] if result["resumed"] else result["wall_s"]


def progress_line(result: dict[str, Any]) -> str:
    if result["status"] != "ok":
        return f"{result['cell']}: FAILED ({result['error']})"
    resumed = " (resumed: this run's part)" if result["resumed"] else ""
    return (
        f"{result['cell']}: best top-1 {result['best_acc1']:.4f}, final {result['final_acc1']:.4f}, "
        f"{result['img_per_s']:.0f} img/s, {format_seconds(result['wall_s'])}{resumed}"
    )


def format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------
def summarise(grid: Grid, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: mean and (sample) standard deviation over its finished seeds."""
    rows = []
    for variant in grid.variants:
        mine = [r for r in results if r["variant"] == variant.name]
        ok = [r for r in mine if r["status"] == "ok"]
        failed = [r for r in mine if r["status"] == "failed"]

        def stats(key: str, cells: list[dict[str, Any]] = ok) -> tuple[float, float]:
            values = [c[key] for c in cells]
            if not values:
                return math.nan, math.nan
            return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan

        rows.append(
            dict(
                variant=variant.name,
                seeds=len(ok),
                seeds_planned=grid.seeds_of(variant),
                failed=len(failed),
                params=ok[0]["params"] if ok else None,
                macs=ok[0]["macs"] if ok else None,
                best_acc1_mean=stats("best_acc1")[0],
                best_acc1_std=stats("best_acc1")[1],
                final_acc1_mean=stats("final_acc1")[0],
                final_acc1_std=stats("final_acc1")[1],
                img_per_s=stats("img_per_s")[0],
                train_s=stats("train_s")[0],
                wall_s=stats("wall_s", [c for c in ok if not c.get("resumed")])[0],
                resumed=sum(bool(c.get("resumed")) for c in ok),  # their wall time is a part: left out
                overrides=json.dumps(variant.overrides, sort_keys=True),
                error=failed[0]["error"] if failed else "",
            )
        )
    return rows


def comparisons(grid: Grid, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each `compare:` pair: the mean paired difference of best top-1, its 95 % confidence interval and
    a paired t-test over the shared seeds, Holm-corrected over the grid's pairs.

    A seed fixes the data order (and the random streams) of both arms, so the test pairs the two
    cells of each seed: it asks whether the per-seed difference is consistently away from zero,
    which seed-to-seed swings common to both arms do not blur. Testing several pairs at once raises
    the chance that one looks real by luck; Holm's step-down correction keeps that chance at 5 % for
    the whole family. A difference is called real only at a corrected p < 0.05.
    """
    out = []
    for variant, reference in grid.compare:
        a, b = (
            {r["seed"]: r["best_acc1"] for r in results if r["variant"] == name and r["status"] == "ok"}
            for name in (variant, reference)
        )
        seeds = sorted(set(a) & set(b))
        row = dict(variant=variant, reference=reference, seeds=len(seeds))
        out.append({**row, **paired_difference([a[s] - b[s] for s in seeds])})
    for row, p in zip(out, holm([r["p_value"] for r in out]), strict=True):
        row["p_holm"] = p
        if math.isnan(p):
            row["verdict"] = "too few seeds"
        else:
            row["verdict"] = (
                ("better" if row["difference"] > 0 else "worse") if p < 0.05 else "inside the noise"
            )
    return out


def paired_difference(differences: list[float]) -> dict[str, float]:
    """Mean of per-seed differences, its 95 % t-interval and the two-sided one-sample t-test p-value."""
    n = len(differences)
    if n < 2:
        return dict(difference=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan)
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0:  # identical differences: certain, or no difference at all
        return dict(difference=mean, ci_low=mean, ci_high=mean, p_value=0.0 if mean else 1.0)
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    p = float(scipy.stats.ttest_1samp(differences, 0.0).pvalue)
    return dict(difference=mean, ci_low=mean - half, ci_high=mean + half, p_value=p)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN, for a pair without enough seeds, stays NaN and is not
    counted in the family)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def comparisons_table(rows: list[dict[str, Any]]) -> str:
    header = "| variant | against | seeds | Δ best top-1 (points) | 95 % CI | p (paired t) | p (Holm) "
    lines = [header + "| reading |\n|---|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        known = not math.isnan(r["difference"])
        diff = f"{100 * r['difference']:+.2f}" if known else "–"
        ci = f"[{100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f}]" if known else "–"
        p, holm_p = ("–" if math.isnan(r[k]) else f"{r[k]:.3f}" for k in ("p_value", "p_holm"))
        cells = (r["variant"], r["reference"], str(r["seeds"]), diff, ci, p, holm_p, r["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(grid: Grid, results: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """summary.md / .csv / .json, cells.csv (every cell) and ablation.png, each written atomically."""
    rows = summarise(grid, results)
    compared = comparisons(grid, results)
    finished = sum(r["status"] == "ok" for r in results)
    doc = dict(
        grid=grid.path,
        complete=finished == len(results),
        cells_finished=finished,
        cells_total=len(results),
        recipe=grid.recipe,
        model=grid.model,
        settings=grid.settings,
        seeds=grid.seeds,
        variants=rows,
        comparisons=compared,
        cells=results,
    )
    atomic_write(
        out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, default=str))
    )
    atomic_write(out / "summary.csv", lambda tmp: Path(tmp).write_text(to_csv(rows, SUMMARY_FIELDS)))
    cell_fields = (
        "cell",
        "variant",
        "seed",
        "status",
        "epochs",
        "best_acc1",
        "final_acc1",
        "final_val_loss",
        "params",
        "macs",
        "img_per_s",
        "train_s",
        "wall_s",
        "resumed",
        "cpu",
        "error",
    )
    atomic_write(out / "cells.csv", lambda tmp: Path(tmp).write_text(to_csv(results, cell_fields)))
    text = markdown_table(rows) + ("\n" + comparisons_table(compared) if compared else "")
    if finished < len(results):
        text = f"**Partial: {finished} of {len(results)} cells finished.**\n\n" + text
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(text))
    if any(r["seeds"] for r in rows):
        title = grid.description or Path(grid.path).stem
        plot_ablation(rows, out / "ablation.png", title=title)
        plot_learning_curves(results, out / "curves.png", title=title)
    return rows


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: accuracies in % (mean ± std over seeds)."""

    def pct(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "–"
        return f"{100 * mean:.2f} ± {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"

    header = ("variant", "seeds", "params", "MMACs", "best top-1 %", "final top-1 %", "train img/s")
    header += ("train s", "wall s", "note")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * 8 + "---|"]
    for r in rows:
        size = (f"{r['params'] / 1e6:.3f} M", f"{r['macs'] / 1e6:.2f}") if r["params"] else ("–", "–")
        notes = [f"{r['failed']} failed: {r['error']}"] if r["failed"] else []
        notes += [f"wall s without {r['resumed']} resumed"] if r["resumed"] else []
        note = "; ".join(notes)
        timing = (
            ("–", "–", "–")
            if not r["seeds"]
            else (
                f"{r['img_per_s']:.0f}",
                f"{r['train_s']:.1f}",
                "–" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.1f}",
            )
        )
        best = pct(r["best_acc1_mean"], r["best_acc1_std"])
        final = pct(r["final_acc1_mean"], r["final_acc1_std"])
        seeds = (
            str(r["seeds"]) if r["seeds"] == r["seeds_planned"] else f"{r['seeds']} of {r['seeds_planned']}"
        )
        cells = (r["variant"], seeds, *size, best, final, *timing, note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
