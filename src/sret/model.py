"""Sliced Recursive Transformer (SReT).

Shen, Liu & Xing, "Sliced Recursive Transformer", ECCV 2022.

A SReT stage owns a few unique transformer blocks and applies each of them several times in a row
(recursion). The order of applications is data: a :class:`RecursionSchedule` lists, for every
application, which block runs, which loop of that block it is, into how many groups the tokens are
sliced for attention, whether the tokens are permuted first, and which non-linear projection layer
(NLL) follows. Everything else in this file reads that schedule instead of doing index arithmetic.

Beyond the paper, recursion can be *relaxed* (Bae et al., "Relaxed Recursive Transformers", ICLR
2025): each trained application of a shared block may add its own low-rank delta to the block's
weights (a :class:`LoopAdapter`); `loop_lora_rank=0`, the default, is the paper's exact sharing.

Layout follows timm's model files: building blocks, then the model, then the checkpoint filter,
then the pretrained configs and registered constructors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, trunc_normal_, use_fused_attn
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    register_notrace_function,
    register_notrace_module,
)
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from sret import kernels

__all__ = [
    "LORA_TARGETS",
    "LoopAdapter",
    "RecursionSchedule",
    "SReT",
    "SReTConfig",
    "StageConfig",
    "checkpoint_filter_fn",
    "official_stages",
    "resolve_loops",
]

Shuffle = Literal["random", "fixed", "none"]
NLLSharing = Literal["application", "block", "none"]
LoRARank = int | Literal["full"]

# The linear layers of a block that per-loop adapters may relax: short name -> module path in Block.
LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageConfig:
    """One stage: `blocks` unique transformer blocks, each applied `loops` times in a row.

    `groups[l]` is the number of token groups used by sliced attention in loop `l` of every block, and
    `permute[l]` whether the tokens are permuted before grouping in that loop (and restored after).
    """

    dim: int
    heads: int
    blocks: int
    loops: int = 2
    groups: tuple[int, ...] = (1, 1)
    permute: tuple[bool, ...] = (False, False)

    @property
    def depth(self) -> int:
        """Number of block applications (transformer layers as executed)."""
        return self.blocks * self.loops

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | StageConfig) -> StageConfig:
        """A stage from plain data (YAML or JSON, where the per-loop tuples arrive as lists)."""
        if isinstance(values, StageConfig):
            return values
        if not isinstance(values, Mapping):
            raise ValueError(f"a stage must be a mapping of stage options, got {values!r}")
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown stage option(s): {', '.join(unknown)}")
        loops = {k: tuple(values[k]) for k in ("groups", "permute") if k in values}
        return cls(**{**values, **loops})

    def validate(self, index: int) -> None:
        where = f"stage {index}"
        if self.dim < 1 or self.heads < 1:
            raise ValueError(f"{where}: dim ({self.dim}) and heads ({self.heads}) must be positive")
        if self.dim % self.heads:
            raise ValueError(f"{where}: heads ({self.heads}) must divide dim ({self.dim})")
        if self.blocks < 1:
            raise ValueError(f"{where}: needs at least one unique block, got blocks={self.blocks}")
        if self.loops < 1:
            raise ValueError(f"{where}: loops must be >= 1, got {self.loops}")
        if len(self.groups) != self.loops or len(self.permute) != self.loops:
            raise ValueError(
                f"{where}: groups {self.groups} and permute {self.permute} need one entry per loop "
                f"({self.loops} loops)"
            )
        if any(g < 1 for g in self.groups):
            raise ValueError(f"{where}: group counts must be >= 1, got {self.groups}")


def official_stages(
    base_dims: Sequence[int],
    heads: Sequence[int],
    depth: Sequence[int] = (4, 10, 6),
    recursive_blocks: Sequence[int] = (2, 5, 3),
    groups1: Sequence[int] = (8, 4, 1),
    groups2: Sequence[int] = (2, 1, 1),
) -> tuple[StageConfig, ...]:
    """Stages as the authors' constructor arguments describe them.

    Each block runs `depth / recursive_blocks` times; the first loop slices into `groups1` groups in
    row-major order, later loops into `groups2` groups after a token permutation (when groups2 > 1).
    """
    stages = []
    for d, h, n, r, g1, g2 in zip(base_dims, heads, depth, recursive_blocks, groups1, groups2, strict=True):
        if n % r:
            raise ValueError(f"depth {n} is not a multiple of the {r} recursive blocks")
        loops = n // r
        stages.append(
            StageConfig(
                dim=d * h,
                heads=h,
                blocks=r,
                loops=loops,
                groups=(g1,) + (g2,) * (loops - 1),
                permute=(False,) + (g2 > 1,) * (loops - 1),
            )
        )
    return tuple(stages)


@dataclass(frozen=True)
class SReTConfig:
    """Everything that defines a SReT architecture (and the paper's ablations).

    Attributes:
        stages: per-stage layout, see :class:`StageConfig`.
        mlp_ratio: hidden width of the block MLP relative to the stage dim.
        nll_ratio: hidden width of the non-linear projection layer (NLL).
        nll: how NLLs are shared. 'application': one non-shared NLL after every application (the paper);
            'block': one NLL per unique block, reused after each of its applications (keeps the
            parameter count of very deep recursion flat); 'none': no NLL (naive recursion).
        residual_coefficients: learnable scalars on skip and branch of every residual (the paper);
            off gives plain `x + branch(x)`.
        stem: 'conv' (three 3x3 stride-2 convs, stride 8) or 'patch' (one patchify conv, ViT/DeiT style).
        stem_stride: downsampling of the conv stem, 8 (the paper), 4 or 2: the last one or two convs run
            at stride 1, so small images (CIFAR's 32 px) keep enough tokens for the stages.
        shuffle: token permutation of permuted loops. 'random' draws a fresh permutation per application
            while training (the paper); 'fixed' uses a stored seeded permutation per application; 'none'
            keeps row-major order.
        random_eval: with shuffle='random', also draw random permutations in eval mode, as the
            official code does. Off by default, so evaluation is deterministic: the fixed permutation
            is used instead.
        perm_seed: seed of the fixed permutations.
        loop_lora_rank: relaxed recursion. 0 (the paper): every application of a block runs the same
            weights. r > 0: every trained application adds its own rank-r delta to the weights of the
            `loop_lora_targets` layers; 'full': a dense delta (the untied model, reparametrised).
        loop_lora_targets: which linear layers of a block the deltas relax (names of LORA_TARGETS).
        loop_vectors: every trained application also gets its own deltas on the block's LayerNorm
            affines, linear biases and residual coefficients (what differs between the layers of a
            model made recursive by `sret recursify`; a few thousand parameters).
    """

    stages: tuple[StageConfig, ...]
    mlp_ratio: float = 4.0
    nll_ratio: float = 1.0
    nll: NLLSharing = "application"
    residual_coefficients: bool = True
    stem: Literal["conv", "patch"] = "conv"
    stem_stride: Literal[2, 4, 8] = 8
    patch_size: int = 16
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    shuffle: Shuffle = "random"
    random_eval: bool = False
    perm_seed: int = 0
    global_pool: Literal["avg", ""] = "avg"
    loop_lora_rank: LoRARank = 0
    loop_lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)
    loop_vectors: bool = False

    @property
    def adapted(self) -> bool:
        """Whether block applications carry per-loop adapters (relaxed recursion)."""
        return self.loop_lora_rank != 0 or self.loop_vectors

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("a SReT needs at least one stage")
        for i, stage in enumerate(self.stages):
            stage.validate(i)
        if self.mlp_ratio <= 0 or self.nll_ratio <= 0:
            raise ValueError(f"mlp_ratio ({self.mlp_ratio}) and nll_ratio ({self.nll_ratio}) must be > 0")
        checks = {
            "nll": (self.nll, ("application", "block", "none")),
            "stem": (self.stem, ("conv", "patch")),
            "shuffle": (self.shuffle, ("random", "fixed", "none")),
            "global_pool": (self.global_pool, ("avg", "")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.stem_stride not in (2, 4, 8):
            raise ValueError(f"stem_stride must be 2, 4 or 8, got {self.stem_stride!r}")
        if self.stem == "conv" and self.stages[0].dim % 2:
            raise ValueError(
                f"the conv stem halves the first stage dim, which must be even ({self.stages[0].dim})"
            )
        if self.in_chans < 1 or self.num_classes < 0:
            raise ValueError(
                f"in_chans must be >= 1 and num_classes >= 0 ({self.in_chans}, {self.num_classes})"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self.validate_adapters()

    def validate_adapters(self) -> None:
        rank, targets = self.loop_lora_rank, self.loop_lora_targets
        if rank != "full" and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ValueError(f"loop_lora_rank must be a whole number >= 0 or 'full', got {rank!r}")
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise ValueError(f"loop_lora_targets must name some of {list(LORA_TARGETS)}, got {list(targets)}")
        if rank == "full" or rank == 0:
            return
        for i, stage in enumerate(self.stages):
            hidden = int(stage.dim * self.mlp_ratio)
            shapes = {"qkv": (3 * stage.dim, stage.dim), "proj": (stage.dim, stage.dim)}
            shapes.update(fc1=(hidden, stage.dim), fc2=(stage.dim, hidden))
            for name in targets:
                if rank > min(shapes[name]):
                    raise ValueError(
                        f"loop_lora_rank {rank} exceeds the rank of stage {i}'s {name} layer "
                        f"{shapes[name]} (at most {min(shapes[name])}; 'full' for a dense delta)"
                    )

    @property
    def stride(self) -> int:
        """Downsampling of the stem."""
        return self.stem_stride if self.stem == "conv" else self.patch_size


# --------------------------------------------------------------------------------------------------
# The recursion schedule
# --------------------------------------------------------------------------------------------------
class Application(NamedTuple):
    """One execution of a shared block inside a stage."""

    block: int  # index of the unique block applied
    loop: int  # 0 for the first application of that block, 1 for its first recursion, ...
    groups: int  # token groups of sliced attention
    permute: bool  # permute tokens before grouping (and restore them after attention)
    nll: int | None  # NLL applied afterwards, or None
    layout: int  # the trained application whose token layout (fixed permutation) this one uses
    adapter: int | None = None  # the per-loop adapter (relaxed recursion) this one runs, or None


@dataclass(frozen=True)
class RecursionSchedule:
    """The ordered list of block applications of one stage.

    For each unique block r, for each loop l: apply block r, then an NLL (the authors' order).

    With `adapters`, every trained application has its own per-loop adapter.

    Any depth (`loops` other than the stage's own, chosen at inference or sampled in anytime
    training) runs the same weights: loop l takes the settings (groups, permutation, layout, adapter,
    NLL) of trained loop min(l, L - 1), except that a block's last loop always takes the NLL of its last
    trained loop, the one that was trained to hand over to the next block. So fewer loops drop middle
    NLLs, and more loops repeat the last loop's settings.
    """

    applications: tuple[Application, ...]

    @classmethod
    def build(
        cls, stage: StageConfig, nll: NLLSharing, loops: int | None = None, adapters: bool = False
    ) -> RecursionSchedule:
        loops = stage.loops if loops is None else loops
        if loops < 1:
            raise ValueError(f"loops must be >= 1, got {loops}")
        apps = []
        for r in range(stage.blocks):
            for loop in range(loops):
                trained = min(loop, stage.loops - 1)
                closing = stage.loops - 1 if loop == loops - 1 else trained
                nll_index = {"application": r * stage.loops + closing, "block": r, "none": None}[nll]
                groups, permute = stage.groups[trained], stage.permute[trained] and stage.groups[trained] > 1
                own = r * stage.loops + trained
                apps.append(Application(r, loop, groups, permute, nll_index, own, own if adapters else None))
        return cls(tuple(apps))

    def __iter__(self) -> Iterator[Application]:
        return iter(self.applications)

    def __len__(self) -> int:
        return len(self.applications)

    @property
    def num_nlls(self) -> int:
        return len({a.nll for a in self.applications if a.nll is not None})


def drop_path_rates(cfg: SReTConfig) -> list[list[float]]:
    """Stochastic depth per unique block: rate * (offset_s + r) / sum(depth), as the authors do."""
    total = sum(s.depth for s in cfg.stages)
    rates, offset = [], 0
    for stage in cfg.stages:
        rates.append([cfg.drop_path_rate * (offset + r) / total for r in range(stage.blocks)])
        offset += stage.depth
    return rates


# --------------------------------------------------------------------------------------------------
# Sliced attention
# --------------------------------------------------------------------------------------------------
class TokenGroups(NamedTuple):
    """How N tokens are laid out into `groups` equal slots of `size` for sliced attention.

    gather: slot -> token index (None when the layout is the identity); slots beyond a group's real
        tokens point at token 0 and are masked out as keys.
    scatter: token -> slot index (None when the layout is the identity).
    key_mask: (groups, 1, size) bool, True where the key is a real token (None when all are real).
    """

    groups: int
    size: int
    gather: Tensor | None
    scatter: Tensor | None
    key_mask: Tensor | None


def token_groups(
    num_tokens: int, groups: int, perm: Tensor | None, device: torch.device | None = None
) -> TokenGroups:
    """Slice `num_tokens` tokens (optionally permuted by `perm`) into `groups` contiguous groups.

    Groups get sizes differing by at most one (as torch.tensor_split). When `groups` does not divide the
    token count the shorter groups are padded; padded keys are masked, so no padding ever enters a real
    token's attention, and padded queries are dropped by the scatter.
    """
    if groups > num_tokens:
        raise ValueError(f"cannot slice {num_tokens} tokens into {groups} groups (input too small)")
    size = -(-num_tokens // groups)
    if size * groups == num_tokens:
        if perm is None:
            return TokenGroups(groups, size, None, None, None)
        return TokenGroups(groups, size, perm, torch.argsort(perm), None)
    device = perm.device if perm is not None else device
    sizes = torch.tensor([len(c) for c in torch.arange(num_tokens).tensor_split(groups)], device=device)
    slot = torch.arange(size, device=device)
    key_mask = slot[None, :] < sizes[:, None]  # (groups, size)
    starts = torch.cumsum(sizes, 0) - sizes
    position = (starts[:, None] + slot[None, :]).masked_fill(~key_mask, 0).flatten()
    order = perm if perm is not None else torch.arange(num_tokens, device=device)
    gather = order[position]
    slots_of_real = key_mask.flatten().nonzero().squeeze(1)  # slot of the p-th permuted position
    scatter = torch.empty_like(order)
    scatter[order] = slots_of_real
    return TokenGroups(groups, size, gather, scatter, key_mask[:, None, :])


class TokenLayout(nn.Module):
    """Grouping and permutation of the tokens of one block application.

    The fixed permutation is a function of (seed, token count). Its index buffers for the model's own
    token count are built once, non-persistent: they follow `.to()`, stay out of checkpoints and are
    constants to torch.compile and export. Other token counts (other input sizes) are laid out per call.
    """

    def __init__(self, groups: int, permute: bool, seed: int, num_tokens: int) -> None:
        super().__init__()
        self.groups, self.permute, self.seed, self.num_tokens = groups, permute, seed, num_tokens
        layout = token_groups(num_tokens, groups, self.fixed_permutation(num_tokens))
        self.size = layout.size
        self.register_buffer("gather", layout.gather, persistent=False)
        self.register_buffer("scatter", layout.scatter, persistent=False)
        self.register_buffer("key_mask", layout.key_mask, persistent=False)

    def fixed_permutation(self, num_tokens: int) -> Tensor | None:
        if not self.permute:
            return None
        return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(self.seed))

    def forward(self, num_tokens: int, random: bool, device: torch.device) -> TokenGroups:
        """The layout for `num_tokens` tokens; `random` draws a fresh permutation from the global RNG of
        `device`, on the device itself: a host-drawn one would cost a host-to-device copy, and with it a
        stream synchronisation, per application."""
        if random and self.permute:
            return token_groups(num_tokens, self.groups, torch.randperm(num_tokens, device=device))
        if num_tokens == self.num_tokens:
            return TokenGroups(self.groups, self.size, self.gather, self.scatter, self.key_mask)
        perm = self.fixed_permutation(num_tokens)
        return token_groups(num_tokens, self.groups, perm.to(device) if perm is not None else None, device)


class SlicedAttention(nn.Module):
    """Multi-head self-attention restricted to groups of tokens.

    The tokens are laid out by a :class:`TokenGroups` (permuted, then cut into groups), attend only
    within their group, and are put back in their order. With one group and no permutation this is
    plain ViT attention.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, layout: TokenGroups, gain: Tensor | None = None) -> Tensor:
        """`gain * proj(attention)`: the residual's branch gain is applied here, by the last linear
        layer of the branch, where the kernels fold it into its weights."""
        if kernels.active(x, self):
            return kernels.sliced_attention(x, self.qkv, self.proj, self.num_heads, self.scale, layout, gain)
        B, _, C = x.shape
        G, n = layout.groups, layout.size
        if layout.gather is not None:  # permute (and pad) the tokens into G groups of n
            x = x[:, layout.gather]
        qkv = self.qkv(x).reshape(B * G, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * G, heads, n, head_dim)
        mask = None if layout.key_mask is None else layout.key_mask.repeat(B, 1, 1)[:, None]  # real keys
        if self.fused_attn:
            dropout = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, G * n, C)  # merge the heads, then the groups
        if layout.scatter is not None:  # back to the original order
            x = x[:, layout.scatter]
        x = self.proj(x)
        return self.proj_drop(x if gain is None else x * gain)


# --------------------------------------------------------------------------------------------------
# Residuals with learnable coefficients, blocks and NLL
# --------------------------------------------------------------------------------------------------
def coefficient(enabled: bool) -> nn.Parameter | None:
    """A learnable residual scalar, initialised to 1 (None when the ablation turns them off)."""
    return nn.Parameter(torch.ones(1)) if enabled else None


def residual(x: Tensor, branch: Tensor, skip: Tensor | None) -> Tensor:
    """The paper's residual `a*x + b*f(x)`: `skip` is a, and `branch` is already `b*f(x)` (each branch
    applies its gain b in its last linear layer). Plain `x + f(x)` when the coefficients are ablated."""
    if skip is None:
        return x + branch
    if kernels.active(x):
        return kernels.scaled_residual(x, branch, skip)
    return skip * x + branch


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm over channels, for the norms whose output goes straight into a product: under bf16
    autocast the fast path writes the output in bf16, the dtype that product takes, in SReT's C kernel
    (:func:`kernels.layer_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        if kernels.active(x, self):
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, gain: Tensor | None = None) -> Tensor:
        """`gain * fc2(...)`: see :meth:`SlicedAttention.forward`."""
        if kernels.active(x, self):
            fc1, fc2 = self.fc1, self.fc2
            return kernels.mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gain)
        x = self.fc2(self.drop(self.act(self.fc1(x))))
        return self.drop(x if gain is None else x * gain)


class Block(nn.Module):
    """Pre-norm transformer block with learnable residual coefficients; shared across loops."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        coefficients: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.attn = SlicedAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn_skip, self.attn_gain = coefficient(coefficients), coefficient(coefficients)
        self.mlp_skip, self.mlp_gain = coefficient(coefficients), coefficient(coefficients)

    def forward(self, x: Tensor, layout: TokenGroups) -> Tensor:
        x = residual(x, self.drop_path(self.attn(self.norm1(x), layout, self.attn_gain)), self.attn_skip)
        return residual(x, self.drop_path(self.mlp(self.norm2(x), self.mlp_gain)), self.mlp_skip)


class NonLinearProjection(nn.Module):
    """The NLL placed between two applications of a shared block, so recursion is not a fixed point."""

    def __init__(self, dim: int, ratio: float, coefficients: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        self.norm = LayerNorm(dim, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * ratio), drop)
        self.skip, self.gain = coefficient(coefficients), coefficient(coefficients)

    def forward(self, x: Tensor) -> Tensor:
        return residual(x, self.mlp(self.norm(x), self.gain), self.skip)


# --------------------------------------------------------------------------------------------------
# Relaxed recursion: per-loop adapters
# --------------------------------------------------------------------------------------------------
class WeightDelta(nn.Module):
    """A learned change of one (out, in) weight: `up @ down` of rank r, or a dense matrix ('full').

    Starts at zero (`up` is zero, `down` random as in LoRA), so a new adapter leaves its block as is.
    """

    def __init__(self, out_features: int, in_features: int, rank: LoRARank) -> None:
        super().__init__()
        self.rank = rank
        if rank == "full":
            self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        else:
            self.down = nn.Parameter(torch.empty(rank, in_features))
            self.up = nn.Parameter(torch.zeros(out_features, rank))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))

    def forward(self) -> Tensor:
        return self.weight if self.rank == "full" else self.up @ self.down


class LoopAdapter(nn.Module):
    """What one application of a shared block does not share: its own deltas on the block's weights.

    The deltas are added to the shared weights, not run beside them, so the application runs one
    matrix product per linear layer, as the paper's does, plus one rank-r product per weight.
    """

    def __init__(self, block: Block, rank: LoRARank, targets: Sequence[str], vectors: bool) -> None:
        super().__init__()
        weights = {t: block.get_parameter(f"{LORA_TARGETS[t]}.weight") for t in targets} if rank else {}
        self.weights = nn.ModuleDict({t: WeightDelta(*w.shape, rank) for t, w in weights.items()})
        names = [n for n, p in block.named_parameters() if p.ndim == 1] if vectors else []
        self.vector_names = {n.replace(".", "_"): n for n in names}  # ParameterDict keys hold no dots
        self.vectors = nn.ParameterDict(
            {key: torch.zeros_like(block.get_parameter(n)) for key, n in self.vector_names.items()}
        )

    def forward(self, block: Block) -> dict[str, Tensor]:
        """This application's parameters of `block` (shared + own delta), by name in the block."""
        params = {}
        for target, delta in self.weights.items():
            name = f"{LORA_TARGETS[target]}.weight"
            params[name] = block.get_parameter(name) + delta()
        for key, delta in self.vectors.items():
            name = self.vector_names[key]
            params[name] = block.get_parameter(name) + delta
        return params


# --------------------------------------------------------------------------------------------------
# Stem, pooling, stage
# --------------------------------------------------------------------------------------------------
@register_notrace_module  # an FX leaf: its kernel choice reads the input's dtype and mode
class ConvStem(nn.Module):
    """Three 3x3 conv-BN-ReLU layers: in_chans -> dim/2 -> dim -> dim, stride 8 (each conv stride 2).

    At stride 4 or 2 the last one or two convs keep stride 1. Runs channels-last: the convolutions
    are faster that way on CPU, and the tokens of the first stage are then a free view of the output.
    """

    def __init__(self, in_chans: int, dim: int, stride: int = 8) -> None:
        super().__init__()
        chans = (in_chans, dim // 2, dim, dim)
        strides = (2, 2, 2) if stride == 8 else (2, 2, 1) if stride == 4 else (2, 1, 1)
        for i in range(3):
            conv = nn.Conv2d(chans[i], chans[i + 1], 3, stride=strides[i], padding=1)
            self.add_module(f"conv{i + 1}", conv)
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(chans[i + 1]))

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        layers = ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))
        if kernels.active(x, self):
            for _, run in itertools.groupby(layers, key=lambda layer: layer[0].stride):
                x = kernels.conv_bn_relu(x, tuple(run))  # one call per run of equal strides
            return x
        for conv, bn in layers:
            x = F.relu(bn(conv(x)), inplace=True)
        return x


@register_notrace_module  # an FX leaf: its kernel choice reads the input's dtype and mode
class ConvPool(nn.Module):
    """Depthwise 3x3 stride-2 convolution between stages (PiT pooling without the class token)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        if kernels.active(x, self):
            return kernels.depthwise_conv(x, self.conv)
        return self.conv(x)


@register_notrace_module  # an FX leaf (the unit of feature extraction): its layouts depend on shapes
class SReTStage(nn.Module):
    """Unique blocks, NLLs and per-application token layouts, run in the order of a RecursionSchedule."""

    def __init__(self, cfg: SReTConfig, index: int, num_tokens: int, drop_path: Sequence[float]) -> None:
        super().__init__()
        stage = cfg.stages[index]
        self.config, self.nll_sharing = stage, cfg.nll
        self.schedule = RecursionSchedule.build(stage, cfg.nll, adapters=cfg.adapted)
        self.random = cfg.shuffle == "random"
        self.random_eval = cfg.random_eval
        self.grad_checkpointing = False
        coefficients, drop = cfg.residual_coefficients, cfg.drop_rate
        self.blocks = nn.ModuleList(
            Block(stage.dim, stage.heads, cfg.mlp_ratio, coefficients, drop, cfg.attn_drop_rate, drop_path[r])
            for r in range(stage.blocks)
        )
        self.nlls = nn.ModuleList(
            NonLinearProjection(stage.dim, cfg.nll_ratio, coefficients, drop)
            for _ in range(self.schedule.num_nlls)
        )
        self.adapters = nn.ModuleList(
            LoopAdapter(self.blocks[app.block], cfg.loop_lora_rank, cfg.loop_lora_targets, cfg.loop_vectors)
            for app in self.schedule
            if cfg.adapted
        )
        if max(stage.groups) > num_tokens:
            raise ValueError(
                f"stage {index} has {num_tokens} tokens at img_size {cfg.img_size}, too few for "
                f"{max(stage.groups)} attention groups: use a larger img_size or fewer groups"
            )
        self.layouts = nn.ModuleList(
            TokenLayout(
                app.groups,
                app.permute and cfg.shuffle != "none",
                cfg.perm_seed * 1_000_003 + index * 10_007 + i,
                num_tokens,
            )
            for i, app in enumerate(self.schedule)
        )

    @property
    def loops(self) -> int:
        """Loops each block runs now (the trained count unless :meth:`set_loops` changed it)."""
        return len(self.schedule) // self.config.blocks

    def set_loops(self, loops: int | None = None) -> None:
        """Run each block `loops` times (None: the trained count); see :class:`RecursionSchedule`."""
        self.schedule = RecursionSchedule.build(self.config, self.nll_sharing, loops, len(self.adapters) > 0)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        random = self.random and (self.training or self.random_eval)
        for app in self.schedule:
            groups = self.layouts[app.layout](H * W, random, x.device)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.apply_block, x, app, groups, use_reentrant=False)
            else:
                x = self.apply_block(x, app, groups)
        return x.transpose(1, 2).reshape(B, C, H, W)

    def apply_block(self, x: Tensor, app: Application, groups: TokenGroups) -> Tensor:
        """One application: the shared block (with this loop's adapter, if any), then its NLL."""
        block = self.blocks[app.block]
        if app.adapter is None:
            x = block(x, groups)
        else:
            x = functional_call(block, self.adapters[app.adapter](block), (x, groups))
        return self.nlls[app.nll](x) if app.nll is not None else x


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------
@register_notrace_function  # a shape test: FX tracers record the call instead of tracing into it
def resized_pos_embed(pos: Tensor, x: Tensor) -> Tensor:
    """The 2-D positional embedding at the spatial size of `x` (bicubic, as timm resamples)."""
    if pos.shape[-2:] == x.shape[-2:]:
        return pos
    return F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)


def resolve_loops(loops: int | Sequence[int] | None, trained: Sequence[int]) -> tuple[int, ...]:
    """Loops per stage from one count, one per stage, or None (the trained ones)."""
    if loops is None:
        return tuple(trained)
    counts = (loops,) * len(trained) if isinstance(loops, int) else tuple(loops)
    if len(counts) != len(trained):
        raise ValueError(f"loops needs one count or one per stage ({len(trained)}), got {list(counts)}")
    if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
        raise ValueError(f"loops must be whole numbers >= 1, got {list(counts)}")
    return counts


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _halve(size: int) -> int:
    """Output size of a 3x3, stride-2, padding-1 convolution."""
    return (size - 1) // 2 + 1


def _stem_grid(size: int, stride: int) -> int:
    """Output size of the conv stem: one halving per stride-2 conv."""
    for _ in range(stride.bit_length() - 1):
        size = _halve(size)
    return size


class SReT(nn.Module):
    """Sliced Recursive Transformer with the timm model API.

    Build from a :class:`SReTConfig`; keyword overrides replace config fields
    (``SReT(cfg, num_classes=10, img_size=32)``).
    """

    def __init__(self, cfg: SReTConfig, **overrides) -> None:
        super().__init__()
        unknown = set(overrides) - set(SReTConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown SReT options: {sorted(unknown)}")
        if "stages" in overrides:  # e.g. from a checkpoint's JSON metadata
            overrides["stages"] = tuple(StageConfig.from_mapping(s) for s in overrides["stages"])
        if "loop_lora_targets" in overrides:
            overrides["loop_lora_targets"] = tuple(overrides["loop_lora_targets"])
        cfg = replace(cfg, **overrides)
        cfg.validate()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = cfg.stages[-1].dim
        self.img_size = _pair(cfg.img_size)

        dim0 = cfg.stages[0].dim
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(cfg.in_chans, dim0, cfg.stem_stride)
            grid = tuple(_stem_grid(s, cfg.stem_stride) for s in self.img_size)
        else:
            self.patch_embed = PatchEmbed(
                self.img_size, cfg.patch_size, cfg.in_chans, dim0, flatten=False, strict_img_size=False
            )
            grid = tuple(s // cfg.patch_size for s in self.img_size)
        if min(grid) < 1:
            raise ValueError(f"img_size {self.img_size} is too small for a stride-{cfg.stride} stem")
        self.pos_embed = nn.Parameter(torch.zeros(1, dim0, *grid))
        self.pos_drop = nn.Dropout(cfg.drop_rate)

        rates = drop_path_rates(cfg)
        self.stages, self.pools, self.feature_info = nn.ModuleList(), nn.ModuleList(), []
        reduction = cfg.stride
        for i, stage in enumerate(cfg.stages):
            if i:
                self.pools.append(ConvPool(cfg.stages[i - 1].dim, stage.dim))
                grid = (_halve(grid[0]), _halve(grid[1]))
                reduction *= 2
            self.stages.append(SReTStage(cfg, i, grid[0] * grid[1], rates[i]))
            self.feature_info.append(dict(num_chs=stage.dim, reduction=reduction, module=f"stages.{i}"))

        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # The authors re-initialise only LayerNorm; everything else keeps PyTorch's defaults.
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm API --------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^pos_embed|^patch_embed",
            blocks=[(r"^stages\.(\d+)", None), (r"^pools\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block application (block + its NLL) in backward instead of storing it."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    # ---- anytime depth ---------------------------------------------------------------------------
    @property
    def loops(self) -> tuple[int, ...]:
        """Loops per block of each stage, as the model runs now."""
        return tuple(stage.loops for stage in self.stages)

    @property
    def trained_loops(self) -> tuple[int, ...]:
        """Loops per block of each stage as configured (and trained)."""
        return tuple(stage.loops for stage in self.cfg.stages)

    def set_loops(self, loops: int | Sequence[int] | None = None) -> None:
        """Run every block `loops` times (one count for all stages, or one per stage; None: as
        configured). The weights stay; loops beyond the configured ones repeat the last loop's settings
        (see :class:`RecursionSchedule`)."""
        counts = resolve_loops(loops, self.trained_loops)
        for stage, count in zip(self.stages, counts, strict=True):
            stage.set_loops(count)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x: Tensor) -> Tensor:
        return self.pos_drop(x + resized_pos_embed(self.pos_embed, x))

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem and all stages; returns the last stage's NCHW map."""
        x = self._pos_embed(self.patch_embed(x))
        for i, stage in enumerate(self.stages):
            if i:
                x = self.pools[i - 1](x)
            x = stage(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
            x = self.norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (NCHW, before the following pooling), timm-style.

        Args:
            indices: last n stages if an int, else the stage indices to return (all by default).
            norm: apply the final LayerNorm to the last stage's map (over channels, at every position);
                SReT has no norm of the other stages' widths.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"SReT intermediates are NCHW, got output_fmt={output_fmt!r}")
        take, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self._pos_embed(self.patch_embed(x))
        last = max_index if (stop_early or intermediates_only) else len(self.stages) - 1
        for i, stage in enumerate(self.stages[: last + 1]):
            if i:
                x = self.pools[i - 1](x)
            x = stage(x)
            if i in take:
                final = norm and i == len(self.stages) - 1
                intermediates.append(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if final else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) after the last requested intermediate."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.pools = self.pools[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


# --------------------------------------------------------------------------------------------------
# Checkpoint filter: the authors' layout -> ours
# --------------------------------------------------------------------------------------------------
_OFFICIAL_BLOCK = {
    "coefficient1.bias": "attn_skip",
    "coefficient2.bias": "attn_gain",
    "coefficient3.bias": "mlp_skip",
    "coefficient4.bias": "mlp_gain",
}
_OFFICIAL_NLL = {"norm1.": "norm.", "coefficient1.bias": "skip", "coefficient2.bias": "gain"}


def is_official_layout(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("transformers.") for k in state_dict)


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def convert_official(state_dict: dict[str, Tensor], model: SReT) -> dict[str, Tensor]:
    """Map `transformers.{s}.blocks.{j}.*` onto our stages through each stage's schedule.

    Even j is application j // 2 of the schedule (its unique block, repeated under every j where it
    runs); odd j is the NLL after it. Repeated copies of a shared block must be identical.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith("transformers."):
            out[key] = value
            continue
        _, s, _, j, rest = key.split(".", 4)
        s, j = int(s), int(j)
        if s >= len(model.stages):
            raise ValueError(f"checkpoint key {key} names stage {s}, the model has {len(model.stages)}")
        schedule = RecursionSchedule.build(model.cfg.stages[s], model.cfg.nll).applications
        if j // 2 >= len(schedule):
            raise ValueError(f"checkpoint key {key}: stage {s} has only {len(schedule)} applications")
        app = schedule[j // 2]
        if j % 2 == 0:
            new = f"stages.{s}.blocks.{app.block}.{_rename(rest, _OFFICIAL_BLOCK)}"
        elif app.nll is not None:
            new = f"stages.{s}.nlls.{app.nll}.{_rename(rest, _OFFICIAL_NLL)}"
        else:
            raise ValueError(f"checkpoint key {key} is an NLL, but this model has none")
        if new in out and not torch.equal(out[new], value):
            raise ValueError(f"checkpoint key {key} disagrees with an earlier copy of the same shared weight")
        out[new] = value
    return out


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: SReT) -> dict[str, Tensor]:
    """Accept our layout or the authors' (`{'model': ...}`, per-application keys) and fit the resolution."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if is_official_layout(state_dict):
        state_dict = convert_official(state_dict, model)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape[-2:] != model.pos_embed.shape[-2:]:
        state_dict["pos_embed"] = F.interpolate(
            pos.float(), size=model.pos_embed.shape[-2:], mode="bicubic", align_corners=False
        ).to(pos.dtype)
    return state_dict


# --------------------------------------------------------------------------------------------------
# Zoo
# --------------------------------------------------------------------------------------------------
_NOSLICE = dict(groups1=(1, 1, 1), groups2=(1, 1, 1))

SRET_T = SReTConfig(official_stages((32, 32, 32), (2, 4, 8)), mlp_ratio=3.6, nll_ratio=1.0)
SRET_LT = SReTConfig(official_stages((32, 32, 32), (2, 4, 8)), mlp_ratio=4.0, nll_ratio=1.0)
SRET_S = SReTConfig(official_stages((42, 42, 42), (3, 6, 12)), mlp_ratio=3.0, nll_ratio=2.0)


def _deep_stages(loops_last: int) -> tuple[StageConfig, ...]:
    """Very deep recursion: 4 + 36 + 5 * loops_last applications, most of them on the 7x7 last stage."""
    return (
        StageConfig(96, 2, blocks=2, loops=2, groups=(8, 2), permute=(False, True)),
        StageConfig(192, 4, blocks=6, loops=6, groups=(4,) + (1,) * 5, permute=(False,) * 6),
        StageConfig(
            384, 8, blocks=5, loops=loops_last, groups=(1,) * loops_last, permute=(False,) * loops_last
        ),
    )


MODEL_CONFIGS: dict[str, SReTConfig] = {
    "sret_t": SRET_T,
    "sret_t_noslice": replace(SRET_T, stages=official_stages((32, 32, 32), (2, 4, 8), **_NOSLICE)),
    "sret_lt": SRET_LT,
    "sret_lt_noslice": replace(SRET_LT, stages=official_stages((32, 32, 32), (2, 4, 8), **_NOSLICE)),
    "sret_s": SRET_S,
    "sret_s_noslice": replace(SRET_S, stages=official_stages((42, 42, 42), (3, 6, 12), **_NOSLICE)),
    "sret_t_noslice_384": replace(
        SRET_T, stages=official_stages((32, 32, 32), (2, 4, 8), **_NOSLICE), img_size=384
    ),
    "sret_s_noslice_384": replace(
        SRET_S, stages=official_stages((42, 42, 42), (3, 6, 12), **_NOSLICE), img_size=384
    ),
    "sret_s_noslice_512": replace(
        SRET_S, stages=official_stages((42, 42, 42), (3, 6, 12), **_NOSLICE), img_size=512
    ),
    # Beyond the paper's zoo: a 100- and a 1000-layer recursion, NLLs shared per unique block.
    "sret_deep_100": SReTConfig(_deep_stages(12), mlp_ratio=4.0, nll_ratio=0.5, nll="block"),
    "sret_deep_1000": SReTConfig(_deep_stages(192), mlp_ratio=4.0, nll_ratio=0.5, nll="block"),
    # Small model for small images (the digits/CIFAR demos): stride-8 stem, 32x32 input.
    "sret_nano": SReTConfig(
        (
            StageConfig(32, 2, blocks=1, loops=2, groups=(2, 2), permute=(False, True)),
            StageConfig(64, 4, blocks=1, loops=2),
            StageConfig(128, 8, blocks=1, loops=2),
        ),
        mlp_ratio=3.0,
        img_size=32,
        drop_path_rate=0.0,
    ),
}


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.conv1",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


def _res(size: int) -> dict:
    return dict(input_size=(3, size, size), pool_size=(math.ceil(size / 32),) * 2, crop_pct=1.0)


def _published(name: str, file: str, top1: float, **kwargs) -> dict:
    """A checkpoint of the authors' release (github.com/szq0214/SReT, "Pre-trained Model"): `name` as
    their table gives it, `file` the name their model code loads it by (SReT.py, SReT_wo_slice.py;
    the same pattern where it names none) and the ImageNet-1k top-1 (%) they report. No weights ship
    with sret: `pretrained=True` reads `file` from the working directory, as their code does, and
    `sret.create_model(tag, checkpoint_path=...)` reads any path."""
    return _cfg(
        file=file,
        description=f"{name}, ImageNet-1k top-1 {top1} % (the authors' release)",
        origin_url="https://github.com/szq0214/SReT",
        paper_ids="arXiv:2111.05297",
        paper_name="Sliced Recursive Transformer",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "sret_t.in1k": _published("SReT_T", "SReT_T.pth", 76.0),
        "sret_t.distill_in1k": _published("SReT_T_Distill", "SReT_T_distill.pth", 77.6),
        "sret_t_noslice.in1k": _published("SReT_⋇T", "SReT_T_wo_slice.pth", 76.1),
        "sret_t_noslice.distill_in1k": _published("SReT_⋇T_Distill", "SReT_T_wo_slice_distill.pth", 77.7),
        "sret_lt.in1k": _published("SReT_LT [8-4-1,2-1-1]", "SReT_LT.pth", 76.7),
        "sret_lt.distill_in1k": _published("SReT_LT_Distill", "SReT_LT_distill.pth", 77.7),
        "sret_lt_noslice.in1k": _published("SReT_⋇LT", "SReT_LT_wo_slice.pth", 76.8),
        "sret_lt_noslice.distill_in1k": _published("SReT_⋇LT_Distill", "SReT_LT_wo_slice_distill.pth", 77.9),
        "sret_s.in1k": _published("SReT_S", "SReT_S.pth", 81.9),
        "sret_s_noslice.in1k": _published("SReT_⋇S", "SReT_S_wo_slice.pth", 82.0),
        "sret_t_noslice_384.distill_in1k": _published(
            "SReT_⋇T_Distill_Finetune384", "SReT_T_wo_slice_finetune_384.pth", 79.7, **_res(384)
        ),
        "sret_s_noslice_384.distill_in1k": _published(  # the authors' spelling of the file
            "SReT_⋇S_Distill_Finetune384", "SReT_S_wo_slice_fineture_384.pth", 83.8, **_res(384)
        ),
        "sret_s_noslice_512.distill_in1k": _published(
            "SReT_⋇S_Distill_Finetune512", "SReT_S_wo_slice_finetune_512.pth", 84.3, **_res(512)
        ),
        "sret_deep_100": _cfg(),
        "sret_deep_1000": _cfg(),
        "sret_nano": _cfg(input_size=(3, 32, 32), pool_size=(1, 1), crop_pct=1.0),
    }
)


def _create_sret(variant: str, pretrained: bool = False, **kwargs) -> SReT:
    return build_model_with_cfg(
        SReT,
        variant,
        pretrained,
        model_cfg=MODEL_CONFIGS[variant],
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)),
        **kwargs,
    )


@register_model
def sret_t(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T, the paper's tiny model: sliced attention, 224 px."""
    return _create_sret("sret_t", pretrained=pretrained, **kwargs)


@register_model
def sret_t_noslice(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-T without sliced attention (one group everywhere)."""
    return _create_sret("sret_t_noslice", pretrained=pretrained, **kwargs)


@register_model
def sret_lt(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-LT: SReT-T's layout with a wider MLP (ratio 4 instead of 3.6)."""
    return _create_sret("sret_lt", pretrained=pretrained, **kwargs)


@register_model
def sret_lt_noslice(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-LT without sliced attention."""
    return _create_sret("sret_lt_noslice", pretrained=pretrained, **kwargs)


@register_model
def sret_s(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-S, the paper's small model: sliced attention, 224 px."""
    return _create_sret("sret_s", pretrained=pretrained, **kwargs)


@register_model
def sret_s_noslice(pretrained: bool = False, **kwargs) -> SReT:
    """SReT-S without sliced attention."""
    return _create_sret("sret_s_noslice", pretrained=pretrained, **kwargs)


@register_model
def sret_t_noslice_384(pretrained: bool = False, **kwargs) -> SReT:
    """Unsliced SReT-T at 384 px (the authors' fine-tuning shape)."""
    return _create_sret("sret_t_noslice_384", pretrained=pretrained, **kwargs)


@register_model
def sret_s_noslice_384(pretrained: bool = False, **kwargs) -> SReT:
    """Unsliced SReT-S at 384 px (the authors' fine-tuning shape)."""
    return _create_sret("sret_s_noslice_384", pretrained=pretrained, **kwargs)


@register_model
def sret_s_noslice_512(pretrained: bool = False, **kwargs) -> SReT:
    """Unsliced SReT-S at 512 px (the authors' fine-tuning shape)."""
    return _create_sret("sret_s_noslice_512", pretrained=pretrained, **kwargs)


@register_model
def sret_deep_100(pretrained: bool = False, **kwargs) -> SReT:
    """Deep recursion: 100 block applications, one NLL per unique block."""
    return _create_sret("sret_deep_100", pretrained=pretrained, **kwargs)


@register_model
def sret_deep_1000(pretrained: bool = False, **kwargs) -> SReT:
    """Deep recursion: 1000 block applications, one NLL per unique block."""
    return _create_sret("sret_deep_1000", pretrained=pretrained, **kwargs)


@register_model
def sret_nano(pretrained: bool = False, **kwargs) -> SReT:
    """A small SReT for 32 px images (the local demos)."""
    return _create_sret("sret_nano", pretrained=pretrained, **kwargs)
