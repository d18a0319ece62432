"""Per-call timings of a SReT model's heaviest operations on this CPU, in the shapes its step runs.

    python benchmarks/cpu_calls.py [--model sret_t] [--batch 32] [--repeats 15] [--json OUT.json]

`sret bench` times whole steps (and, with --part-time / --attention-time, parts of them); this times
the single calls behind them, to see which one is below the machine's rate before writing a kernel:

- products: every linear layer's forward, input gradient and weight gradient as SReT's kernels run
  them (:mod:`sret.kernels.onednn`; hidden widths padded as :func:`sret.kernels.ops.mlp` pads them),
  in GFLOP/s beside the matmul peak `sret bench` measures;
- the GELU of each MLP's first layer: the product alone, with oneDNN's GELU epilogue (how inference
  runs it), and torch's GELU as a separate pass, in fp32 and (where oneDNN has bf16 kernels) bf16;
- attention: SReT's C kernel forward and backward for every token layout the stages use;
- the convolution stem in training: forward, input gradient and weight gradient per layer,
  channels-last.

The arms of one shape are timed round-robin in a shuffled order each round (the machine's speed
drifts); each figure is a median. Record `lscpu` beside the output: the figures are per CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import sret
from sret.bench import matmul_probe
from sret.kernels import native, onednn


def timed(arms: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each arm, the arms run in a shuffled order in every round."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for run in arms.values():
        run()
        run()
    for _ in range(repeats):
        order = list(arms)
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def padded(width: int) -> int:
    """A hidden width as the MLP kernel runs it (the next multiple of 8)."""
    return -(-width // 8) * 8


def stage_shapes(model: torch.nn.Module, batch: int) -> list[dict]:
    """Per stage: rows of tokens, width, heads, the (in, out) of every distinct linear layer, and the
    distinct (groups, tokens per group) of its attention calls, read from the model itself."""
    grid = model.pos_embed.shape[-1]  # the stem's output grid, which the learnable 2-D embedding matches
    stages = []
    for index, stage in enumerate(model.stages):
        side = grid // 2**index
        tokens, dim, heads = side * side, stage.config.dim, stage.config.heads
        layers = {(dim, 3 * dim), (dim, dim)}
        for mlp in [block.mlp for block in stage.blocks] + [nll.mlp for nll in stage.nlls]:
            hidden = padded(mlp.fc1.out_features)
            layers |= {(dim, hidden), (hidden, dim)}
        layouts = sorted({app.groups for app in stage.schedule})
        stages.append(
            {
                "stage": index,
                "rows": batch * tokens,
                "dim": dim,
                "heads": heads,
                "linears": sorted(layers),
                "attention": [(g, tokens // g) for g in layouts if tokens % g == 0],
                "fc1": sorted({padded(block.mlp.fc1.out_features) for block in stage.blocks}),
            }
        )
    return stages


def products(stages: list[dict], repeats: int) -> list[dict]:
    rows = []
    for stage in stages:
        for fan_in, fan_out in stage["linears"]:
            x, w = torch.randn(stage["rows"], fan_in), torch.randn(fan_out, fan_in) * fan_in**-0.5
            b, grad = torch.randn(fan_out), torch.randn(stage["rows"], fan_out)
            arms = {
                "forward": partial(onednn.linear, x, w, b),
                "input_grad": partial(onednn.linear, grad, w.t()),
                "weight_grad": partial(onednn.weight_grad, grad, x, w),
            }
            ms = timed(arms, repeats)
            flop = 2 * stage["rows"] * fan_in * fan_out
            rows.append(
                {"stage": stage["stage"], "rows": stage["rows"], "in": fan_in, "out": fan_out}
                | {f"{k}_ms": v for k, v in ms.items()}
                | {f"{k}_gflops": flop / v / 1e6 for k, v in ms.items()}
            )
    return rows


def gelu_epilogue(stages: list[dict], repeats: int) -> list[dict]:
    dtypes = [torch.float32] + ([torch.bfloat16] if onednn.ONEDNN_BF16 else [])
    rows = []
    for stage in stages:
        for hidden in stage["fc1"]:
            for dtype in dtypes:
                x = torch.randn(stage["rows"], stage["dim"], dtype=dtype)
                w = (torch.randn(hidden, stage["dim"]) * stage["dim"] ** -0.5).to(dtype)
                b = torch.randn(hidden, dtype=dtype)
                h = onednn.linear(x, w, b)
                arms = {
                    "product": partial(onednn.linear, x, w, b),
                    "with_gelu_epilogue": partial(onednn.linear, x, w, b, gelu=True),
                    "torch_gelu_pass": partial(F.gelu, h),
                }
                ms = timed(arms, repeats)
                rows.append(
                    {"stage": stage["stage"], "rows": stage["rows"], "in": stage["dim"], "hidden": hidden}
                    | {"dtype": str(dtype).removeprefix("torch.")}
                    | {f"{k}_ms": v for k, v in ms.items()}
                )
    return rows


def attention(stages: list[dict], batch: int, repeats: int) -> list[dict]:
    rows = []
    for stage in stages:
        dim, heads = stage["dim"], stage["heads"]
        scale = (dim // heads) ** -0.5
        for groups, n in stage["attention"]:
            qkv = torch.randn(batch, groups * n, 3 * dim)
            if not (native.built() and native.applies(qkv, n, dim // heads)):
                continue
            out, lse = native.attention_forward(qkv, groups, heads, scale, True)
            grad = torch.randn_like(out)
            arms = {
                "forward": partial(native.attention_forward, qkv, groups, heads, scale, False),
                "backward": partial(native.attention_backward, grad, qkv, out, lse, groups, heads, scale),
            }
            ms = timed(arms, repeats)
            flop = 4 * batch * groups * n * n * dim  # two products forward; the backward's five: 2.5x
            rows.append(
                {"stage": stage["stage"], "groups": groups, "tokens": n, "heads": heads}
                | {f"{k}_ms": v for k, v in ms.items()}
                | {
                    "forward_gflops": flop / ms["forward"] / 1e6,
                    "backward_gflops": 2.5 * flop / ms["backward"] / 1e6,
                }
            )
    return rows


def stem(model: torch.nn.Module, batch: int, repeats: int) -> list[dict]:
    rows, side = [], model.pretrained_cfg["input_size"][-1]
    convs = [m for m in model.patch_embed.children() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != 3:  # a patchify stem (one strided convolution) is no concern here
        return rows
    for index, conv in enumerate(convs):
        x = torch.randn(batch, conv.in_channels, side, side).contiguous(memory_format=torch.channels_last)
        y = conv(x).detach()
        grad = torch.randn_like(y)
        args = [conv.out_channels], list(conv.stride), list(conv.padding), [1, 1], False, [0, 0], 1
        backward = partial(torch.ops.aten.convolution_backward, grad, x, conv.weight, *args)
        arms = {
            "forward": partial(conv, x),
            "input_grad": partial(backward, [True, False, False]),
            "weight_grad": partial(backward, [False, True, True]),
        }
        if index == 0:  # the image needs no gradient: training never computes the first one's
            del arms["input_grad"]
        with torch.no_grad():
            measured = timed(arms, repeats)
        ms = {k: measured.get(k) for k in ("forward", "input_grad", "weight_grad")}
        flop = 2 * y.numel() * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        rows.append(
            {"conv": index + 1, "in": conv.in_channels, "out": conv.out_channels, "side": side}
            | {f"{k}_ms": v for k, v in ms.items()}
            | {f"{k}_gflops": flop / v / 1e6 if v else None for k, v in ms.items()}
        )
        side //= conv.stride[0]
    return rows


def peak(repeats: int) -> float:
    run, flop = matmul_probe("cpu", None)
    return flop / timed({"matmul": run}, repeats)["matmul"] / 1e6


def cell(value: object) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def table(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"{title}: (nothing ran)\n"
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sret_t")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sret.tune_cpu_allocator()
    torch.manual_seed(0)
    model = timm.create_model(args.model).train()
    stages = stage_shapes(model, args.batch)
    result = {
        "model": args.model,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native": native.isa() if native.library() is not None else None,
        "matmul_peak_gflops": peak(args.repeats),
        "products": products(stages, args.repeats),
        "gelu_epilogue": gelu_epilogue(stages, args.repeats),
        "attention": attention(stages, args.batch, args.repeats),
        "stem": stem(model, args.batch, args.repeats),
    }
    print(f"{args.model}, batch {args.batch}, {result['threads']} threads, torch {result['torch']}, ")
    print(f"ATen {result['capability']}, C kernels {result['native']}; matmul peak "
          f"{result['matmul_peak_gflops']:.1f} GFLOP/s; medians of {args.repeats}, ms\n")  # fmt: skip
    for key in ("products", "gelu_epilogue", "attention", "stem"):
        print(table(key, result[key]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
