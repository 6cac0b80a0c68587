from __future__ import annotations

import dataclasses

import pytest
import torch

from latentforge.training.attention import Attention, apply_rope, rope_split, rope_tables
from latentforge.training.dit import DiT, DiT_archs, DiT_models, DiTConfig, build_dit, count_params

CFG = DiTConfig(hidden=64, depth=2, heads=4, visual_channels=4, audio_channels=8, text_dim=32, max_text_len=8)


def make_model(perturb: bool = True, **overrides) -> DiT:
    """A tiny DiT; perturbed so the zero-initialised gates and final layer no longer hide the inputs."""
    torch.manual_seed(0)
    model = DiT(dataclasses.replace(CFG, **overrides))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def make_text(batch: int, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randn(batch, length, CFG.text_dim)
    mask = torch.arange(length)[None].expand(batch, -1) < torch.tensor([length, 3])[:batch, None]
    return text, mask


CASES = [
    ("image", 0, (2, 4, 1, 8, 8)),
    ("image-wide", 0, (2, 4, 1, 4, 12)),
    ("video", 1, (2, 4, 4, 8, 6)),
    ("audio", 2, (2, 8, 10, 1, 1)),
]


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
@pytest.mark.parametrize("name,modality,shape", CASES, ids=[c[0] for c in CASES])
def test_output_shape_matches_input(name: str, modality: int, shape: tuple[int, ...], pos_embed: str) -> None:
    model = make_model(pos_embed=pos_embed)
    x = torch.randn(shape)
    out = model(x, torch.rand(2), *make_text(2), torch.full((2,), modality))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,modality,shape", CASES, ids=[c[0] for c in CASES])
def test_initial_output_is_zero(name: str, modality: int, shape: tuple[int, ...]) -> None:
    model = make_model(perturb=False)
    out = model(torch.randn(shape), torch.rand(2), *make_text(2), torch.full((2,), modality))
    assert torch.count_nonzero(out) == 0


def test_gradients_reach_every_visual_param() -> None:
    model = make_model()
    out = model(torch.randn(2, 4, 2, 8, 8), torch.rand(2), *make_text(2), torch.tensor([1, 1]))
    out.square().mean().backward()
    unused = ("audio.", "null_text_embed")
    missing = [
        name
        for name, p in model.named_parameters()
        if not name.startswith(unused) and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert missing == []


def test_masked_text_tokens_do_not_change_output() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text, mask = make_text(2)
    changed = torch.where(mask[..., None], text, torch.randn_like(text) * 10)
    assert not torch.equal(changed, text)
    torch.testing.assert_close(model(x, t, changed, mask, modality), model(x, t, text, mask, modality))


def test_real_text_tokens_change_output() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text, mask = make_text(2)
    assert not torch.allclose(model(x, t, text, mask, modality), model(x, t, text + 1, mask, modality))


def test_empty_text_row_attends_to_null_caption() -> None:
    model = make_model()
    x, t, modality = torch.randn(2, 4, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long)
    text = torch.randn(2, 5, CFG.text_dim)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    null, null_mask = model.null_text(2)
    out = model(x, t, text, empty, modality)
    torch.testing.assert_close(out, model(x, t, null, null_mask, modality))


def test_mixed_audio_and_visual_batch_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="mix"):
        model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), *make_text(2), torch.tensor([0, 2]))


def test_modality_ids_contradicting_the_latent_shape_are_refused() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"ids say audio but latents of shape \(2, 4, 1, 8, 8\) are image/video"):
        model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), *make_text(2), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="ids say image/video"):
        model(torch.randn(2, 8, 10, 1, 1), torch.rand(2), *make_text(2), torch.tensor([0, 0]))


def test_equal_channel_counts_and_unit_patches_let_the_ids_choose_the_family() -> None:
    model = make_model(audio_channels=4, visual_patch=1)
    x, t, text = torch.randn(2, 4, 3, 1, 1), torch.rand(2), make_text(2)
    audio, image = model(x, t, *text, torch.tensor([2, 2])), model(x, t, *text, torch.tensor([0, 0]))
    assert model.family(x, torch.tensor([2, 2])) is model.audio and model.family(x, torch.tensor([0, 0])) is model.visual
    assert not torch.allclose(audio, image)


@pytest.mark.parametrize("name,modality,shape", CASES, ids=[c[0] for c in CASES])
def test_torch_compile_traces_each_family_without_a_graph_break(name: str, modality: int, shape: tuple) -> None:
    """The family comes from the latent's shape: reading the modality ids on the host (`.item()`) broke the
    compiled graph once per step and made every step wait for the device."""
    model = make_model()
    x = torch.randn(shape)
    explained = torch._dynamo.explain(model)(x, torch.rand(2), *make_text(2), torch.full((2,), modality))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_blocks_share_one_graph_and_match_the_eager_model(checkpointing: bool) -> None:
    """`compile_blocks` (training's `compile: true`): every block runs one traced graph (DiT-XL compiled whole ran
    past four minutes before its first step on an H100), parameter names stay those of the eager model (so
    checkpoints load either way), and outputs and gradients match eager ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = make_model(depth=3, mixer_depth=1, grad_checkpointing=checkpointing), make_model(
        depth=3, mixer_depth=1, grad_checkpointing=checkpointing)
    compiled.compile_blocks(backend="aot_eager", fullgraph=True)  # no C++ build here; same tracing as inductor
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x, t, text = torch.randn(2, 4, 1, 8, 8), torch.rand(2), make_text(2)
    outputs = [m(x, t, *text, torch.tensor([0, 0])) for m in (eager, compiled)]
    for out in outputs:
        out.square().mean().backward()
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name  # the audio family's parameters get none here
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-5), name
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert all(block._compiled_call_impl is not None for block in [*compiled.mixer, *compiled.blocks])


def test_latent_that_does_not_fit_the_patch_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(2, 4, 1, 7, 8), torch.rand(2), *make_text(2), torch.tensor([0, 0]))


def test_text_longer_than_max_is_rejected() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="max_text_len"):
        model(torch.randn(2, 4, 1, 8, 8), torch.rand(2), *make_text(2, length=9), torch.tensor([0, 0]))


def test_presets_grow_in_size() -> None:
    with torch.device("meta"):
        counts = [count_params(build_dit(name)) for name in DiT_models]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert build_dit("DiT-T").cfg.hidden == 128 and build_dit("DiT-T").cfg.depth == 4


def test_preset_overrides() -> None:
    model = build_dit("DiT-T", depth=2, visual_channels=16)
    assert model.cfg.depth == 2 and model.cfg.visual_channels == 16 and len(model.blocks) == 2
    with pytest.raises(ValueError, match="not_a_field"):
        build_dit("DiT-T", not_a_field=1)
    with pytest.raises(ValueError, match="DiT-Q"):
        build_dit("DiT-Q")


def test_config_round_trip_and_unknown_key() -> None:
    assert DiTConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="hiden"):
        DiTConfig.from_dict({"hiden": 64})
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(hidden=65, heads=4)


def test_new_config_fields_round_trip_and_validate() -> None:
    cfg = dataclasses.replace(
        CFG, pos_embed="sincos", qk_norm=False, grad_checkpointing=True, mixer_depth=1, repa_depth=1, repa_dim=16
    )
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    assert CFG.pos_embed == "rope" and CFG.qk_norm and not CFG.grad_checkpointing
    bad = [
        ({"pos_embed": "alibi"}, "pos_embed"),
        ({"mixer_depth": -1}, "mixer_depth"),
        ({"repa_depth": 1}, "together"),
        ({"repa_dim": 8}, "together"),
        ({"repa_depth": 3, "repa_dim": 8}, "exceeds depth"),
        ({"qk_norm": 1}, "qk_norm"),
    ]
    for fields, match in bad:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(CFG, **fields)


#################################################################################
#                                  Positions                                    #
#################################################################################


def test_rope_head_dim_split_and_validation() -> None:
    assert rope_split(16) == (8, 4, 4) and rope_split(64) == (24, 20, 20) and rope_split(72) == (24, 24, 24)
    for arch in DiT_archs.values():  # every preset's head_dim splits
        assert DiTConfig.from_dict(arch).pos_embed == "rope"
    with pytest.raises(ValueError, match="even head_dim"):
        DiTConfig(hidden=60, heads=4)  # head_dim 15
    with pytest.raises(ValueError, match="even head_dim"):
        DiTConfig(hidden=64, heads=16)  # head_dim 4: no pair left for every axis
    assert DiTConfig(hidden=60, heads=4, pos_embed="sincos").hidden == 60


@pytest.mark.parametrize("grid", [(1, 4, 6), (3, 4, 2), (10, 1, 1)], ids=["image", "video", "audio"])
def test_rope_tables_shape_cache_and_unrotated_axes(grid: tuple[int, int, int]) -> None:
    cos, sin = rope_tables(16, grid, torch.device("cpu"))
    n = grid[0] * grid[1] * grid[2]
    assert cos.shape == sin.shape == (n, 8) and cos.dtype == torch.float32
    assert rope_tables(16, grid, torch.device("cpu"))[0] is cos  # cached per grid and device
    d_t, d_h, _ = (d // 2 for d in rope_split(16))  # channel pairs per axis
    for axis, (lo, hi) in enumerate([(0, d_t), (d_t, d_t + d_h), (d_t + d_h, 8)]):
        if grid[axis] == 1:  # an axis of length 1 (images: t; audio: h, w) is not rotated
            assert torch.equal(cos[:, lo:hi], torch.ones(n, hi - lo)) and sin[:, lo:hi].abs().max() == 0


def rotated_scores(grid: tuple[int, int, int], head_dim: int = 24) -> torch.Tensor:
    """Scores (N, N) between rotated copies of one q and one k vector placed at every grid position."""
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1] * grid[2]
    q, k = (torch.randn(head_dim, generator=g).expand(1, 1, n, head_dim) for _ in range(2))
    cos, sin = rope_tables(head_dim, grid, torch.device("cpu"))
    return (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2))[0, 0]


def test_rope_scores_depend_only_on_offset_1d() -> None:
    scores = rotated_scores((12, 1, 1))
    for offset in range(-11, 12):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)
    assert torch.diagonal(scores, 0)[0] != torch.diagonal(scores, 1)[0]  # but it does depend on the offset


def test_rope_scores_depend_only_on_offset_3d() -> None:
    grid = (3, 4, 5)
    scores = rotated_scores(grid)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    offsets = pos[:, None] - pos[None]  # (N, N, 3)
    keys = (offsets[..., 0] * 100 + offsets[..., 1] * 10 + offsets[..., 2]).flatten()
    values = scores.flatten()
    for key in keys.unique():
        same = values[keys == key]
        torch.testing.assert_close(same, same[:1].expand_as(same), atol=1e-5, rtol=1e-5)
    assert len(keys.unique()) == 5 * 7 * 9
    by_axis = [values[keys == key][0] for key in (0, 100, 10, 1)]  # no offset, then one step along t, h, w
    assert len({round(v.item(), 4) for v in by_axis}) == 4  # every axis moves the score


def test_rope_attention_ignores_where_a_crop_sits_in_the_grid() -> None:
    """Self-attention with rope on a crop of a big grid equals it on the crop's own small grid."""
    torch.manual_seed(0)
    attn = Attention(64, 4, qk_norm=True)
    x = torch.randn(2, 3 * 4 * 4, 64)
    big = rope_tables(16, (5, 6, 7), torch.device("cpu"))
    crop = [table.view(5, 6, 7, -1)[1:4, 2:6, 3:7].reshape(48, -1) for table in big]
    small = rope_tables(16, (3, 4, 4), torch.device("cpu"))
    torch.testing.assert_close(attn(x, rope=tuple(crop)), attn(x, rope=small), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(attn(x, rope=small), attn(x))


def test_rope_model_runs_on_every_bucket_and_differs_from_sincos() -> None:
    rope, sincos = make_model(), make_model(pos_embed="sincos")
    sincos.load_state_dict(rope.state_dict())  # positions carry no weights: the same parameters fit both
    for modality, shape in [
        (0, (2, 4, 1, 8, 8)),
        (0, (2, 4, 1, 12, 4)),
        (1, (2, 4, 3, 6, 10)),
        (2, (2, 8, 7, 1, 1)),
        (2, (2, 8, 16, 1, 1)),
    ]:
        args = (torch.randn(shape), torch.rand(2), *make_text(2), torch.full((2,), modality))
        out = rope(*args)
        assert out.shape == shape and torch.isfinite(out).all()
        assert not torch.allclose(out, sincos(*args))


def test_rope_tables_made_in_inference_mode_serve_training() -> None:
    model = make_model()
    args = (torch.randn(2, 4, 1, 6, 14), torch.rand(2), *make_text(2), torch.zeros(2, dtype=torch.long))
    rope_tables.cache_clear()
    with torch.inference_mode():
        model(*args)
    model(*args).square().mean().backward()  # would raise if the cached tables were inference tensors


#################################################################################
#                          QK-norm, checkpointing, REPA                         #
#################################################################################


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k(qk_norm: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(64, 4, qk_norm=qk_norm)
    x, ctx = torch.randn(2, 10, 64), torch.randn(2, 5, 64)
    before = attn(x, ctx)
    with torch.no_grad():
        attn.q.weight.mul_(8), attn.q.bias.mul_(8)
        attn.kv.weight[:64].mul_(8), attn.kv.bias[:64].mul_(8)  # the k half of kv
    assert torch.allclose(attn(x, ctx), before, atol=1e-4) == qk_norm
    norms = [m for m in make_model(qk_norm=qk_norm).modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == (2 * 2 * CFG.depth if qk_norm else 0)  # q and k, self and cross, every block


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    plain = make_model(mixer_depth=1)
    ckpt = make_model(mixer_depth=1, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    args = (torch.randn(2, 4, 2, 8, 8), torch.rand(2), *make_text(2), torch.ones(2, dtype=torch.long))
    for model in (plain, ckpt):
        model(*args).square().mean().backward()
    assert len(calls) == 2  # the block ran again in backward: checkpointing is really on
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_forward_with_features_shapes_and_requires_repa() -> None:
    model = make_model(repa_depth=1, repa_dim=24)
    args = (torch.randn(2, 4, 2, 8, 6), torch.rand(2), *make_text(2), torch.ones(2, dtype=torch.long))
    v, feats = model.forward_with_features(*args)
    assert feats.shape == (2, 2 * 4 * 3, 24)
    torch.testing.assert_close(v, model(*args))
    with pytest.raises(ValueError, match="repa"):
        make_model().forward_with_features(*args)


def test_qk_norm_under_bf16_autocast_keeps_the_fused_kernel_and_the_values() -> None:
    """QKNorm casts its float32 weight to the input's dtype: torch's fused RMSNorm refuses mixed dtypes and warns
    before falling back to unfused kernels (21% of an XL/2 step on an H100, BENCHMARKS.md)."""
    import warnings

    from latentforge.training.attention import QKNorm

    torch.manual_seed(0)
    norm = QKNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.mul_(torch.linspace(0.5, 2.0, 16))
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    reference.load_state_dict(norm.state_dict())  # same parameter name and shape: checkpoints load
    x = torch.randn(4, 8, 16)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mixed-dtype fallback announces itself with a UserWarning
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference(x), atol=0.05, rtol=0.02)
    with pytest.warns(UserWarning, match="Mismatch dtype"):  # what the plain RMSNorm does, so the check can fail
        reference(x.bfloat16())
