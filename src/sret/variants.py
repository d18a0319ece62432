"""Model variants as plain data: a registered SReT plus overrides of its config.

An override set is what a recipe (`model_args:`), `--set model_args={...}` or an ablation grid
writes: any :class:`~sret.model.SReTConfig` field (``nll``, ``residual_coefficients``, ``stem``,
``mlp_ratio``, ...) and the stage fields ``dim``, ``heads``, ``blocks``, ``loops``, ``groups`` and
``permute``, which apply to every stage at once. A stage field may instead hold one value per stage
(a list as long as the stages); ``groups`` and ``permute`` values are then a number (every loop) or a
per-loop list. ``permute: true`` permutes the recursive loops (all but the first), as the paper does.
When ``loops`` changes, per-loop settings not given are carried over loop by loop and the last
loop's settings repeat for new loops.

The result is explicit: ``stages`` as a list of per-stage mappings, JSON-ready, so a checkpoint's
metadata rebuilds the same model wherever it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any

from sret.model import MODEL_CONFIGS, SReTConfig, StageConfig

STAGE_FIELDS = ("dim", "heads", "blocks", "loops", "groups", "permute")
PER_LOOP = ("groups", "permute")
MODEL_FIELDS = tuple(f.name for f in fields(SReTConfig) if f.name != "stages")


def resolve_overrides(model: str, *layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """SReT keyword overrides (JSON-ready) for `model` changed by each layer of overrides in turn.

    Layers apply in order, each to the result of the one before (a grid's base, then a variant). The
    result goes to `create_model(model, **result)`; it holds `stages` only when a stage field
    changed. ValueError names what is invalid.
    """
    if model.split(".", 1)[0] not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {model!r}")
    base = MODEL_CONFIGS[model.split(".", 1)[0]]
    stages, options = list(base.stages), {}
    for layer in layers:
        stages, changed = _apply(stages, dict(layer or {}))
        options.update(changed)
    if stages != list(base.stages):
        options["stages"] = [_plain(asdict(s)) for s in stages]
    cfg_fields = {**{f.name: getattr(base, f.name) for f in fields(base)}, **options}
    cfg_fields["stages"] = tuple(stages)
    SReTConfig(**cfg_fields).validate()
    return options


def config_overrides(cfg: SReTConfig, base: SReTConfig) -> dict[str, Any]:
    """The JSON-ready overrides that turn `base` into `cfg` (what a checkpoint stores to rebuild it)."""
    options: dict[str, Any] = {}
    for f in fields(SReTConfig):
        value = getattr(cfg, f.name)
        if value == getattr(base, f.name):
            continue
        if f.name == "stages":
            options["stages"] = [_plain(asdict(s)) for s in value]
        else:
            options[f.name] = list(value) if isinstance(value, tuple) else value
    return options


def _apply(stages: list[StageConfig], overrides: dict[str, Any]) -> tuple[list[StageConfig], dict[str, Any]]:
    """One layer of overrides: the new stages, and the model options it sets."""
    unknown = sorted(set(overrides) - set(STAGE_FIELDS) - set(MODEL_FIELDS) - {"stages"})
    if unknown:
        allowed = ", ".join((*STAGE_FIELDS, "stages", *MODEL_FIELDS))
        raise ValueError(f"unknown model option(s) {', '.join(unknown)} (known: {allowed})")
    stage_values = {k: overrides.pop(k) for k in STAGE_FIELDS if k in overrides}
    if "stages" in overrides:
        if stage_values:
            raise ValueError(f"give either stages or the stage fields {', '.join(stage_values)}, not both")
        stages = [StageConfig.from_mapping(s) for s in _sequence(overrides.pop("stages"), "stages")]
    if stage_values:
        stages = [_stage(stage, i, len(stages), stage_values) for i, stage in enumerate(stages)]
    return stages, overrides


def _stage(stage: StageConfig, index: int, count: int, values: Mapping[str, Any]) -> StageConfig:
    """`stage` with the stage fields of `values` (a value for every stage, or one per stage) applied."""
    mine = {k: _for_stage(k, v, index, count) for k, v in values.items()}
    loops = int(mine.get("loops", stage.loops))
    changed = {k: v for k, v in mine.items() if k not in PER_LOOP}
    for key in PER_LOOP:
        current = getattr(stage, key)
        carried = tuple(current[min(loop, len(current) - 1)] for loop in range(loops))
        changed[key] = _per_loop(key, mine[key], loops) if key in mine else carried
    return StageConfig(**{**asdict(stage), **changed})


def _for_stage(key: str, value: Any, index: int, count: int) -> Any:
    """A stage's own entry of a per-stage list, or the value itself if it applies to every stage."""
    per_stage = isinstance(value, Sequence) and not isinstance(value, str)
    if not per_stage:
        return value
    if len(value) != count:
        raise ValueError(f"{key}: a list needs one entry per stage ({count} stages), got {list(value)}")
    return value[index]


def _per_loop(key: str, value: Any, loops: int) -> tuple:
    """Per-loop group counts or permutation flags from a number/flag or a per-loop list."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != loops:
            raise ValueError(f"{key}: a per-loop list needs one entry per loop ({loops}), got {list(value)}")
        return tuple(value)
    if key == "permute":  # the paper permutes the recursive applications, never the first
        return (False,) + (bool(value),) * (loops - 1)
    return (value,) * loops


def _sequence(value: Any, key: str) -> Sequence:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{key} must be a list of per-stage mappings")
    return value


def _plain(stage: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in stage.items()}
