"""`sret ablate` and model variants as data: grids, resumable cells, summaries, clear errors."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sret.ablate import (
    GRIDS,
    RUN_FIELDS,
    Layout,
    Scheduler,
    check_same_grid,
    finish_time,
    full_time,
    load_grid,
    run_grid,
)
from sret.checkpoint import create_model
from sret.io import UserError
from sret.train import FAULT_EXIT_AFTER_CHECKPOINT, FAULT_INTERRUPT_AFTER_STEP, STATE_FILE
from sret.variants import resolve_overrides

TINY_SET = dict(epochs=1, train_subset=64, val_subset=32, batch_size=32, warmup_epochs=0)


def write_grid(tmp_path: Path, variants: dict, **extra) -> Path:
    spec = dict(recipe="digits", set=TINY_SET, variants=variants, **{"seeds": 1, **extra})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stable(rows: list[dict]) -> list[dict]:
    """A summary's rows without the timings, which differ between identical runs."""
    return [{k: v for k, v in row.items() if k not in RUN_FIELDS} for row in rows]


def test_stage_fields_apply_to_every_stage_or_one_per_stage() -> None:
    plain = resolve_overrides("sret_nano", {"loops": 1, "nll": "none"})
    assert plain["nll"] == "none"
    assert [s["loops"] for s in plain["stages"]] == [1, 1, 1]
    assert plain["stages"][0]["groups"] == [2] and plain["stages"][0]["permute"] == [False]
    deep = resolve_overrides("sret_nano", {"loops": [4, 2, 1], "permute": True})
    first = deep["stages"][0]
    assert first["groups"] == [2, 2, 2, 2]  # the last loop's settings repeat for new loops
    assert first["permute"] == [False, True, True, True]  # the paper permutes the recursions only
    layered = resolve_overrides("sret_nano", {"stem": "patch", "patch_size": 4}, {"groups": [[4, 2], 1, 1]})
    assert layered["stem"] == "patch" and layered["stages"][0]["groups"] == [4, 2]
    assert resolve_overrides("sret_nano", {}) == {}  # nothing changed: nothing to store
    model = create_model("sret_nano", **json.loads(json.dumps(deep)))  # as a checkpoint's metadata
    assert [stage.schedule.num_nlls for stage in model.stages] == [4, 2, 1]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loopz": 2}, "unknown model option"),
        ({"groups": [2, 2]}, "one entry per stage"),
        ({"loops": 2, "groups": [[2, 2, 2], 1, 1]}, "one entry per loop"),
        ({"heads": 3}, "heads (3) must divide dim"),
        ({"stages": [{"dim": 32}], "loops": 2}, "not both"),
    ],
)
def test_invalid_overrides_say_what_is_wrong(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_overrides("sret_nano", overrides)


def test_train_takes_model_args_and_its_weights_rebuild_the_variant(tmp_path: Path) -> None:
    from sret.evaluate import load_trained
    from sret.train import resolve_config, train

    cfg = resolve_config(
        "digits",
        output=str(tmp_path),
        name="r",
        model_args={"loops": 1, "residual_coefficients": False},
        **TINY_SET,
    )
    run = train(cfg)
    model = load_trained(run / "best.safetensors").model
    assert [stage.schedule.num_nlls for stage in model.stages] == [1, 1, 1]
    assert not model.cfg.residual_coefficients
    with pytest.raises(UserError, match=r"model_args .*unknown model option\(s\) loopz"):
        resolve_config("digits", model_args={"loopz": 1})


def test_a_small_grid_writes_table_csv_json_and_plot_then_a_rerun_skips_it(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        {"plain": {"loops": 1, "nll": "none", "residual_coefficients": False}, "sret": {}},
        description="tiny",
        compare=[["sret", "plain"]],
    )
    grid = load_grid(str(path))
    lines: list[str] = []
    results = run_grid(grid, tmp_path / "out", jobs=2, log=lines.append)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert sum(line.startswith("[") and "ETA" in line for line in lines) == 2  # a line per cell
    out = tmp_path / "out"
    table = (out / "summary.md").read_text()
    assert "| plain | 1 |" in table and "| sret | 1 |" in table
    assert "| sret | plain | 1 | – | – | – | – | too few seeds |" in table  # one seed: no test
    assert "Partial" not in table and json.loads((out / "summary.json").read_text())["complete"]
    assert (out / "curves.png").stat().st_size > 10_000
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["variant"] for r in rows] == ["plain", "sret"]
    plain, sret = rows
    assert int(plain["params"]) < int(sret["params"]) and int(plain["macs"]) < int(sret["macs"])
    assert 0.0 <= float(sret["best_acc1_mean"]) <= 1.0
    doc = json.loads((out / "summary.json").read_text())
    assert len(doc["cells"]) == 2 and doc["variants"][0]["seeds"] == 1
    assert (out / "ablation.png").stat().st_size > 10_000
    before = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")}
    again: list[str] = []
    assert stable(run_grid(grid, out, log=again.append)) == stable(results)
    assert "(2 already finished, 0 to run)" in again[0] and len(again) == 1  # nothing was trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")} == before
    # one cell rerun elsewhere (a reproduction): the same result, the rest of that grid pending
    alone = run_grid(grid, tmp_path / "check", threads=1, only=["sret-s0"], log=again.append)  # as jobs=2
    assert [r["status"] for r in alone] == ["pending", "ok"]
    assert stable([alone[1]]) == stable([results[1]])
    with pytest.raises(UserError, match=r"has no cell sret-s9 \(cells: plain-s0, sret-s0\)"):
        run_grid(grid, tmp_path / "check", only=["sret-s9"])


def test_a_failed_cell_is_reported_and_does_not_stop_the_others(tmp_path: Path) -> None:
    grid = load_grid(str(write_grid(tmp_path, {"a": {"loops": 1}, "b": {}})))
    broken = tmp_path / "out" / "cells" / "a-s0"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("model: [")  # a cell folder damaged outside sret
    lines: list[str] = []
    results = run_grid(grid, tmp_path / "out", log=lines.append)
    assert [r["status"] for r in results] == ["failed", "ok"]
    assert "cannot parse run config" in results[0]["error"]
    failed = next(line for line in lines if "a-s0: FAILED (cannot parse run config" in line)
    assert failed.endswith("ETA ?")  # nothing timed yet: a failure's seconds are not a cell's cost
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| a | 0 of 1 |" in table and "1 failed: cannot parse run config" in table and "| b | 1 |" in table
    assert table.startswith("**Partial: 1 of 2 cells finished.**")  # the failed cell reruns next time


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("variants: [", "cannot parse grid"),
        ("recipe: digits\n", "needs `variants:`"),
        ("variants: {a: {}}\nextra: 1\n", "unknown key(s) extra"),
        ("variants: {fast: {loopz: 2}}\n", "variant 'fast': unknown model option(s) loopz"),
        ("variants: {many: {groups: 64}}\n", "variant 'many': stage 0 has 16 tokens"),
        ("variants: {x: {}}\nset: {output: here}\n", "output are set by `sret ablate`"),
        ("variants: {x: {}}\nset: {epochz: 1}\n", "grid.yaml: unknown config option(s): epochz"),
        ("variants: {x: {}}\ncompare: [[x, y]]\n", "`compare:` names unknown variant(s) y"),
        ("variants: {x: {}}\ncompare: [x]\n", "`compare:` must be a list of [variant, reference] pairs"),
        ("variants: {x: {}}\nseeds: null\n", "grid.yaml: seeds must be a whole number >= 1, got None"),
        ("variants: {x: {}}\nseeds: three\n", "grid.yaml: seeds must be a whole number >= 1, got 'three'"),
        ("variants: {x: {}}\nseeds: 1.9\n", "grid.yaml: seeds must be a whole number >= 1, got 1.9"),
        ("variants: {x: {}}\nseeds: true\n", "grid.yaml: seeds must be a whole number >= 1, got True"),
        ("variants: {x: {}}\nseeds: 0\n", "grid.yaml: seeds must be a whole number >= 1, got 0"),
    ],
)
def test_a_broken_grid_is_one_clear_error_before_any_training(
    content: str, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(content)
    with pytest.raises(UserError) as error:
        load_grid(str(path))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_another_grid_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    grid = load_grid(str(write_grid(tmp_path, {"a": {"loops": 1}})))
    (tmp_path / "out").mkdir()
    check_same_grid(grid, Layout(tmp_path / "out"))  # what run_grid stamps the folder with first
    other = load_grid(str(write_grid(tmp_path, {"a": {"loops": 2}})))
    with pytest.raises(UserError, match="holds the cells of another grid"):
        run_grid(other, tmp_path / "out", log=lambda _: None)


def test_a_killed_cell_resumes_on_rerun_and_gives_the_uninterrupted_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(epochs=2, train_subset=128, val_subset=64, batch_size=32, warmup_epochs=0)
    spec = dict(recipe="digits", set=settings, seeds=1, variants={"b": {}})
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    grid = load_grid(str(path))
    straight = run_grid(grid, tmp_path / "straight", threads=1, log=lambda _: None)
    monkeypatch.setenv(FAULT_EXIT_AFTER_CHECKPOINT, "1")  # the cell process exits hard after epoch 1
    lines: list[str] = []
    [killed] = run_grid(grid, tmp_path / "killed", threads=1, log=lines.append)
    assert killed["status"] == "failed" and any("b-s0: FAILED" in line for line in lines)
    state = tmp_path / "killed" / "cells" / "b-s0" / "last_state.pt"
    assert torch.load(state, weights_only=True)["epoch"] == 1
    monkeypatch.delenv(FAULT_EXIT_AFTER_CHECKPOINT)
    lines.clear()
    rerun = run_grid(grid, tmp_path / "killed", threads=1, log=lines.append)
    assert "(0 already finished, 1 to run)" in lines[0]
    log = (tmp_path / "killed" / "logs" / "b-s0.log").read_text().splitlines()
    launches = [line for line in log if line.startswith("$ ")]
    assert len(launches) == 2 and "--resume" in launches[1]  # the failed cell resumed, not restarted
    assert stable(rerun) == stable(straight)
    assert rerun[0]["resumed"] and not straight[0]["resumed"]
    assert "(resumed: this run's part)" in lines[-1]
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("straight", "killed"))
    assert stable(two["variants"]) == stable(one["variants"])
    # The resumed cell's wall time covers its second run only: no mean is made of it.
    assert two["variants"][0]["resumed"] == 1 and math.isnan(two["variants"][0]["wall_s"])
    assert "wall s without 1 resumed" in (tmp_path / "killed" / "summary.md").read_text()


def test_a_cell_stopped_before_its_first_checkpoint_starts_over_and_is_not_called_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = load_grid(str(write_grid(tmp_path, {"a": {"loops": 1}})))
    monkeypatch.setenv(FAULT_INTERRUPT_AFTER_STEP, "1")  # Ctrl-C in the cell before any checkpoint
    [stopped] = run_grid(grid, tmp_path / "out", threads=1, log=lambda _: None)
    run_dir = tmp_path / "out" / "cells" / "a-s0"
    assert stopped["status"] == "failed" and not (run_dir / STATE_FILE).exists()
    monkeypatch.delenv(FAULT_INTERRUPT_AFTER_STEP)
    lines: list[str] = []
    [rerun] = run_grid(grid, tmp_path / "out", threads=1, log=lines.append)
    launches = [
        ln for ln in (tmp_path / "out" / "logs" / "a-s0.log").read_text().splitlines() if ln.startswith("$ ")
    ]
    assert len(launches) == 2 and "--resume" in launches[1]  # launched as a resume: it starts over
    assert rerun["status"] == "ok" and not rerun["resumed"]  # so its wall time is the whole cell's
    assert "resumed" not in next(line for line in lines if "a-s0: best top-1" in line)


def test_a_resumed_cell_costs_its_whole_training_in_the_eta() -> None:
    resumed = dict(status="ok", resumed=True, train_s=1500.0, wall_s=300.0)  # the last 3 of 15 epochs
    assert full_time(resumed) == 1500.0
    assert full_time({**resumed, "resumed": False, "wall_s": 1600.0}) == 1600.0


def test_the_eta_fills_free_slots_in_order_and_never_splits_one_cell_across_jobs() -> None:
    assert finish_time([3000.0], [], jobs=2) == 3000.0  # the last cell alone: not halved
    assert finish_time([100.0, 500.0], [300.0, 300.0], jobs=2) == 700.0  # 100+300, then 400+300
    assert finish_time([], [10.0, 10.0, 10.0], jobs=2) == 20.0
    assert finish_time([], [], jobs=2) == 0.0


def test_a_variant_not_yet_timed_costs_the_mean_epoch_times_its_epochs(tmp_path: Path) -> None:
    grid = load_grid(str(write_grid(tmp_path, {"short": {"loops": 1}, "long": {"set": {"epochs": 3}}})))
    scheduler = Scheduler(grid, Layout(tmp_path / "out"), [], jobs=2, threads=1, log=print, done=0)
    assert scheduler.eta([]) == "?"  # nothing timed yet
    scheduler.times = {"short": [100.0]}  # 1 epoch in 100 s
    short, long = ({c.variant.name: c for c in grid.cells}[name] for name in ("short", "long"))
    assert scheduler.eta([long]) == "5m00s"  # 3 epochs at 100 s, on one of the two slots
    assert scheduler.eta([long, short, short]) == "5m00s"  # two short ones beside the long one
    assert scheduler.eta([short, short, long]) == "6m40s"  # in launch order: the long one goes last


# A process that starts a child the way `sret ablate` starts a cell, then prints the child's id; the
# child holds the write end of a pipe (its file descriptor is argv[1]) and waits for a signal.
CELL_PARENT = """
import subprocess, sys
from sret.runtime import die_with_parent
child = subprocess.Popen(
    [sys.executable, "-c", "import signal; signal.pause()"],
    pass_fds=(int(sys.argv[1]),),
    preexec_fn=die_with_parent,
)
print(child.pid, flush=True)
child.wait()
"""


def test_a_cell_dies_with_its_grid() -> None:
    """A SIGKILLed `sret ablate` leaves no cell training on (a rerun would train it twice at once)."""
    read, write = os.pipe()
    parent = subprocess.Popen(
        [sys.executable, "-c", CELL_PARENT, str(write)], pass_fds=(write,), stdout=subprocess.PIPE, text=True
    )
    os.close(write)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        ready, _, _ = select.select([read], [], [], 120)  # end of file once the child is gone
        assert ready and os.read(read, 1) == b"", "the child outlived its killed parent"
    finally:
        os.close(read)
        if parent.stdout:
            parent.stdout.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_comparisons_are_welch_tests_over_seeds() -> None:
    from sret.ablate import Grid, Variant, comparisons

    grid = Grid("g", "digits", "sret_nano", {}, 3, [Variant("a", {}, {}), Variant("b", {}, {})])
    grid.compare = [("a", "b")]

    def cells(a: list[float], b: list[float]) -> list[dict]:
        rows = [dict(variant="a", seed=s, status="ok", best_acc1=x) for s, x in enumerate(a)]
        return rows + [dict(variant="b", seed=s, status="ok", best_acc1=x) for s, x in enumerate(b)]

    clear = comparisons(grid, cells([0.70, 0.71, 0.72], [0.60, 0.61, 0.60]))[0]
    assert clear["verdict"] == "better" and clear["p_value"] < 0.05
    assert clear["difference"] == pytest.approx(0.1067, abs=1e-3)
    noisy = comparisons(grid, cells([0.60, 0.64, 0.58], [0.61, 0.59, 0.62]))[0]
    assert noisy["verdict"] == "inside the noise"
    # seed-to-seed swings common to both arms: a consistent per-seed gain is still found
    paired = comparisons(grid, cells([0.581, 0.601, 0.621], [0.571, 0.590, 0.612]))[0]
    assert paired["verdict"] == "better"


def test_the_shipped_grids_resolve() -> None:
    shipped = sorted(p.stem for p in GRIDS.glob("*.yaml"))
    assert {"cifar10", "imagenet"} <= set(shipped)
    grid = load_grid("cifar10", data_dir="/nonexistent")  # checked without reading the data
    assert len(grid.variants) >= 8 and grid.seeds >= 3
    by_name = {v.name: v for v in grid.variants}
    assert by_name["plain"].model_args["nll"] == "none"
    assert [s["loops"] for s in by_name["sret_deep"].model_args["stages"]] == [8, 8, 8]


def test_a_cell_starts_from_the_weights_an_earlier_grid_made_for_its_seed(tmp_path: Path) -> None:
    first = load_grid(str(write_grid(tmp_path, {"source": {"loops": 1}, "longer": {"set": {"epochs": 2}}})))
    assert {v.name: first.configs[v.name].epochs for v in first.variants} == {"source": 1, "longer": 2}
    run_grid(first, tmp_path / "first", only=["source-s0"], log=lambda _: None)  # the cell the next uses
    weights = "{out}/../../first/cells/source-s{seed}/last.safetensors"
    (tmp_path / "second").mkdir()
    second = load_grid(str(write_grid(tmp_path / "second", {"tuned": {"set": {"checkpoint": weights}}})))
    [result] = run_grid(second, tmp_path / "second" / "out", log=lambda _: None)
    assert result["status"] == "ok", result
    config = yaml.safe_load((tmp_path / "second" / "out" / "cells" / "tuned-s0" / "config.yaml").read_text())
    assert config["checkpoint"].endswith("first/cells/source-s0/last.safetensors")
    assert [s["loops"] for s in config["model_args"]["stages"]] == [1, 1, 1]  # the source's architecture


def test_paired_differences_have_t_intervals_and_holm_corrected_p_values() -> None:
    from sret.ablate import holm, paired_difference

    row = paired_difference([0.01, 0.02, 0.03])
    half = 4.302652729911275 * 0.01 / 3**0.5  # t(0.975, 2 df) * sd / sqrt(n)
    assert row["difference"] == pytest.approx(0.02)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half))
    # t = 0.02 / (0.01 / sqrt 3) = sqrt 12 on 2 df: two-sided p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14)
    assert row["p_value"] == pytest.approx(1 - (12 / 14) ** 0.5)
    assert paired_difference([0.02, 0.02]) == dict(difference=0.02, ci_low=0.02, ci_high=0.02, p_value=0.0)
    assert all(x != x for x in paired_difference([0.5]).values())  # one seed: nothing to say
    # Holm: the smallest p times 3, the next times 2 (never below the one before), the last times 1
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([float("nan"), 0.02, 0.5])  # a pair without seeds is not in the family
    assert adjusted[0] != adjusted[0] and adjusted[1:] == pytest.approx([0.04, 0.5])


def test_variants_run_their_own_seeds_compared_cells_first_and_a_partial_summary_says_so(
    tmp_path: Path,
) -> None:
    from sret.ablate import pending, plan, write_summary

    path = write_grid(
        tmp_path,
        {"long": {"loops": 1, "seeds": 1, "set": {"epochs": 2}}, "a": {"loops": 1, "seeds": 3}, "b": {}},
        compare=[["a", "b"]],
        seeds=2,
    )
    grid = load_grid(str(path))
    assert [c.name for c in grid.cells] == ["a-s0", "b-s0", "a-s1", "b-s1", "a-s2", "long-s0"]
    table = plan(grid)
    assert "| a | 3 | 1 |" in table and "| long | 1 | 2 |" in table and "| b | 2 | 1 |" in table
    done = [dict(cell=f"{v}-s{s}", variant=v, seed=s, status="ok", best_acc1=0.5 + s / 100 + (v == "a") / 10,
                 final_acc1=0.5, params=10, macs=20, img_per_s=1.0, train_s=1.0, wall_s=1.0, curve=[0.3, 0.5])
            for v, s in (("a", 0), ("b", 0), ("a", 1), ("b", 1))]  # fmt: skip
    cells = done + [pending(c) for c in grid.cells[4:]]
    rows = write_summary(grid, cells, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("**Partial: 4 of 6 cells finished.**")
    assert "| a | 2 of 3 |" in text and "| long | 0 of 1 |" in text and "failed" not in text
    assert [r["failed"] for r in rows] == [0, 0, 0]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert not doc["complete"] and doc["cells_finished"] == 4 and doc["cells_total"] == 6
    assert doc["comparisons"][0]["difference"] == pytest.approx(0.1)


@pytest.mark.parametrize("seeds", [0, 1.5, "three", True])
def test_a_variants_seed_count_must_be_a_whole_number(tmp_path: Path, seeds: object) -> None:
    path = write_grid(tmp_path, {"a": {"loops": 1, "seeds": seeds}})
    with pytest.raises(UserError, match=r"variant 'a': seeds must be a whole number >= 1"):
        load_grid(str(path))
