"""The SReT model: zoo sizes, official parity, sliced attention semantics, timm API, checkpoints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import timm
import timm.optim
import torch

import sret
from sret.info import count_macs, model_info
from sret.model import (
    MODEL_CONFIGS,
    SlicedAttention,
    SReT,
    SReTConfig,
    StageConfig,
    token_groups,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "official_sret_t_io.pt").is_file(), reason="../shared/reference is absent"
)

# name: (params, GMACs) from the paper's zoo, as the official constructors give them
ZOO = {
    "sret_t": (4.756e6, 1.112),
    "sret_t_noslice": (4.756e6, 1.366),
    "sret_lt": (4.988e6, 1.164),
    "sret_lt_noslice": (4.988e6, 1.418),
    "sret_s": (20.900e6, 4.173),
    "sret_s_noslice": (20.900e6, 4.671),
    "sret_t_noslice_384": (4.853e6, 6.408),
    "sret_s_noslice_384": (21.091e6, 18.443),
    "sret_s_noslice_512": (21.317e6, 42.672),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny_cfg(**kw) -> SReTConfig:
    stages = (
        StageConfig(16, 2, blocks=2, loops=2, groups=(4, 2), permute=(False, True)),
        StageConfig(32, 4, blocks=1, loops=3, groups=(2, 1, 2), permute=(False, False, True)),
    )
    return SReTConfig(stages, mlp_ratio=2.0, img_size=32, num_classes=5, **kw)


# ---- zoo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_params_and_macs(name: str) -> None:
    params, gmacs = ZOO[name]
    model = sret.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.01, n
    macs = count_macs(model)
    assert abs(macs / 1e9 - gmacs) / gmacs < 0.01, macs


def test_info_breakdown_adds_up_and_reports_slicing_saving() -> None:
    info = model_info("sret_t")
    assert sum(info.macs_by_component.values()) == info.macs
    assert sum(info.params_by_component.values()) == info.params
    assert (
        sum(info.macs_by_stage)
        + info.macs_by_component["stem"]
        + info.macs_by_component["pooling"]
        + (info.macs_by_component["head"])
        == info.macs
    )
    assert info.unsliced_macs == count_macs(sret.create_model("sret_t_noslice"))
    assert 0.18 < info.slicing_saving < 0.19


@pytest.mark.parametrize(("name", "layers"), [("sret_deep_100", 100), ("sret_deep_1000", 1000)])
def test_deep_zoo_entries(name: str, layers: int) -> None:
    model = sret.create_model(name)
    applied = sum(len(stage.schedule) for stage in model.stages)
    assert applied >= layers
    assert 13e6 <= sum(p.numel() for p in model.parameters()) <= 15e6


# ---- official parity ----------------------------------------------------------------------------
@needs_reference
def test_official_checkpoint_parity() -> None:
    io = torch.load(REFERENCE / "official_sret_t_io.pt", weights_only=True)
    model = sret.create_model(
        "sret_t", checkpoint_path=REFERENCE / "official_sret_t.pth", shuffle="none"
    ).eval()
    with torch.no_grad():
        logits = model(io["input"])
        stages = model.forward_intermediates(io["input"], intermediates_only=True)
    assert rel_err(logits, io["logits_identity_shuffle"]) < 1e-4
    for ours, theirs in zip(stages, io["stage_outputs_identity_shuffle"], strict=True):
        assert ours.shape == theirs.shape
        assert rel_err(ours, theirs) < 1e-4


@needs_reference
def test_official_random_shuffle_is_reproduced_with_random_eval() -> None:
    io = torch.load(REFERENCE / "official_sret_t_io.pt", weights_only=True)
    model = sret.create_model(
        "sret_t", checkpoint_path=REFERENCE / "official_sret_t.pth", shuffle="random", random_eval=True
    ).eval()
    torch.manual_seed(io["logits_random_shuffle_seed"])
    with torch.no_grad():
        logits = model(io["input"])
    assert rel_err(logits, io["logits_random_shuffle"]) < 1e-4


@needs_reference
def test_official_checkpoint_through_timm() -> None:
    io = torch.load(REFERENCE / "official_sret_t_io.pt", weights_only=True)
    model = timm.create_model(
        "sret_t",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(REFERENCE / "official_sret_t.pth")),
        shuffle="none",
    ).eval()
    with torch.no_grad():
        assert rel_err(model(io["input"]), io["logits_identity_shuffle"]) < 1e-4


@needs_reference
def test_official_checkpoint_at_another_resolution_interpolates_pos_embed() -> None:
    model = sret.create_model("sret_t", checkpoint_path=REFERENCE / "official_sret_t.pth", img_size=256)
    assert model.pos_embed.shape[-2:] == (32, 32)


# ---- sliced attention ---------------------------------------------------------------------------
def reference_sliced_attention(
    attn: SlicedAttention, x: torch.Tensor, groups: int, perm: torch.Tensor | None
):
    """Full attention over the permuted sequence with a block-diagonal (same-group) mask."""
    B, N, C = x.shape
    perm = torch.arange(N) if perm is None else perm
    xp = x[:, perm]
    group_of = torch.cat(
        [torch.full((len(c),), i) for i, c in enumerate(torch.arange(N).tensor_split(groups))]
    )
    mask = group_of[:, None] == group_of[None, :]
    qkv = attn.qkv(xp).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(B, N, C)
    out = out[:, torch.argsort(perm)]
    return attn.proj(out)


@pytest.mark.parametrize(("tokens", "groups"), [(64, 8), (49, 4), (50, 3), (7, 7), (10, 4)])
@pytest.mark.parametrize("permute", [False, True])
def test_sliced_attention_equals_block_diagonal_masked_attention(
    tokens: int, groups: int, permute: bool
) -> None:
    """Outputs, and with autograd the input gradients too (a permutation's backward is its inverse
    gather, padded layouts take autograd's scatter-add)."""
    torch.manual_seed(0)
    attn = SlicedAttention(32, 4).eval()
    x = torch.randn(3, tokens, 32)
    perm = torch.randperm(tokens) if permute else None
    with torch.no_grad():
        ours = attn(x, token_groups(tokens, groups, perm))
        ref = reference_sliced_attention(attn, x, groups, perm)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)
    weights = torch.randn(3, tokens, 32)
    ours = torch.autograd.grad((attn(x, token_groups(tokens, groups, perm)) * weights).sum(), x)[0]
    ref = torch.autograd.grad((reference_sliced_attention(attn, x, groups, perm) * weights).sum(), x)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_padding_never_leaks_into_real_tokens() -> None:
    """With 10 tokens in 4 groups, perturbing tokens of one group changes no other group's output."""
    torch.manual_seed(0)
    attn = SlicedAttention(16, 2).eval()
    layout = token_groups(10, 4, None)  # groups {0,1,2} {3,4,5} {6,7} {8,9}
    x = torch.randn(1, 10, 16)
    y = x.clone()
    y[:, 8:] += 5.0
    with torch.no_grad():
        a, b = attn(x, layout), attn(y, layout)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_one_group_is_plain_attention() -> None:
    torch.manual_seed(0)
    ours = SlicedAttention(48, 3).eval()
    plain = timm.layers.Attention(48, num_heads=3, qkv_bias=True).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 37, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, token_groups(37, 1, None)), plain(x), atol=1e-5, rtol=1e-5)


def test_shuffle_none_equals_contiguous_groups() -> None:
    """'none' keeps row-major order: the same as the identity permutation, and unlike 'fixed'."""
    torch.manual_seed(0)
    base = SReT(tiny_cfg(shuffle="none")).eval()
    same = SReT(
        replace(tiny_cfg(), stages=tuple(replace(s, permute=(False,) * s.loops) for s in base.cfg.stages))
    )
    fixed = SReT(tiny_cfg(shuffle="fixed"))
    same.load_state_dict(base.state_dict())
    fixed.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(base(x), same.eval()(x))
        assert not torch.allclose(base(x), fixed.eval()(x), atol=1e-6)
    identity = token_groups(16, 4, torch.arange(16))
    contiguous = token_groups(16, 4, None)
    attn = SlicedAttention(16, 2).eval()
    h = torch.randn(2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(h, identity), attn(h, contiguous))


def test_eval_is_deterministic_by_default_and_random_eval_is_opt_in() -> None:
    torch.manual_seed(0)
    model = SReT(tiny_cfg()).eval()  # shuffle='random'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        official = SReT(tiny_cfg(random_eval=True)).eval()
        official.load_state_dict(model.state_dict())
        assert not torch.allclose(official(x), official(x))


def test_fixed_permutations_are_reproducible_and_differ_per_application() -> None:
    a, b = SReT(tiny_cfg(shuffle="fixed")), SReT(tiny_cfg(shuffle="fixed"))
    perms_a = [t.gather for s in a.stages for t in s.layouts if t.permute]
    perms_b = [t.gather for s in b.stages for t in s.layouts if t.permute]
    assert len(perms_a) == 3  # two blocks x one permuted loop in stage 0, one in stage 1
    for pa, pb in zip(perms_a, perms_b, strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(perms_a[0], perms_a[1])
    buffers = ("gather", "scatter", "key_mask")
    assert not any(k.endswith(buffers) for k in a.state_dict())  # checkpoints stay free of them


def test_inference_mode_then_training_works() -> None:
    """Index buffers built at construction are ordinary tensors: an inference_mode pass must not
    leave anything behind that autograd later refuses."""
    model = SReT(tiny_cfg(shuffle="fixed")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)
        model(torch.randn(1, 3, 40, 24))  # another resolution, laid out on the fly
    model.train()
    model(x).sum().backward()
    model(torch.randn(1, 3, 40, 24)).sum().backward()
    assert model.stages[0].blocks[0].attn.qkv.weight.grad is not None


# ---- schedule -----------------------------------------------------------------------------------
def test_schedule_matches_the_official_execution_order() -> None:
    model = sret.create_model("sret_t")
    apps = model.stages[0].schedule.applications
    assert [(a.block, a.loop, a.groups, a.permute, a.nll) for a in apps] == [
        (0, 0, 8, False, 0),
        (0, 1, 2, True, 1),
        (1, 0, 8, False, 2),
        (1, 1, 2, True, 3),
    ]
    assert len(model.stages[1].blocks) == 5 and len(model.stages[1].nlls) == 10
    assert not any(a.permute for a in model.stages[1].schedule)  # groups2 = 1: no permutation


def test_drop_path_rates_follow_the_official_formula() -> None:
    model = sret.create_model("sret_t", drop_path_rate=0.2)
    # block r of stage s: rate * (offset_s + r) / 20, offsets 0, 4, 14
    assert model.stages[0].blocks[1].drop_path.drop_prob == pytest.approx(0.2 * 1 / 20)
    assert model.stages[1].blocks[3].drop_path.drop_prob == pytest.approx(0.2 * 7 / 20)
    assert model.stages[2].blocks[2].drop_path.drop_prob == pytest.approx(0.2 * 16 / 20)


def test_block_nll_sharing_keeps_one_nll_per_unique_block() -> None:
    model = SReT(replace(tiny_cfg(), nll="block"))
    assert [len(s.nlls) for s in model.stages] == [2, 1]
    assert SReT(replace(tiny_cfg(), nll="none")).stages[0].nlls.__len__() == 0


# ---- training behaviour -------------------------------------------------------------------------
def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = SReT(tiny_cfg()).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = SReT(tiny_cfg(shuffle="random")).train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # same random permutations in both passes
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


# ---- resolutions and configs --------------------------------------------------------------------
@pytest.mark.parametrize("size", [(100, 150), (33, 47), (224, 200)])
def test_odd_resolutions(size: tuple[int, int]) -> None:
    model = sret.create_model("sret_t", num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
        again = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all() and torch.isfinite(again).all()


def test_too_few_tokens_for_the_groups_is_a_clear_error() -> None:
    model = sret.create_model("sret_t").eval()
    with pytest.raises(ValueError, match="groups"):
        model(torch.randn(1, 3, 16, 16))  # 2x2 tokens in stage 0, sliced into 8 groups
    with pytest.raises(ValueError, match="stage 0 has 1 tokens at img_size 8"):
        sret.create_model("sret_t", img_size=8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(stages=(StageConfig(30, 4, blocks=1),)), "must divide"),
        (dict(stages=(StageConfig(32, 4, blocks=1, loops=0, groups=(), permute=()),)), "loops"),
        (dict(stages=(StageConfig(32, 4, blocks=0),)), "unique block"),
        (
            dict(stages=(StageConfig(32, 4, blocks=1, loops=2, groups=(1,), permute=(False,)),)),
            "one entry per loop",
        ),
        (dict(stages=(StageConfig(32, 4, blocks=1, groups=(0, 1)),)), "group counts"),
        (dict(stages=()), "at least one stage"),
        (dict(shuffle="sometimes"), "shuffle"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(stem_stride=3), "stem_stride must be 2, 4 or 8"),
    ],
)
def test_invalid_configs_raise_value_error(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SReT(replace(tiny_cfg(), **change))


@pytest.mark.parametrize(("stride", "grid"), [(8, 4), (4, 8), (2, 16)])
def test_conv_stem_stride_sets_the_first_stage_tokens(stride: int, grid: int) -> None:
    """At 32 px a stride-8 stem leaves 4x4 tokens; stride 4 and 2 keep the last one or two convs at
    stride 1 (8x8, 16x16). Inference through the kernels matches the plain modules."""
    from sret import kernels

    torch.manual_seed(0)
    model = sret.create_model("sret_nano", stem_stride=stride, num_classes=10).eval()
    convs = [model.patch_embed.conv1, model.patch_embed.conv2, model.patch_embed.conv3]
    assert [c.stride[0] for c in convs].count(2) == stride.bit_length() - 1
    assert model.pos_embed.shape[-2:] == (grid, grid) and model.cfg.stride == stride
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape[1] == 128
        fast = model(x)
        with kernels.disabled():
            plain = model(x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert count_macs(model, 32) > 0


def test_unknown_names_and_options_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        sret.create_model("sret_xxl")
    with pytest.raises(ValueError, match="unknown SReT options"):
        sret.create_model("sret_t", heads=3)
    with pytest.raises(ValueError, match="checkpoint_path"):
        sret.create_model("sret_t", pretrained=True)


def test_deit_style_naive_recursion_is_one_config_away() -> None:
    """Patch stem, one stage, no NLL, plain residuals: a DeiT-Tiny-like ViT whose blocks run twice."""
    cfg = SReTConfig(
        (StageConfig(192, 3, blocks=12, loops=2),),
        stem="patch",
        patch_size=16,
        nll="none",
        residual_coefficients=False,
        img_size=64,
        num_classes=10,
    )
    model = SReT(cfg).eval()
    assert sum(len(s.schedule) for s in model.stages) == 24 and len(model.pools) == 0
    assert not any("nlls" in n or "skip" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# ---- timm API and checkpoints -------------------------------------------------------------------
def test_timm_api() -> None:
    model = timm.create_model("sret_nano", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 128, 1, 1)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
        final, inter = model.forward_intermediates(x)
        assert [t.shape[1] for t in inter] == [32, 64, 128]
        torch.testing.assert_close(final, feats)
        assert len(model.forward_intermediates(x, indices=1, intermediates_only=True)) == 1
        _, normed = model.forward_intermediates(x, norm=True)
        expected = model.norm(inter[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(normed[-1], expected)  # the final norm, over channels
        torch.testing.assert_close(normed[0], inter[0])  # other stages have no norm of their width
        firsts = model.forward_intermediates(x, indices=[0, -2], stop_early=True, intermediates_only=True)
        assert [t.shape[1] for t in firsts] == [32, 64]
    assert model.no_weight_decay() == {"pos_embed"}
    model.reset_classifier(11)
    assert model(x).shape == (2, 11)
    features = timm.create_model("sret_nano", features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in features(x)] == features.feature_info.channels() == [64, 128]
    assert "sret_t" in timm.list_models("sret*")
    assert "sret_t.distill_in1k" in timm.list_models("sret_t*", include_tags=True)


def test_save_load_round_trip_is_identical(tmp_path: Path) -> None:
    model = sret.create_model("sret_nano", num_classes=4, shuffle="fixed").eval()
    path = tmp_path / "w.safetensors"
    sret.save_weights(model, path, "sret_nano", {"num_classes": 4, "shuffle": "fixed"})
    again = sret.create_model("sret_nano", checkpoint_path=path, num_classes=4, shuffle="fixed").eval()
    via_timm = timm.create_model(
        "sret_nano",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=4),
        num_classes=4,
        shuffle="fixed",
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
        assert torch.equal(model(x), via_timm(x))
    assert sret.checkpoint.read_metadata(path)["model_args"] == {"num_classes": 4, "shuffle": "fixed"}


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.nn.Linear(2, 2)}}, path)  # a pickled module object, not weights
    with pytest.raises(ValueError, match="cannot read"):
        sret.create_model("sret_nano", checkpoint_path=path)


def test_bad_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        sret.create_model("sret_nano", checkpoint_path=tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        sret.create_model("sret_nano", checkpoint_path=corrupt)
    other = tmp_path / "other.safetensors"
    sret.save_weights(sret.create_model("sret_t"), other)
    with pytest.raises(ValueError, match="does not fit"):
        sret.create_model("sret_nano", checkpoint_path=other)


def test_loading_into_a_new_class_count_keeps_a_fresh_head(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    source = sret.create_model("sret_nano")
    sret.save_weights(source, path)
    model = sret.create_model("sret_nano", checkpoint_path=path, num_classes=3)
    assert model.head.out_features == 3
    torch.testing.assert_close(model.pos_embed, source.pos_embed)


def test_the_config_table_and_timms_registry_name_the_same_models() -> None:
    """`list_models()` reads the config table; timm builds from the registered constructors: a table entry
    without a constructor, or a constructor without an entry, would be listed but not built (or
    built but not listed)."""
    assert sret.list_models() == sorted(timm.list_models(module="model"))


@pytest.mark.parametrize("shuffle", ["fixed", "random"])
def test_captures_as_one_graph_for_torch_compile(shuffle: str) -> None:
    """fullgraph=True: no graph break in eval or training (aot_eager checks the capture, including
    autograd, without the minutes of C++ code generation)."""
    torch.manual_seed(0)
    model = SReT(tiny_cfg(shuffle=shuffle))
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    model.train()
    compiled(x).sum().backward()
    assert model.stages[0].blocks[0].attn.qkv.weight.grad is not None


def test_group_matcher_supports_layer_decay() -> None:
    model = sret.create_model("sret_t")
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)
    scales = sorted({round(g["lr_scale"], 4) for g in optimizer.param_groups})
    assert scales == [round(0.75**k, 4) for k in (4, 3, 2, 1, 0)]  # stem, three stages, head
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


# ---- FX symbolic tracing (feature extraction and detection tooling) -----------------------------
@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_zoo_model_fx_traces_and_matches_eager(name: str) -> None:
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    size = 32 if name in ("sret_nano", "sret_deep_100", "sret_deep_1000") else 64  # small and quick
    model = timm.create_model(name, img_size=size, num_classes=7).eval()
    x = torch.randn(2, 3, size, size)
    _, nodes = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes=[nodes[-1], "stages.1"])
    with torch.no_grad():
        out = traced(x)
        logits = model(x)
        stage = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    torch.testing.assert_close(out[nodes[-1]], logits, rtol=0, atol=0)
    torch.testing.assert_close(out["stages.1"], stage, rtol=0, atol=0)


def test_fx_feature_extraction_through_timm() -> None:
    torch.manual_seed(0)
    fx = timm.create_model("sret_nano", features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    getter = timm.create_model("sret_nano", features_only=True).eval()  # the same weights
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(fx(x), getter(x), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
