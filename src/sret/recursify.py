"""Make a trained non-recursive model recursive: tie consecutive blocks, relax the ties with adapters.

Following Relaxed Recursive Transformers (Bae et al., ICLR 2025): in every stage, each run of L
consecutive blocks becomes one shared block applied L times. The shared weights are the average of
the L blocks' weights (or the first block's); the application that stands for block j gets a
:class:`~sret.model.LoopAdapter` holding the truncated SVD of (block j's weight - the shared weight),
so at full rank the recursive model computes what the source computed, and at lower rank it is the
best rank-r approximation of it, weight by weight. The vectors (LayerNorm affines, biases, residual
coefficients) are kept per application too, exactly, unless asked not to. NLLs carry over one to one:
a model whose blocks run once has one NLL after every block, which is where the recursive model has
them.

A timm ViT/DeiT becomes a non-recursive SReT first (:func:`from_vit`): patchify stem, one stage, its
blocks and norms; residual coefficients of 1, and an NLL after every block that starts as the
identity (its branch gain 0), so the recursive model has NLLs to learn with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from sret.checkpoint import load_state, model_from_weights, save_weights
from sret.io import UserError, check_destination
from sret.model import LORA_TARGETS, MODEL_CONFIGS, Block, LoRARank, SReT, SReTConfig, StageConfig
from sret.variants import config_overrides

__all__ = ["Recursified", "compare", "convert", "from_vit", "recursify", "recursify_file"]

Init = Literal["average", "first"]


@dataclass
class Recursified:
    """A converted model and what its conversion changed."""

    model: SReT
    params_before: int
    params_after: int
    max_abs_diff: float  # largest |logit difference| against the source on a fixed random batch
    logit_scale: float  # largest |logit| of the source on that batch, to read the difference against
    top1_agreement: float  # fraction of that batch whose top-1 class the two models agree on


def recursify(
    source: SReT, loops: int, rank: LoRARank = 0, init: Init = "average", vectors: bool | None = None
) -> SReT:
    """The recursive SReT made of `source` (every block run once) by tying `loops` blocks into one.

    Args:
        loops: how many consecutive blocks of a stage become one shared block (its loop count).
        rank: rank of each application's delta on the shared linear weights (0: tied exactly, the
            paper's recursion; 'full': dense deltas, the source's weights reproduced).
        init: the shared weights: the 'average' of the tied blocks, or the 'first' of them.
        vectors: keep per-application LayerNorm affines, biases and residual coefficients; default:
            where the tied blocks' differ.

    ValueError names an impossible request (a source that already recurses, a stage depth that
    `loops` does not divide, a rank above a layer's) before anything is built.
    """
    cfg = _recursive_config(source, loops, rank, init, vectors)
    model = SReT(cfg).to(next(source.parameters()).device)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("stages.")}
    model.load_state_dict(state, strict=False)
    # Application i of a source stage is application i of the recursive one (block i // loops, loop
    # i % loops): the same NLL index and the same token layout (its fixed permutation is seeded by i).
    for mine, theirs in zip(model.stages, source.stages, strict=True):
        mine.nlls.load_state_dict(theirs.nlls.state_dict())
        for r, block in enumerate(mine.blocks):
            own = slice(r * loops, (r + 1) * loops)
            _tie(block, theirs.blocks[own], mine.adapters[own], init)  # no adapters: an empty slice
    return model.train(source.training)


def _recursive_config(
    source: SReT, loops: int, rank: LoRARank, init: Init, vectors: bool | None
) -> SReTConfig:
    cfg = source.cfg
    if loops < 1:
        raise ValueError(f"loops must be >= 1, got {loops}")
    if init not in ("average", "first"):
        raise ValueError(f"init must be 'average' or 'first', got {init!r}")
    if cfg.adapted:
        raise ValueError("the source already has per-loop adapters: recursify a model without them")
    for i, stage in enumerate(cfg.stages):
        if stage.loops != 1:
            raise ValueError(
                f"recursify needs a model whose blocks each run once; stage {i} runs its blocks "
                f"{stage.loops} times"
            )
        if stage.blocks % loops:
            raise ValueError(f"stage {i} has {stage.blocks} blocks, which {loops} loops do not divide")
    stages = tuple(
        replace(s, blocks=s.blocks // loops, loops=loops, groups=s.groups * loops, permute=s.permute * loops)
        for s in cfg.stages
    )
    if vectors is None:
        vectors = loops > 1 and _vectors_differ(source, loops)
    recursive = replace(
        cfg,
        stages=stages,
        nll="none" if cfg.nll == "none" else "application",  # with one loop, 'block' is 'application'
        loop_lora_rank=rank,
        loop_vectors=vectors,
    )
    recursive.validate()
    return recursive


def _vectors_differ(source: SReT, loops: int) -> bool:
    for stage in source.stages:
        for r in range(len(stage.blocks) // loops):
            tied = stage.blocks[r * loops : (r + 1) * loops]
            for name, p in tied[0].named_parameters():
                if p.ndim == 1 and any(not torch.equal(p, b.get_parameter(name)) for b in tied[1:]):
                    return True
    return False


@torch.no_grad()
def _tie(shared: Block, tied: Sequence[Block], adapters: Sequence[nn.Module], init: Init) -> None:
    """Set `shared` to the tie of `tied`, and adapter j to what block j has of its own."""
    for name, p in shared.named_parameters():
        values = torch.stack([b.get_parameter(name) for b in tied]).double()
        base = values.mean(0) if init == "average" else values[0]
        p.copy_(base)
        for adapter, value in zip(adapters, values, strict=bool(adapters)):
            _set_delta(adapter, name, value - base)


def _set_delta(adapter: nn.Module, name: str, delta: Tensor) -> None:
    key = name.replace(".", "_")
    if key in adapter.vectors:
        adapter.vectors[key].copy_(delta)
        return
    target = next((t for t, path in LORA_TARGETS.items() if name == f"{path}.weight"), None)
    if target is None or target not in adapter.weights:
        return  # shared exactly: this parameter has no per-loop copy
    weight = adapter.weights[target]
    if weight.rank == "full":
        weight.weight.copy_(delta)
        return
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    root = s[: weight.rank].sqrt()
    weight.up.copy_(u[:, : weight.rank] * root)
    weight.down.copy_(root[:, None] * vh[: weight.rank])


# --------------------------------------------------------------------------------------------------
# timm ViT / DeiT -> a non-recursive SReT
# --------------------------------------------------------------------------------------------------
def from_vit(vit: nn.Module) -> SReT:
    """A non-recursive SReT computing what a timm VisionTransformer computes, where the two agree.

    Mapped: the patchify stem, the positional embedding of the patch tokens, every block (LayerScale
    folded into the branch's last linear layer), the final norm and the head. SReT pools by averaging
    the tokens: a ViT pooled by averaging (`global_pool='avg'`, no class token) converts exactly; one
    that classifies its class token loses it, and its outputs change (see :func:`compare`).
    """
    _check_vit(vit)
    dim, blocks = vit.embed_dim, list(vit.blocks)
    heads = blocks[0].attn.num_heads
    hidden = blocks[0].mlp.fc1.out_features
    grid = vit.patch_embed.grid_size
    cfg = replace(
        MODEL_CONFIGS["sret_t"],
        stages=(StageConfig(dim, heads, blocks=len(blocks), loops=1, groups=(1,), permute=(False,)),),
        mlp_ratio=hidden / dim,
        nll_ratio=1.0,
        nll="application",
        stem="patch",
        patch_size=vit.patch_embed.patch_size[0],
        img_size=tuple(vit.patch_embed.img_size),
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes,
        drop_path_rate=0.0,
    )
    model = SReT(cfg)
    with torch.no_grad():
        model.patch_embed.proj.load_state_dict(vit.patch_embed.proj.state_dict())
        pos = vit.pos_embed[:, 0 if vit.no_embed_class else vit.num_prefix_tokens :]
        model.pos_embed.copy_(pos.reshape(1, *grid, dim).permute(0, 3, 1, 2))
        for mine, theirs in zip(model.stages[0].blocks, blocks, strict=True):
            _copy_vit_block(mine, theirs)
        for nll in model.stages[0].nlls:
            nll.gain.zero_()  # the identity, until fine-tuning moves it
        final = vit.fc_norm if isinstance(vit.fc_norm, nn.LayerNorm) else vit.norm
        model.norm.load_state_dict(final.state_dict())
        if vit.num_classes:
            model.head.load_state_dict(vit.head.state_dict())
    return model.train(vit.training)


def _check_vit(vit: nn.Module) -> None:
    name = type(vit).__name__
    if not hasattr(vit, "blocks") or not hasattr(vit, "patch_embed") or not hasattr(vit, "embed_dim"):
        raise ValueError(f"{name} is not a timm VisionTransformer (no blocks, patch_embed, embed_dim)")
    plain = {
        "norm_pre": vit.norm_pre,
        "patch_embed.norm": vit.patch_embed.norm,
        "head_drop": getattr(vit, "head_drop", nn.Identity()),
    }
    for i, b in enumerate(vit.blocks):
        plain.update({f"blocks.{i}.attn.q_norm": b.attn.q_norm, f"blocks.{i}.attn.k_norm": b.attn.k_norm})
        plain[f"blocks.{i}.attn.norm"] = getattr(b.attn, "norm", nn.Identity())
        plain[f"blocks.{i}.mlp.norm"] = getattr(b.mlp, "norm", nn.Identity())
        if type(b).__name__ != "Block" or not isinstance(getattr(b.mlp, "fc1", None), nn.Linear):
            raise ValueError(
                f"{name} block {i} is a {type(b).__name__}: only plain ViT blocks with an MLP map"
            )
        if not isinstance(b.mlp.act, nn.GELU) or b.mlp.act.approximate != "none":
            raise ValueError(f"{name} block {i} uses {b.mlp.act}: SReT's MLP uses the exact GELU")
        if b.norm1.eps != 1e-6 or b.norm2.eps != 1e-6:
            raise ValueError(f"{name} block {i}: LayerNorm eps {b.norm1.eps}, SReT's is 1e-6")
    changed = [k for k, m in plain.items() if not isinstance(m, nn.Identity | nn.Dropout)]
    if changed:
        raise ValueError(f"{name} has layers SReT does not: {', '.join(changed)}")
    if getattr(vit, "attn_pool", None) is not None:
        raise ValueError(f"{name} pools with attention; SReT averages its tokens")
    if vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1]:
        raise ValueError(f"{name} has non-square patches {vit.patch_embed.patch_size}")


def _copy_vit_block(mine: Block, theirs: nn.Module) -> None:
    for part in ("norm1", "norm2"):
        getattr(mine, part).load_state_dict(getattr(theirs, part).state_dict())
    layers = {
        "attn.qkv": theirs.attn.qkv,
        "attn.proj": theirs.attn.proj,
        "mlp.fc1": theirs.mlp.fc1,
        "mlp.fc2": theirs.mlp.fc2,
    }
    scales = {"attn.proj": getattr(theirs.ls1, "gamma", None), "mlp.fc2": getattr(theirs.ls2, "gamma", None)}
    for path, layer in layers.items():
        target = mine.get_submodule(path)
        weight = layer.weight
        bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0])
        if scales.get(path) is not None:  # LayerScale: a per-channel gain on the branch output
            weight, bias = weight * scales[path][:, None], bias * scales[path]
        target.weight.copy_(weight)
        target.bias.copy_(bias)


# --------------------------------------------------------------------------------------------------
# Checking a conversion
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def compare(source: nn.Module, model: SReT, images: int = 8, seed: int = 0) -> tuple[float, float, float]:
    """(max |logit difference|, max |source logit|, top-1 agreement) on `images` seeded random images
    at the model's input size, both in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    x = torch.randn(images, model.cfg.in_chans, *model.img_size, generator=generator).to(param.device)
    modes = source.training, model.training
    source.eval(), model.eval()
    try:
        a, b = source(x), model(x)
    finally:
        source.train(modes[0]), model.train(modes[1])
    agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    return (a - b).abs().max().item(), a.abs().max().item(), agreement


def convert(
    source: nn.Module, loops: int, rank: LoRARank = 0, init: Init = "average", vectors: bool | None = None
) -> Recursified:
    """:func:`recursify` of one of our models or (through :func:`from_vit`) of a timm ViT, checked
    against the source with :func:`compare`."""
    plain = source if isinstance(source, SReT) else from_vit(source)
    model = recursify(plain, loops, rank, init, vectors)
    diff, scale, agreement = compare(source, model)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (source, model))
    return Recursified(model, before, after, diff, scale, agreement)


def checkpoint_args(model: SReT, base: str) -> dict[str, Any]:
    """The `model_args` that rebuild `model` from the registered variant `base` (for its checkpoint)."""
    return config_overrides(model.cfg, MODEL_CONFIGS[base])


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def load_source(
    source: str, timm_weights: str | None = None, model_name: str | None = None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model SOURCE names, the registered variant its checkpoint is written against, and its run
    info: one of our weights files (`model_name` names the architecture of one without metadata), or
    `timm:NAME` (a timm ViT/DeiT; weights from `timm_weights`, else timm's random initialisation)."""
    if source.startswith("timm:"):
        name = source.removeprefix("timm:")
        state = load_state(timm_weights) if timm_weights else None
        head = (state or {}).get("head.weight")
        options = {} if head is None else {"num_classes": head.shape[0]}
        try:
            vit = timm.create_model(name, pretrained=False, **options)
        except (RuntimeError, ValueError, TypeError) as e:  # unknown names and bad options
            raise UserError(f"cannot build timm model {name!r}: {e}") from None
        if state is not None:
            try:
                vit.load_state_dict(state)
            except RuntimeError as e:
                detail = str(e).strip().splitlines()[-1].strip()
                raise UserError(f"{timm_weights} does not fit timm's {name}: {detail}") from None
        try:
            _check_vit(vit)
        except ValueError as e:
            raise UserError(f"cannot recursify {source}: {e}") from None
        return vit.eval(), "sret_t", {"preprocess": timm_preprocess(vit)}
    if timm_weights:
        raise UserError("--timm-weights goes with a timm:NAME source")
    model, meta = model_from_weights(source, model_name)
    if not isinstance(model, SReT):
        raise UserError(f"{source} does not hold a SReT")
    base = model_name.split(".", 1)[0] if model_name else meta.get("model_name", "sret_t")
    return model.eval(), base, meta.get("info") or {}


def timm_preprocess(model: nn.Module) -> dict[str, Any]:
    """The input pipeline a timm model was trained with (its mean, std, crop), as our runs record it."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    pre = {"img_size": int(model.patch_embed.img_size[0])}
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in cfg:
            pre[key] = list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]
    return pre


def recursify_file(
    source: str,
    loops: int,
    rank: LoRARank = 0,
    init: Init = "average",
    vectors: bool | None = None,
    out: str | os.PathLike | None = None,
    timm_weights: str | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
) -> tuple[Recursified, Path]:
    """Convert SOURCE (see :func:`load_source`) and write the recursive model as our safetensors, with
    the metadata `sret eval` and `sret train --set checkpoint=FILE` rebuild it from. Nothing is
    written unless the conversion succeeds, and an existing file is replaced only with `overwrite`
    (checked before the conversion)."""
    timm_source = source.startswith("timm:")
    name = (
        f"{source.removeprefix('timm:') if timm_source else Path(source).stem}-L{loops}-r{rank}.safetensors"
    )
    path = Path(out) if out else Path(name) if timm_source else Path(source).with_name(name)
    if path.suffix != ".safetensors":
        raise UserError(f"--out must be a .safetensors file, got {path}")
    if not timm_source and path.resolve() == Path(source).resolve():
        raise UserError(f"--out {path} is the source itself: choose another file")
    check_destination(path, overwrite)
    model, base, info = load_source(source, timm_weights, model_name)
    try:
        result = convert(model, loops, rank, init, vectors)
    except ValueError as e:
        raise UserError(f"cannot recursify {source}: {e}") from None
    save_weights(result.model, path, base, checkpoint_args(result.model, base), info)
    return result, path
