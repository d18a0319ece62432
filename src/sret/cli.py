"""The `sret` command-line tool."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import typer

app = typer.Typer(
    name="sret",
    help="Sliced Recursive Transformer: model zoo, training, evaluation, benchmarks and export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


LOOPS_HELP = "Loops per block: one count for every stage, or one per stage (3 or 3,2,2)."
MODEL_HELP = "Architecture of a checkpoint without metadata (the authors' .pth), e.g. sret_t."
OVERWRITE_HELP = "Replace the output file if it exists (otherwise an existing file is an error)."
INTERRUPTED = "interrupted: nothing written"
EXIT_CONFIDENCE_HELP = "Early exit: run each image at 1, 2, ... loops until its top probability reaches this."


@app.command("models")
def models_cmd() -> None:
    """List the model zoo."""
    from sret.info import print_zoo

    print_zoo()


@app.command("info")
def info_cmd(
    name: str = typer.Argument(..., help="Model name, e.g. sret_t, or one of our .safetensors."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: the model's)."),
    loops: str | None = typer.Option(None, "--loops", help=LOOPS_HELP),
    sets: list[str] = typer.Option(
        [], "--set", help="Model option KEY=VALUE, repeatable (e.g. loop_lora_rank=4, nll=block)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Params and MACs of a model, split by stem / attention / MLP / NLL / adapters / pooling / head
    and by stage."""
    import json

    from sret.info import info_source, model_info, print_info
    from sret.io import UserError
    from sret.train import parse_sets

    try:
        name, overrides = info_source(name, parse_sets(sets))
        stored_size = overrides.pop("img_size", None)  # a checkpoint's own resolution
        info = model_info(name, img_size or stored_size, parse_loops(loops), **overrides)
    except (ValueError, TypeError, UserError) as e:
        raise _user_error(e, code=2) from None
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
    else:
        print_info(info)


@app.command("bench")
def bench_cmd(
    models: list[str] | None = typer.Argument(None, help="Models to time (default: sret_t sret_t_noslice)."),
    batch: int = typer.Option(32, "--batch", min=1, help="Images per step."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: each model's)."),
    train: bool = typer.Option(False, "--train", help="Time a training step: forward + backward + AdamW."),
    compile_: bool = typer.Option(
        False, "--compile", help="torch.compile(model, fullgraph=True); keep --warmup >= 1 (it compiles)."
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    amp: str | None = typer.Option(None, "--amp", help="Autocast dtype: bf16."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default: torch's)."),
    shuffle: str | None = typer.Option(None, "--shuffle", help="Override SReT shuffle: none, fixed, random."),
    loops: str | None = typer.Option(None, "--loops", help="SReT models: " + LOOPS_HELP),
    drop_path: float = typer.Option(
        0.1, "--drop-path", help="Stochastic depth rate, the same for every model (training cost)."
    ),
    grad_checkpointing: bool = typer.Option(
        False, "--grad-checkpointing", help="Checkpoint every block application (all models)."
    ),
    compare_checkpointing: bool = typer.Option(
        False, "--compare-checkpointing", help="Run each model without and with checkpointing; print ratios."
    ),
    reference: bool = typer.Option(
        True, "--reference/--no-reference", help="Include deit_tiny_patch16_224 and pit_ti_224."
    ),
    compare_plain: bool = typer.Option(
        False, "--compare-plain", help="Also run each SReT model on torch's kernels alone; print ratios."
    ),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory of one step."),
    attention_time: bool = typer.Option(
        False, "--attention-time", help="Also report each step's time in attention (CPU, eager)."
    ),
    part_time: bool = typer.Option(
        False, "--part-time", help="Also report each step's time per part: stem, stages, head (CPU, eager)."
    ),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed rounds first."),
    repeats: int = typer.Option(10, "--repeats", min=1, help="Timed rounds (median reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    model_files: list[str] | None = typer.Option(
        None,
        "--model-file",
        help="Python file registering more timm models, imported first (repeatable): e.g. the authors' "
        "SReT.py, to time its SReT_T beside sret_t.",
    ),
) -> None:
    """Images/s, latency, peak memory and GFLOP/s (and % of matmul peak) next to timm references."""
    import json

    import timm
    from rich.console import Console

    import sret  # noqa: F401  (registers the SReT variants with timm)
    from sret.bench import (
        DEFAULT_MODELS,
        REFERENCES,
        BenchConfig,
        BenchError,
        contenders,
        import_model_files,
        print_report,
        run_benchmark,
    )

    try:
        cfg = BenchConfig(
            batch=batch,
            img_size=img_size,
            train=train,
            compile=compile_,
            device=device,
            amp=amp,
            threads=threads,
            shuffle=shuffle,
            loops=parse_loops(loops),
            drop_path=drop_path,
            warmup=warmup,
            repeats=repeats,
            memory=memory,
            attention_time=attention_time,
            part_time=part_time,
            model_files=tuple(model_files or ()),
        )
        import_model_files(cfg.model_files)
        unknown = [name for name in models or () if not timm.is_model(name)]
        if unknown:
            raise ValueError(f"unknown model(s): {', '.join(unknown)} (see `sret models`)")
    except ValueError as e:
        raise _user_error(e, code=2) from None
    references = REFERENCES if reference else ()
    entries = contenders(
        models or DEFAULT_MODELS, references, grad_checkpointing, compare_checkpointing, compare_plain
    )
    console = Console(stderr=True, log_path=False)  # a time on each progress line, not cli.py:NNN
    log: Callable[[str], None] = console.log
    if not console.is_terminal:  # in a file: one unwrapped line per message, each with its time
        log = lambda msg: typer.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)  # noqa: E731
    try:
        result = run_benchmark(entries, cfg, log=log)
    except BenchError as e:
        raise _user_error(e, code=2) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_report(result)


def parse_loops(text: str | None) -> int | tuple[int, ...] | None:
    """`--loops 3` or `--loops 3,2,2` (one per stage); a bad value is a usage error."""
    if text is None:
        return None
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise _user_error(
            ValueError(f"--loops takes whole numbers, e.g. 3 or 3,2,2; got {text!r}"), code=2
        ) from None
    if any(c < 1 for c in counts):
        raise _user_error(ValueError(f"--loops must be >= 1, got {text!r}"), code=2)
    return counts[0] if len(counts) == 1 else counts


def _user_error(e: BaseException, code: int = 1) -> typer.Exit:
    """Print one `error:` line for a problem the user can fix; the caller raises the returned Exit.

    Errors re-raised from data-loader workers carry the worker traceback; its last line is the cause,
    less the exception's class name.
    """
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    last = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else type(e).__name__
    typer.echo(f"error: {last}", err=True)
    return typer.Exit(code)


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    recipe: str = typer.Option("digits", "--recipe", "-r", help="Shipped recipe name or a YAML file."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override any config option: key=value."),
    model: str | None = typer.Option(None, "--model", help="Model to train (default: the recipe's)."),
    dataset: str | None = typer.Option(
        None, "--dataset", help="digits, cifar10, cifar100, fashion_mnist or imagefolder."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    epochs: int | None = typer.Option(None, "--epochs", min=1),
    batch_size: int | None = typer.Option(None, "--batch-size", min=1, help="Global batch (all processes)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    output: str | None = typer.Option(None, "--output", help="Parent folder of run folders (default runs)."),
    name: str | None = typer.Option(None, "--name", help="Run folder name (default: dataset-model-time)."),
    resume: str | None = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    amp: str | None = typer.Option(None, "--amp", help="Mixed precision: none, bf16 or fp16 (GPU)."),
    compile_: str | None = typer.Option(
        None, "--compile", help="torch.compile the training forward with this backend, e.g. inductor."
    ),
    teacher: str | None = typer.Option(
        None, "--teacher", help="Distill from a timm model name or checkpoint."
    ),
    teacher_logits: str | None = typer.Option(
        None, "--teacher-logits", help="Distill from precomputed logits (file with a 'logits' tensor)."
    ),
    distill_alpha: float | None = typer.Option(None, "--distill-alpha", help="Weight of the teacher term."),
    distill_temperature: float | None = typer.Option(
        None, "--distill-temperature", help="Softmax temperature."
    ),
    model_ema: bool = typer.Option(False, "--model-ema", help="Keep an EMA of the weights (timm)."),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Skip unreadable images with a warning instead of stopping."
    ),
    save_every_steps: int | None = typer.Option(
        None, "--save-every-steps", min=0, help="Also checkpoint every N steps (0: epoch ends only)."
    ),
    seed: int | None = typer.Option(None, "--seed"),
    workers: int | None = typer.Option(None, "--workers", min=0, help="Data-loader worker processes."),
) -> None:
    """Train an SReT (default: sret_nano on the embedded digits, a few minutes on a laptop CPU).

    Under `torchrun --nproc_per_node=N -m sret train ...` it trains with DistributedDataParallel.
    """
    from sret.io import UserError
    from sret.train import parse_sets, resolve_config, train

    try:
        if resume is not None:  # the options set beside it, by their config names
            given = {
                p.name.rstrip("_"): ctx.params[p.name]
                for p in ctx.command.params
                if p.name != "resume" and ctx.params[p.name] not in (p.default, None, [], ())
            }
            given.update(parse_sets(given.pop("set", [])))  # `--set key=value` beside --resume too
            train(resume=resume, resume_settings=given)
            return
        cfg = resolve_config(
            recipe,
            set_,
            model=model,
            dataset=dataset,
            data_dir=data_dir,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            output=output,
            name=name,
            device=device,
            amp=amp,
            compile=compile_,
            teacher=teacher,
            teacher_logits=teacher_logits,
            distill_alpha=distill_alpha,
            distill_temperature=distill_temperature,
            model_ema=model_ema or None,
            skip_bad_images=skip_bad_images or None,
            save_every_steps=save_every_steps,
            seed=seed,
            workers=workers,
        )
        train(cfg)
    except (UserError, ValueError, OSError) as e:
        raise _user_error(e) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # train() has said where to resume


@app.command("ablate")
def ablate_cmd(
    grid: str = typer.Argument("cifar10", help="Shipped grid name (see src/sret/grids) or a YAML file."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    seeds: int | None = typer.Option(None, "--seeds", min=1, help="Seeds per variant (default: the grid's)."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Cells trained at a time (cores split)."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="Threads per cell (default: cores/jobs)."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Grid folder (default: ablations/GRID); rerun to resume."
    ),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a training option of every cell."),
    show_plan: bool = typer.Option(
        False, "--plan", help="Print each variant's seeds, epochs, parameters and MACs; train nothing."
    ),
    cells: list[str] | None = typer.Option(
        None, "--cell", help="Run only this cell (e.g. once-s2; repeatable), to check it elsewhere."
    ),
) -> None:
    """Train a grid of model variants x seeds with one recipe; tabulate mean ± std and plot them.

    Rerun with the same --out to continue: finished cells are kept, an interrupted one resumes.
    """
    from pathlib import Path

    from sret.ablate import load_grid, plan, run_grid
    from sret.io import UserError
    from sret.train import parse_sets

    try:
        spec = load_grid(grid, seeds, data_dir, parse_sets(set_ or []))
        if show_plan:
            typer.echo(plan(spec))
            return
        folder = Path(out) if out else Path("ablations") / Path(spec.path).stem
        run_grid(spec, folder, jobs, threads, log=lambda msg: typer.echo(msg, err=True), only=cells)
    except (UserError, ValueError, OSError) as e:
        raise _user_error(e) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(
        f"wrote {folder / 'summary.md'}, summary.csv, summary.json, cells.csv, ablation.png, curves.png"
    )
    typer.echo((folder / "summary.md").read_text())


@app.command("distill-logits")
def distill_logits_cmd(
    out: str = typer.Argument(..., help="Output file (.safetensors) for `sret train --teacher-logits`."),
    teacher: str = typer.Option(..., "--teacher", help="timm model name or checkpoint."),
    recipe: str = typer.Option("digits", "--recipe", "-r", help="Recipe naming the data set."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override any config option: key=value."),
    dataset: str | None = typer.Option(None, "--dataset"),
    data_dir: str | None = typer.Option(None, "--data-dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Precompute teacher logits over the (unaugmented) training set, in data-set order."""
    from sret.io import UserError
    from sret.train import compute_teacher_logits, resolve_config

    try:
        cfg = resolve_config(recipe, set_, teacher=teacher, dataset=dataset, data_dir=data_dir)
        typer.echo(f"wrote {compute_teacher_logits(cfg, out, overwrite=overwrite)}")
    except (UserError, ValueError, OSError) as e:
        raise _user_error(e) from None
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Argument(..., help="Weights written by `sret train` (.safetensors)."),
    dataset: str | None = typer.Option(None, "--dataset", help="Data set (default: the run's)."),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder holding the data set."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    device: str = typer.Option("cpu", "--device"),
    confusion: str | None = typer.Option(
        None, "--confusion", help="Confusion-matrix PNG (default: beside the checkpoint)."
    ),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Leave unreadable images out of the scores instead of stopping."
    ),
    loops: str | None = typer.Option(None, "--loops", help=LOOPS_HELP),
    exit_confidence: float | None = typer.Option(
        None, "--exit-confidence", min=0.0, max=1.0, help=EXIT_CONFIDENCE_HELP
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --confusion file (the default one is redrawn anyway)."
    ),
) -> None:
    """Top-1/top-5 accuracy, loss, per-class accuracy and a confusion matrix on a validation split."""
    import json
    from pathlib import Path

    from sret.evaluate import evaluate
    from sret.io import UserError, check_destination

    path = Path(checkpoint)
    png = Path(confusion) if confusion else path.with_name(f"{path.stem}_confusion_{dataset or 'val'}.png")
    try:
        check_destination(png, overwrite or confusion is None)  # its own default report: redrawn
        result = evaluate(
            checkpoint,
            dataset,
            data_dir,
            batch_size,
            device,
            png,
            skip_bad_images,
            parse_loops(loops),
            exit_confidence,
            model,
        )
    except (UserError, ValueError, OSError) as e:
        raise _user_error(e) from None
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None
    if result.skipped:
        typer.echo(f"warning: skipped {result.skipped} unreadable image(s), left out of the scores", err=True)
    if as_json:
        payload = dict(
            loss=result.loss,
            acc1=result.acc1,
            acc5=result.acc5,
            skipped=result.skipped,
            confusion_png=str(png),
            per_class=dict(zip(result.classes, result.per_class, strict=True)),
        )
        if result.exit_loops is not None:
            payload.update(exit_loops=result.exit_loops, mean_macs=result.mean_macs)
        typer.echo(json.dumps(payload, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("class", "accuracy", "images", title="per-class accuracy")
    for cls, acc, n in zip(result.classes, result.per_class, result.confusion.sum(1).tolist(), strict=True):
        table.add_row(cls, f"{acc:.4f}", str(n))
    console = Console()
    console.print(table)
    console.print(f"top-1 {result.acc1:.4f}  top-5 {result.acc5:.4f}  loss {result.loss:.4f}")
    if result.exit_loops is not None:
        stops = ", ".join(f"{n} at {k}" for k, n in sorted(result.exit_loops.items()))
        console.print(
            f"early exit: images stopped {stops} loops; {result.mean_macs / 1e6:.1f} MMACs per image"
        )
    console.print(f"confusion matrix: {png}")


@app.command("predict")
def predict_cmd(
    checkpoint: str = typer.Argument(..., help="Weights written by `sret train` (.safetensors)."),
    images: list[str] = typer.Argument(..., help="Image files, or folders of them (searched recursively)."),
    topk: int = typer.Option(5, "--topk", min=1),
    device: str = typer.Option("cpu", "--device"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images", help="Skip unreadable images with a warning instead of stopping."
    ),
    loops: str | None = typer.Option(None, "--loops", help=LOOPS_HELP),
    exit_confidence: float | None = typer.Option(
        None, "--exit-confidence", min=0.0, max=1.0, help=EXIT_CONFIDENCE_HELP
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: {image: {class: probability}}, null for a skipped image."
    ),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
) -> None:
    """Top-k class names and probabilities for each image."""
    import json

    from sret.evaluate import predict
    from sret.io import UserError

    try:
        result = predict(
            checkpoint,
            images,
            topk,
            device,
            batch_size,
            skip_bad_images,
            parse_loops(loops),
            exit_confidence,
            model,
        )
    except (UserError, ValueError, OSError) as e:
        raise _user_error(e) from None
    for path in result.skipped:
        typer.echo(f"warning: skipped unreadable image {path}", err=True)
    if as_json:
        doc = {img: dict(ranked) for img, ranked in result.ranked.items()}
        typer.echo(json.dumps(doc | dict.fromkeys(result.skipped), indent=2))
    else:
        for img, ranked in result.ranked.items():
            typer.echo(f"{img}  (stopped at {result.loops[img]} loops)" if img in result.loops else img)
            for cls, p in ranked:
                typer.echo(f"  {p:7.2%}  {cls}")
    if result.unfinished:  # Ctrl-C: what was made is printed above, then this
        typer.echo(
            f"interrupted: the {len(result.ranked)} prediction(s) made are printed; "
            f"{result.unfinished} image(s) were not classified",
            err=True,
        )
        raise typer.Exit(130)


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(
        ...,
        help="Our .safetensors (architecture read from it), the authors' .pth with --model, "
        "or a model name with --random-init.",
    ),
    fmt: str = typer.Option("onnx", "--format", help="onnx, torchscript or exported-program."),
    output: str | None = typer.Option(None, "--output", "-o", help="Destination (default: by CHECKPOINT)."),
    model: str | None = typer.Option(None, "--model", help="Architecture, if the file lacks it."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input resolution (default: the model's)."),
    batch: int = typer.Option(2, "--batch", min=1, help="Example batch (batch axis stays dynamic)."),
    shuffle: str | None = typer.Option(
        None, "--shuffle", help="Override the token shuffle: fixed or none ('random' cannot be exported)."
    ),
    random_init: bool = typer.Option(False, "--random-init", help="CHECKPOINT is a model name; random init."),
    atol: float = typer.Option(1e-4, "--atol", help="Largest accepted |exported - PyTorch|."),
    loops: str | None = typer.Option(None, "--loops", help=LOOPS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Export to ONNX, TorchScript or a torch.export program, verified against PyTorch before writing."""
    from sret.export import ExportMismatch, ExportRefused, export_model
    from sret.io import UserError

    try:
        result = export_model(
            checkpoint,
            fmt,
            output,
            model,
            img_size,
            batch,
            shuffle,
            random_init,
            atol,
            parse_loops(loops),
            overwrite,
        )
    except KeyboardInterrupt:
        typer.echo(INTERRUPTED, err=True)
        raise typer.Exit(130) from None
    except ExportRefused as e:
        raise _user_error(e, code=3) from None
    except UserError as e:  # the checkpoint: missing, unreadable, or not what it says
        raise _user_error(e, code=1) from None
    except (ValueError, FileNotFoundError, ExportMismatch) as e:
        raise _user_error(e, code=2) from None
    typer.echo(
        f"wrote {result.path} ({result.format} via {result.exporter}, {result.model_name}, "
        f"shuffle={result.shuffle}, {result.img_size}px); "
        f"max |exported - PyTorch| = {result.max_abs_diff:.2e}"
    )


@app.command("recursify")
def recursify_cmd(
    source: str = typer.Argument(
        ..., help="Our .safetensors whose blocks each run once, or timm:NAME (a timm ViT/DeiT)."
    ),
    loops: int = typer.Option(..., "--loops", "-L", min=1, help="Consecutive blocks tied into one."),
    rank: str = typer.Option("0", "--rank", "-r", help="Per-loop delta rank: 0 (tied), r, or full."),
    init: str = typer.Option(
        "average", "--init", help="Shared weights: average or first of the tied blocks."
    ),
    vectors: bool | None = typer.Option(
        None,
        "--vectors/--no-vectors",
        help="Per-loop norms, biases, coefficients (default: where they differ).",
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Destination .safetensors (default: by SOURCE)."
    ),
    timm_weights: str | None = typer.Option(
        None, "--timm-weights", help="Weights of a timm:NAME source (else timm's random init)."
    ),
    model: str | None = typer.Option(None, "--model", help=MODEL_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Turn a non-recursive model into a recursive SReT with per-loop low-rank adapters."""
    from sret.io import UserError
    from sret.recursify import recursify_file

    try:
        result, path = recursify_file(
            source, loops, parse_rank(rank), init, vectors, out, timm_weights, model, overwrite
        )
    except UserError as e:
        raise _user_error(e, code=1) from None
    model = result.model
    layout = ", ".join(f"{s.blocks}x{s.loops}" for s in model.cfg.stages)
    typer.echo(
        f"params: {result.params_before:,} -> {result.params_after:,} "
        f"({result.params_after / result.params_before:.1%}); stages {layout} (blocks x loops), "
        f"rank {model.cfg.loop_lora_rank}, per-loop vectors {'on' if model.cfg.loop_vectors else 'off'}"
    )
    typer.echo(
        f"output against the source on 8 random images: max |logit difference| {result.max_abs_diff:.2e} "
        f"(largest logit {result.logit_scale:.2e}), top-1 agreement {result.top1_agreement:.0%}"
    )
    typer.echo(f"wrote {path}; fine-tune it with: sret train --set checkpoint={path}")


def parse_rank(value: str) -> int | str:
    """`full` or a whole number >= 0."""
    if value == "full":
        return value
    if not re.fullmatch(r"\d+", value):
        raise typer.BadParameter(f"--rank must be a whole number >= 0 or 'full', got {value!r}")
    return int(value)


def main() -> None:
    from sret.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    app()
