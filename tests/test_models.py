"""Generator UNet, discriminator and blocks: shapes, save/load, config checks, conditioning."""

from __future__ import annotations

import json

import pytest
import torch

from cclddg.errors import UserError
from cclddg.models import Discriminator, UNet, count_parameters, seed_ch_mults
from cclddg.models.blocks import (
    GEMM_MIN_WEIGHTS,
    Conv2d,
    ResBlock,
    SelfAttention,
    StepEmbedding,
)

SMALL = dict(n_channels=8, ch_mults=(1, 2), is_attn=(False, True), n_blocks=1, norm_groups=4, attn_heads=2)


def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised parameters random values, so conditioning paths are live."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, std)
    return model


def unet(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**SMALL, "z_dim": 4, "n_z_channels": 8, "cond_dim": 6, "n_cond_channels": 8, **kw})


def disc(**kw) -> Discriminator:
    torch.manual_seed(0)
    return Discriminator(**{**SMALL, "cond_dim": 6, "n_cond_channels": 8, **kw})


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "kw",
    [
        dict(ch_mults=(1,), is_attn=(False,), mid_attn=False),
        dict(ch_mults=(1, 2), is_attn=(True, False), injection="add", image_channels=4),
        dict(ch_mults=(1, 2, 2), is_attn=(False, False, False), n_blocks=2, z_dim=0),
        dict(ch_mults=(1, 1, 2, 2), is_attn=(False, True, False, True), cond_dim=0, image_channels=4),
        dict(ch_mults=(1, 2, 2, 2), is_attn=(False,) * 4, z_dim=0, cond_dim=0, injection="add"),
    ],
)
def test_unet_shapes(kw):
    m = unet(**kw)
    ic = m.config.image_channels
    x = torch.randn(2, ic, 16, 16)
    c = torch.randn(2, 6) if m.config.cond_dim else None
    z = torch.randn(2, 4) if m.config.z_dim else None
    assert m(x, torch.tensor([1, 3]), c, z).shape == x.shape
    # non-square works too
    x = torch.randn(2, ic, 16, 24)
    assert m(x, 2, c, z).shape == x.shape


@pytest.mark.parametrize(
    "kw",
    [
        dict(ch_mults=(1,), is_attn=(False,)),
        dict(ch_mults=(1, 2), is_attn=(False, True), injection="add", image_channels=4),
        dict(ch_mults=(1, 2, 2), is_attn=(False,) * 3, n_blocks=2, cond_dim=0),
        dict(ch_mults=(1, 1, 2, 2), is_attn=(False, False, False, True), image_channels=4),
    ],
)
def test_discriminator_shapes(kw):
    d = disc(**kw)
    x = torch.randn(3, d.config.image_channels, 16, 16)
    c = torch.randn(3, 6) if d.config.cond_dim else None
    assert d(x, x, torch.tensor([1, 2, 3]), c).shape == (3,)


def test_step_argument_forms():
    m = perturb(unet())
    x, c, z = torch.randn(2, 3, 8, 8), torch.randn(2, 6), torch.randn(2, 4)
    ref = m(x, torch.tensor([2, 2]), c, z)
    torch.testing.assert_close(m(x, 2, c, z), ref)
    torch.testing.assert_close(m(x, torch.tensor(2), c, z), ref)
    assert not torch.allclose(m(x, 3, c, z), ref)


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    m = perturb(unet(ch_mults=(1, 2, 2), is_attn=(False, False, True), sample_size=16)).eval()
    d = perturb(disc()).eval()
    m.save_pretrained(tmp_path / "g")
    d.save_pretrained(tmp_path / "d")
    for sub in ("g", "d"):
        files = sorted(p.name for p in (tmp_path / sub).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors"], files
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["ch_mults"] == [1, 2, 2] and cfg["_class_name"] == "UNet"

    m2 = UNet.from_pretrained(tmp_path / "g")
    d2 = Discriminator.from_pretrained(tmp_path / "d")
    x, c, z, t = torch.randn(2, 3, 16, 16), torch.randn(2, 6), torch.randn(2, 4), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(m(x, t, c, z), m2(x, t, c, z))
        assert torch.equal(d(x, x, t, c), d2(x, x, t, c))
    assert count_parameters(m) == count_parameters(m2)


# ---------------------------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "kw, knob",
    [
        (dict(is_attn=(False, False, True)), "is_attn"),
        (dict(n_channels=10, norm_groups=4), "norm_groups"),
        (dict(injection="film"), "injection"),
        (dict(ch_mults=(1, 2, 2), is_attn=(False,) * 3, sample_size=30), "sample_size"),
        (dict(n_channels=0), "n_channels"),
        (dict(n_blocks=-1), "n_blocks"),
        (dict(z_dim=-2), "z_dim"),
        (dict(cond_dim=2.5), "cond_dim"),
        (dict(ch_mults=()), "ch_mults"),
        (dict(ch_mults=(1, 0), is_attn=(False, False)), "ch_mults"),
        (dict(attn_heads=3), "attn_heads"),
        (dict(dropout=1.5), "dropout"),
        (dict(denom_factor=0.5), "denom_factor"),
        (dict(image_channels=0), "image_channels"),
        (dict(n_time_channels=0), "n_time_channels"),
    ],
)
def test_invalid_config_raises(kw, knob):
    with pytest.raises(UserError, match=knob) as e:
        unet(**kw)
    assert "\n" not in str(e.value)
    if knob != "z_dim":
        with pytest.raises(UserError, match=knob):
            disc(**kw)


@pytest.mark.parametrize(
    "args, msg",
    [
        (lambda: (torch.randn(2, 3, 8, 8), 1, torch.randn(2, 512), None), "c has .*512 features.*cond_dim=6"),
        (lambda: (torch.randn(2, 3, 8, 8), 1, None, torch.randn(2, 5)), "z has .*5 features.*z_dim=4"),
        (lambda: (torch.randn(2, 4, 8, 8), 1, None, None), "4 channels.*image_channels=3"),
        (lambda: (torch.randn(2, 3, 9, 8), 1, None, None), "divisible by 2"),
        (lambda: (torch.randn(3, 8, 8), 1, None, None), "4-D"),
        (lambda: (torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]), None, None), "t has shape"),
        (lambda: (torch.randn(2, 3, 8, 8), 1, torch.randn(3, 6), None), "batch size"),
    ],
)
def test_unet_forward_errors(args, msg):
    """A wrong tensor is the caller's mistake: a ValueError with its traceback, not a user's one line."""
    with pytest.raises(ValueError, match=msg):
        unet()(*args())


def test_forward_errors_when_conditioning_is_off():
    with pytest.raises(ValueError, match="z_dim=0"):
        unet(z_dim=0)(torch.randn(1, 3, 8, 8), 1, None, torch.randn(1, 4))
    with pytest.raises(ValueError, match="cond_dim=0"):
        disc(cond_dim=0)(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), 1, torch.randn(1, 6))
    with pytest.raises(ValueError, match="x_t"):
        disc()(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16), 1)


def test_seed_ch_mults():
    assert seed_ch_mults((1, 2, 2, 4)) == (1, 2, 4, 16)
    assert seed_ch_mults([1, 2, 2, 2]) == (1, 2, 4, 8)
    with pytest.raises(UserError):
        seed_ch_mults((1, 0))


# ---------------------------------------------------------------------------------------------- conditioning


def test_null_conditioning_matches_zeros():
    m = perturb(unet())
    d = perturb(disc())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    torch.testing.assert_close(m(x, t), m(x, t, torch.zeros(2, 6), torch.zeros(2, 4)))
    torch.testing.assert_close(d(x, x, t), d(x, x, t, torch.zeros(2, 6)))


@pytest.mark.parametrize("injection", ["adagn", "add"])
def test_z_changes_unet_output(injection):
    m = perturb(unet(injection=injection))
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2, 6)
    a = m(x, 1, c, torch.randn(2, 4))
    b = m(x, 1, c, torch.randn(2, 4))
    assert (a - b).abs().mean() > 1e-4


def test_fresh_unet_learns_to_use_z():
    """Zero-init is not a dead end: a few optimizer steps from init make z matter."""
    m = unet()
    x, z1, z2 = torch.randn(2, 3, 8, 8), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(m(x, 1, None, z1), m(x, 1, None, z2))  # blocks start as identity
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (m(x, 1, None, z1) - x).pow(2).mean() + (m(x, 1, None, z2) + x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m(x, 1, None, z1) - m(x, 1, None, z2)).abs().mean() > 1e-4


def test_c_changes_discriminator_logits():
    d = perturb(disc())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    c1, c2 = torch.randn(2, 6), torch.randn(2, 6)
    assert (d(x, x, t, c1) - d(x, x, t, c2)).abs().min() > 1e-5
    # the projection term alone already depends on c
    with torch.no_grad():
        d.cond_emb[2].weight.zero_()
        d.cond_emb[2].bias.zero_()
    assert (d(x, x, t, c1) - d(x, x, t, c2)).abs().min() > 1e-5


@pytest.mark.parametrize("injection", ["adagn", "add"])
def test_gradients_reach_every_parameter(injection):
    kw = dict(ch_mults=(1, 2), is_attn=(True, True), injection=injection)
    for model, args in [
        (perturb(unet(**kw)), lambda x: (x, torch.tensor([1, 2]), torch.randn(2, 6), torch.randn(2, 4))),
        (perturb(disc(**kw)), lambda x: (x, torch.randn_like(x), torch.tensor([1, 2]), torch.randn(2, 6))),
    ]:
        out = model(*args(torch.randn(2, 3, 8, 8)))
        out.pow(2).mean().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not dead, f"{type(model).__name__}: no gradient for {dead}"


def test_bf16_forward():
    m = perturb(unet()).to(torch.bfloat16)
    d = perturb(disc()).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    y = m(x, 2, torch.randn(2, 6), None)  # float32 c is cast to x's dtype
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    logits = d(x, x, 2, None)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- blocks


def test_blocks_start_as_identity():
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 5)
    for injection in ("adagn", "add"):
        torch.testing.assert_close(ResBlock(8, 8, 5, injection, groups=4)(x, emb), x)
    torch.testing.assert_close(SelfAttention(8, 2, groups=4)(x), x)
    assert ResBlock(8, 16, 5, groups=4)(x, emb).shape == (2, 16, 4, 4)


def test_step_features_distinct_for_few_steps():
    feats = StepEmbedding(64, 16.0).features(torch.arange(1, 9))
    dists = torch.cdist(feats, feats) + torch.eye(8) * 1e3
    assert dists.min() > 0.5


def test_count_parameters():
    m = unet()
    n = count_parameters(m)
    assert n == sum(p.numel() for p in m.parameters()) > 0
    m.conv_in.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == n - sum(p.numel() for p in m.conv_in.parameters())


def test_coord_channels_break_translation_equivariance():
    """With coordinate channels a constant input gives position-dependent features; without, it cannot
    (away from the zero-padded border), which is why position conditioning learns slowly without them."""
    from cclddg.models.blocks import append_coords

    x = torch.zeros(2, 3, 16, 16)
    with_coords = append_coords(x)
    assert with_coords.shape == (2, 5, 16, 16)
    assert torch.equal(with_coords[:, 3, 0, :], torch.linspace(-1, 1, 16).expand(2, 16))
    assert torch.equal(with_coords[:, 4, :, 0], torch.linspace(-1, 1, 16).expand(2, 16))
    torch.manual_seed(0)
    for coords in (False, True):
        unet = UNet(n_channels=16, ch_mults=(1, 2), is_attn=(False, False), n_blocks=1, z_dim=0,
                    coord_channels=coords, mid_attn=False)
        out = unet.conv_in(append_coords(x) if coords else x)
        interior = out[0, :, 2:-2, 2:-2]
        spread = (interior - interior.mean(dim=(1, 2), keepdim=True)).abs().max().item()
        assert (spread > 1e-3) == coords
        disc = Discriminator(n_channels=16, ch_mults=(1, 2), is_attn=(False, False), coord_channels=coords)
        assert disc.conv_in.in_channels == 6 + (2 if coords else 0)
        assert disc(x, x, torch.ones(2, dtype=torch.long)).shape == (2,)


def test_spatial_conditioning_map_starts_off_and_lets_the_condition_say_where():
    torch.manual_seed(0)
    kw = dict(n_channels=16, ch_mults=(1, 2), is_attn=(False, False), n_blocks=1, z_dim=0, cond_dim=4,
              mid_attn=False)
    plain, mapped = UNet(**kw), UNet(**kw, cond_map_size=8)
    mapped.load_state_dict(plain.state_dict(), strict=False)
    x, t, c = torch.randn(2, 3, 16, 16), torch.ones(2, dtype=torch.long), torch.eye(4)[:2]
    assert torch.equal(plain(x, t, c), mapped(x, t, c))  # zero-initialised: identical at the start
    with torch.no_grad():
        mapped.cond_map.proj.weight.normal_()
    m = mapped.cond_map(mapped.embed(t, c, None), (8, 8))
    assert m.shape == (2, 32, 8, 8)
    assert not torch.allclose(m[0], m[1])  # different conditions give different spatial maps
    assert mapped.cond_map(mapped.embed(t, c, None), (4, 4)).shape == (2, 32, 4, 4)  # any bottleneck size
    with pytest.raises(UserError, match="cond_map_size"):
        UNet(**kw, cond_map_size=-1)


def test_cond_scale_multiplies_the_conditioning_and_keeps_the_null():
    torch.manual_seed(0)
    plain, scaled = perturb(unet()), unet(cond_scale=4.0)
    scaled.load_state_dict(plain.state_dict())
    d_plain, d_scaled = perturb(disc()), disc(cond_scale=4.0)
    d_scaled.load_state_dict(d_plain.state_dict())
    x, t, c, z = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.randn(2, 6), torch.randn(2, 4)
    torch.testing.assert_close(scaled(x, t, c, z), plain(x, t, 4 * c, z))
    torch.testing.assert_close(d_scaled(x, x, t, c), d_plain(x, x, t, 4 * c))
    torch.testing.assert_close(scaled(x, t, None, z), plain(x, t, None, z))  # null stays zeros
    with pytest.raises(UserError, match="cond_scale"):
        unet(cond_scale=0.0)


@pytest.mark.parametrize("is_attn", [(False, False, True), (True, True, True)])
def test_r1_goes_through_attention_even_at_a_1x1_feature_map(is_attn):
    """R1 differentiates D's input gradient; the fused attention kernels cannot be differentiated twice, so the
    forward pass R1 needs runs attention through the math kernel (the same values)."""
    from cclddg.objectives import ddgan

    torch.manual_seed(0)
    disc = Discriminator(image_channels=4, n_channels=8, ch_mults=(1, 2, 2), is_attn=is_attn, n_blocks=1,
                         cond_dim=0, sample_size=4)  # 4x4 latents: the last level is 1x1
    for module in disc.modules():
        if isinstance(module, SelfAttention):
            torch.nn.init.normal_(module.out.weight, std=0.5)  # the attention's output is zero at init
    x, x_t, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    loss, logs = ddgan.discriminator_loss(disc, x, x.flip(0), x_t, t, None, r1_weight=1.0)
    loss.backward()
    assert logs["r1"] > 0
    attention = [m for m in disc.modules() if isinstance(m, SelfAttention)]
    assert attention and all(m.qkv.weight.grad.abs().sum() > 0 for m in attention)
    _, fused = ddgan.discriminator_loss(disc, x, x.flip(0), x_t, t, None, r1_weight=0.0)
    assert abs(logs["d_real"] - fused["d_real"]) < 1e-6  # the math kernel gives the fused one's values


# The seed's networks at its README's command (128 px through KL-f8: 4x16x16 latents, 512-d CLOOB embeddings,
# --z_dim 16 --n_channels_unet 64 --n_steps 8), counted from the seed's own code (johnowhitaker/cclddg, core.py):
# parameters, and forward FLOPs of one example (torch.utils.flop_counter: 2 per multiply-accumulate).
SEED_GENERATOR = (171_395_684, 2_001_462_272)
SEED_DISCRIMINATOR = (22_540_353, 226_583_552)


def test_the_seed_preset_builds_the_seeds_networks_within_2_percent():
    from dataclasses import replace

    from torch.utils.flop_counter import FlopCounterMode

    from cclddg.run_config import resolve
    from cclddg.training.trainer import build_nets

    cfg = replace(resolve("seed", {"z_dim": 16, "n_channels_unet": 64, "n_steps": 8, "img_size": 128}),
                  latent_channels=4, latent_factor=8, cond="embedding")

    def measure(net, *inputs) -> tuple[int, int]:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(*inputs)
        return count_parameters(net), counter.get_total_flops()

    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 512)
    gen, disc = build_nets(cfg, 512)
    generator = measure(gen, x, t, c, torch.randn(1, 16))
    discriminator = measure(disc, x, x, t, c)
    for ours, seed in ((generator, SEED_GENERATOR), (discriminator, SEED_DISCRIMINATOR)):
        assert abs(ours[0] / seed[0] - 1) < 0.02 and abs(ours[1] / seed[1] - 1) < 0.02, (ours, seed)


@pytest.mark.parametrize("kernel", [1, 3])
def test_wide_convolutions_over_tiny_maps_run_as_one_matrix_product_with_the_same_results(kernel):
    """blocks.Conv2d: the seed's 2x2 bottleneck convolutions computed as im2col + one matmul give nn.Conv2d's
    outputs and gradients (also second order, for R1), and anything else takes nn.Conv2d's own path."""
    torch.manual_seed(0)
    channels = 400 if kernel == 3 else 1024  # at least GEMM_MIN_WEIGHTS weights
    conv = Conv2d(channels, channels, kernel, padding=kernel // 2)
    assert conv.weight.numel() >= GEMM_MIN_WEIGHTS
    x = torch.randn(3, channels, 2, 2, requires_grad=True)
    assert conv._as_matrix_product(x)
    ours = conv(x)
    reference = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=kernel // 2)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(ours)
    (gx, gw) = torch.autograd.grad((ours * upstream).sum(), (x, conv.weight), create_graph=True)
    (rx, rw) = torch.autograd.grad((reference * upstream).sum(), (x, conv.weight), create_graph=True)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)
    (hw,) = torch.autograd.grad(gx.pow(2).sum(), conv.weight)  # R1's gradient of the input gradient
    (rhw,) = torch.autograd.grad(rx.pow(2).sum(), conv.weight)
    torch.testing.assert_close(hw, rhw, atol=1e-3, rtol=1e-4)
    assert not conv._as_matrix_product(torch.randn(1, channels, 4, 4))  # a larger map: oneDNN's path
    assert not Conv2d(8, 8, kernel, padding=kernel // 2)._as_matrix_product(torch.randn(1, 8, 2, 2))  # few weights
