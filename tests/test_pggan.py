import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import pggan
from biomedsynth.gan.ema import EMA, beta as ema_beta, half_life_for, phase_shares


def small(resolution, channels=1, n_classes=0):
    kw = dict(n_classes=n_classes, fmap_base=256, fmap_max=16)
    return pggan.Generator(resolution, channels, 8, **kw), pggan.Discriminator(resolution, channels, **kw)


def test_equalised_lr_runtime_weight():
    torch.manual_seed(0)
    conv, lin = pggan.EqConv2d(6, 5, 3), pggan.EqLinear(7, 4)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * math.sqrt(2 / 54), conv.bias, padding=1))
    v = torch.randn(3, 7)
    torch.testing.assert_close(lin(v), F.linear(v, lin.weight * math.sqrt(2 / 7), lin.bias))
    to_rgb = pggan.EqConv2d(32, 3, 1, gain=1.0)  # configurable gain: toRGB uses 1
    y = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(to_rgb(y), F.conv2d(y, to_rgb.weight / math.sqrt(32), to_rgb.bias))
    big = pggan.EqConv2d(64, 64, 3)
    assert abs(big.weight.std().item() - 1.0) < 0.02 and big.bias.abs().sum() == 0  # stored N(0, 1), zero bias


def test_pixel_norm_unit_rms():
    x = torch.randn(3, 10, 4, 4) * torch.linspace(0.1, 50, 16).view(1, 1, 4, 4)
    rms = pggan.pixel_norm(x).square().mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones(3, 4, 4))


def test_minibatch_stddev_known_values():
    # sample i holds the constant i; groups are strided {0, 2, 4, 6} and {1, 3, 5, 7}: offsets -3, -1, 1, 3
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 2, 3, 3)
    y = pggan.minibatch_stddev(x)
    assert y.shape == (8, 3, 3, 3) and torch.equal(y[:, :2], x)
    torch.testing.assert_close(y[:, 2], torch.full((8, 3, 3), math.sqrt(5.0)))
    # a random input against an explicit per-group loop
    x = torch.randn(8, 3, 2, 2)
    y = pggan.minibatch_stddev(x)
    for i in range(8):
        group = x[i % 2::2]
        expected = group.var(0, unbiased=False).add(1e-8).sqrt().mean()
        torch.testing.assert_close(y[i, 3], torch.full((2, 2), expected.item()))
    with pytest.raises(ValueError, match="multiple of the group size"):
        pggan.minibatch_stddev(torch.randn(6, 2, 4, 4))


@pytest.mark.parametrize("depth", [1, 3])
def test_generator_fade_in(depth):
    torch.manual_seed(0)
    G, _ = small(32, 3, n_classes=2)
    z, y = torch.randn(4, 8), torch.tensor([0, 1, 1, 0])
    previous = G(z, y, depth - 1, 1.0)
    old = F.interpolate(previous, scale_factor=2, mode="nearest")
    torch.testing.assert_close(G(z, y, depth, 0.0), old, rtol=0, atol=0)
    new = G(z, y, depth, 1.0)
    torch.testing.assert_close(new, G.to_rgb[depth](G.features(z, y, depth)), rtol=0, atol=0)
    torch.testing.assert_close(G(z, y, depth, 0.25), 0.75 * old + 0.25 * new)
    with torch.no_grad():  # the old toRGB no longer matters at alpha 1
        G.to_rgb[depth - 1].weight.mul_(3.0)
    torch.testing.assert_close(G(z, y, depth, 1.0), new, rtol=0, atol=0)
    assert not torch.allclose(G(z, y, depth, 0.5), 0.5 * old + 0.5 * new)


@pytest.mark.parametrize("depth", [1, 3])
def test_discriminator_fade_in(depth):
    torch.manual_seed(0)
    _, D = small(32, 3, n_classes=2)
    x, y = torch.randn(4, 3, 4 << depth, 4 << depth), torch.tensor([1, 0, 1, 1])
    torch.testing.assert_close(D(x, y, depth, 0.0), D(F.avg_pool2d(x, 2), y, depth - 1, 1.0), rtol=0, atol=0)
    new, mid = D(x, y, depth, 1.0), D(x, y, depth, 0.5)
    with torch.no_grad():  # the old fromRGB no longer matters at alpha 1, but does during the fade
        D.from_rgb[depth - 1].weight.mul_(3.0)
    torch.testing.assert_close(D(x, y, depth, 1.0), new, rtol=0, atol=0)
    assert not torch.allclose(D(x, y, depth, 0.5), mid)
    with pytest.raises(ValueError, match="takes"):
        D(x, y, depth - 1, 1.0)


def test_fade_mixes_dtypes_and_is_exact_at_the_ends():
    """Under CUDA bf16 autocast a fade-in's two paths came out fp32 and bf16, and lerp refused the mix."""
    old, new = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8).bfloat16()
    assert pggan.fade(old, new, 0.5).dtype == torch.bfloat16
    assert torch.equal(pggan.fade(old, new, 1.0), new)
    assert torch.equal(pggan.fade(old, new, 0.0), old.bfloat16())


def test_fade_reals():
    x = torch.randn(2, 1, 32, 32)
    at16 = F.avg_pool2d(x, 2)
    torch.testing.assert_close(pggan.fade_reals(x, 2, 1.0), at16)
    torch.testing.assert_close(pggan.fade_reals(x, 2, 0.0), F.interpolate(F.avg_pool2d(x, 4), scale_factor=2))
    torch.testing.assert_close(pggan.fade_reals(x, 2, 0.5),
                               0.5 * at16 + 0.5 * F.interpolate(F.avg_pool2d(x, 4), scale_factor=2))
    torch.testing.assert_close(pggan.fade_reals(x, 0, 0.3), F.avg_pool2d(x, 8))
    assert pggan.fade_reals(x, 3, 0.7).shape == (2, 1, 32, 32)


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_classes", [0, 3])
def test_output_shapes_full_depth(resolution, channels, n_classes):
    G, D = small(resolution, channels, n_classes)
    labels = torch.tensor([0, 2, 1, 1]) if n_classes else None
    with torch.no_grad():
        x = G(torch.randn(4, 8), labels)
        assert x.shape == (4, channels, resolution, resolution)
        assert D(x, labels).shape == (4,)
        assert G(torch.randn(4, 8), labels, 2, 0.5).shape == (4, channels, 16, 16)


def test_feature_widths_follow_fmap_base():
    G = pggan.Generator(256, 1, 512)  # the paper's widths: 512 up to 32 px, then halving
    assert [blk[1].weight.shape[0] for blk in G.blocks] == [512, 512, 512, 256, 128, 64]
    assert G.dense.weight.shape == (512 * 16, 512)


def test_wgan_gp_loss_on_a_linear_critic():
    class Linear(nn.Module):  # D(x) = <w, x>: its input gradient is w everywhere, |grad| = |w|
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 1, 4, 4))

        def forward(self, x, labels=None, depth=None, alpha=1.0):
            return (x * self.w).sum((1, 2, 3))
    torch.manual_seed(0)
    D = Linear()
    real, fake = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    loss, grad_norm = pggan.d_loss(D, real, fake, gp_weight=10.0, drift=0.001)
    s_real, s_fake, norm = D(real).detach(), D(fake).detach(), D.w.detach().norm()
    expected = s_fake.mean() - s_real.mean() + 10.0 * (norm - 1) ** 2 + 0.001 * s_real.square().mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad_norm, norm)  # what the log shows of D's Lipschitz constant
    lazy, none = pggan.d_loss(D, real, fake, gp_weight=0.0, drift=0.001)  # a lazy penalty's off step
    assert none is None
    torch.testing.assert_close(lazy, expected - 10.0 * (norm - 1) ** 2)
    loss.backward()  # the penalty's gradient only reaches w through the double backward
    w = D.w.detach()
    grad = (fake.mean(0, keepdim=True) - real.mean(0, keepdim=True) + 20.0 * (norm - 1) * w / norm
            + 0.001 * 2 * (s_real[:, None, None, None] * real).mean(0, keepdim=True))
    torch.testing.assert_close(D.w.grad, grad)
    torch.testing.assert_close(pggan.g_loss(D, fake), -s_fake.mean())


@pytest.mark.parametrize("depth,alpha,n_classes", [(3, 1.0, 0), (2, 0.5, 2)])
def test_training_steps_finite_and_change_weights(depth, alpha, n_classes):
    torch.manual_seed(0)
    G, D = small(32, 3, n_classes)
    opt_g, opt_d = pggan.make_optimizers(G, D)
    assert opt_d.defaults["lr"] == 1e-3 and opt_d.defaults["betas"] == (0.0, 0.99)
    ema = EMA(G, half_life=100, rampup=None)
    before_g = [p.detach().clone() for p in G.parameters()]
    before_d = [p.detach().clone() for p in D.parameters()]
    real = pggan.fade_reals(torch.rand(8, 3, 32, 32) * 2 - 1, depth, alpha)
    labels = torch.randint(0, 2, (8,)) if n_classes else None
    for _ in range(2):
        ld, _ = pggan.d_loss(D, real, G(torch.randn(8, 8), labels, depth, alpha), labels, depth, alpha)
        opt_d.zero_grad(); ld.backward(); opt_d.step()
        lg = pggan.g_loss(D, G(torch.randn(8, 8), labels, depth, alpha), labels, depth, alpha)
        opt_g.zero_grad(); lg.backward(); opt_g.step()
        ema.update(G, 0, 8)
        assert torch.isfinite(ld) and torch.isfinite(lg)
    used_g = [i for i, p in enumerate(G.parameters()) if p.grad is not None]
    assert len(used_g) > 4
    assert all(not torch.equal(before_g[i], list(G.parameters())[i]) for i in used_g)
    assert sum(not torch.equal(a, b) for a, b in zip(before_d, D.parameters())) > 4
    # toRGBs not on the current path (beyond the depth; the old one at alpha 1) get no gradient and stay put
    unused = G.to_rgb[3] if depth < 3 else G.to_rgb[2]
    assert unused.weight.grad is None and torch.equal(unused.weight, ema.model.to_rgb[3 if depth < 3 else 2].weight)


def test_ema_update_is_a_half_life_in_images_with_a_ramp_up_and_copies_buffers():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(net, half_life=64, rampup=0.5)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net(torch.randn(4, 3))  # moves BatchNorm's running stats
    ema.update(net, images_seen=1000, batch_images=16)  # 16 of a 64-image half-life: keeps 0.5 ** 0.25
    torch.testing.assert_close(ema.model[0].weight, start + 1 - 0.5 ** 0.25)
    torch.testing.assert_close(ema.model[1].running_mean, net[1].running_mean)
    assert not any(p.requires_grad for p in ema.model.parameters())
    # the ramp-up: after 32 images the half-life is at most 16 of them
    assert ema_beta(16, 64, 0.5, 32) == pytest.approx(0.5) and ema_beta(16, 64, None, 32) == pytest.approx(0.5 ** 0.25)


def test_a_fixed_decay_keeps_a_sixth_of_a_short_phase_and_a_half_life_over_90_percent():
    """The issue's figure: decay 0.999 over a 170-step phase holds 16% of it; the default half-life of a
    quarter of the shortest phase holds at least 1 - 0.5 ** 4 of every phase."""
    decay_as_half_life = 32 * math.log(0.5) / math.log(0.999)  # images, at batch 32
    phases = [("4 px", 0, 170 * 32), ("fade 8 px", 170 * 32, 340 * 32)]
    assert phase_shares(phases, 32, decay_as_half_life, None)["fade 8 px"] == pytest.approx(1 - 0.999 ** 170)
    assert 1 - 0.999 ** 170 == pytest.approx(0.156, abs=1e-3)
    for per_depth, first in ((5440, None), (33_000, 66_000), (400, 800)):
        s = pggan.PhaseSchedule(256, per_depth, first)
        phases = s.phases(s.growth_images + 2 * per_depth)
        shortest = min(end - start for _, start, end in phases)
        shares = phase_shares(phases, 32, half_life_for(shortest, None), 0.05)
        assert len(shares) == 13 and min(shares.values()) >= 1 - 0.5 ** 4 - 1e-9, shares


def test_phase_schedule_with_a_longer_first_depth_and_its_phases():
    s = pggan.PhaseSchedule(16, 50, first_phase_images=100)  # depths 0..2: each depth trains 100 images
    assert [s(n) for n in (0, 99, 100, 125, 150, 199, 200, 225, 250, 10**6)] == [
        (0, 1.0), (0, 1.0), (1, 0.0), (1, 0.5), (1, 1.0), (1, 1.0), (2, 0.0), (2, 0.5), (2, 1.0), (2, 1.0)]
    assert s.growth_images == 250
    assert s.phases(300) == [("4 px", 0, 100), ("fade 8 px", 100, 150), ("8 px", 150, 200),
                             ("fade 16 px", 200, 250), ("16 px", 250, 300)]


@pytest.mark.parametrize("channels_in, channels_out, side", [(3, 5, 4), (8, 4, 7)])
def test_fused_upsample_conv_equals_upsampling_then_the_3x3_conv(channels_in, channels_out, side):
    torch.manual_seed(0)
    conv = pggan.EqConv2d(channels_in, channels_out, 3).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, channels_in, side, side, dtype=torch.float64)
    unfused = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(pggan.upsample_conv(x, conv), unfused, rtol=1e-12, atol=1e-12)


def test_pixel_norm_keeps_the_autocast_dtype():
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pggan.pixel_norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().square().mean(1), torch.ones(2, 4, 4), atol=0.02, rtol=0)


def test_bf16_autocast_and_channels_last():
    G, D = small(32, 1, 2)
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 1, 0])
    real = torch.randn(4, 1, 16, 16).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(torch.randn(4, 8), y, 2, 0.5)
        ld, _ = pggan.d_loss(D, real, fake, y, 2, 0.5)
    assert fake.dtype == torch.bfloat16 and ld.dtype == torch.float32 and torch.isfinite(ld)
    ld.backward()
