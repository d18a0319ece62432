"""Anytime depth: one set of SReT weights run at any number of loops.

A recursive block can run once, twice or ten times with the same weights (:meth:`SReT.set_loops`).
This module holds what builds on that: drawing a loop count per stage for each training step (so one
model learns to work at every depth), and early exit, which runs an image at growing depth until the
model is confident enough.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sret.model import SReT

WEIGHTINGS = ("uniform", "deep")


def sample_loops(
    rng: random.Random, trained: Sequence[int], min_loops: int = 1, weighting: str = "uniform"
) -> tuple[int, ...]:
    """One loop count per stage, from `min_loops` (at most the stage's own) to the trained count.

    'uniform' draws each count equally often; 'deep' in proportion to the count, so full depth, the
    one usually deployed, is trained most.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    counts = []
    for top in trained:
        choices = list(range(min(min_loops, top), top + 1))
        weights = [1.0] * len(choices) if weighting == "uniform" else [float(c) for c in choices]
        counts.append(rng.choices(choices, weights)[0])
    return tuple(counts)


@dataclass
class EarlyExit:
    """Logits of each image at the depth it stopped at, that depth (see :func:`early_exit`) and the
    multiply-accumulates spent on it (every depth it ran at, summed)."""

    logits: Tensor
    loops: Tensor
    macs: Tensor


def depths(model: SReT, max_loops: int | None = None) -> list[int]:
    """The depths early exit tries: 1, 2, ... up to `max_loops` (default: the deepest stage's trained
    loop count)."""
    top = max_loops if max_loops is not None else max(model.trained_loops)
    if top < 1:
        raise ValueError(f"max_loops must be >= 1, got {top}")
    return list(range(1, top + 1))


@torch.no_grad()
def early_exit(
    model: SReT,
    images: Tensor,
    confidence: float,
    max_loops: int | None = None,
    macs: Sequence[int] | None = None,
) -> EarlyExit:
    """Run each image at 1, 2, ... loops until its top softmax probability reaches `confidence` (or
    the last depth). Depth k runs each stage at min(k, its trained loops), each depth from the start:
    the stages' outputs at k loops are not a step on the way to k + 1, so nothing is reused.
    `macs[i]`, if given, is the cost of one image at depth i + 1 (from :func:`sret.info.count_macs`).
    The model's own loop setting is restored after.
    """
    if not 0.0 < confidence <= 1.0:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    tries = depths(model, max_loops)
    if macs is not None and len(macs) < len(tries):
        raise ValueError(f"macs needs one count per depth ({len(tries)}), got {len(macs)}")
    before = model.loops
    logits = torch.empty(len(images), model.num_classes, device=images.device)
    used = torch.zeros(len(images), dtype=torch.long)
    spent = torch.zeros(len(images), dtype=torch.long)
    pending = torch.arange(len(images))
    try:
        for i, k in enumerate(tries):
            model.set_loops(tuple(min(k, t) for t in model.trained_loops))
            out = model(images[pending.to(images.device)]).float()
            spent[pending] += macs[i] if macs is not None else 0
            done = (out.softmax(-1).amax(-1) >= confidence).cpu() | (k == tries[-1])
            logits[pending[done].to(images.device)] = out[done.to(out.device)]
            used[pending[done]] = k
            pending = pending[~done]
            if not len(pending):
                break
    finally:
        model.set_loops(before)
    return EarlyExit(logits, used, spent)
