import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import ada, sg2ada

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(channel_base=256, channel_max=16)  # widths 16 at 4..16 px, 8 at 32 px


def small(resolution=32, channels=1, n_classes=0, latent_dim=8):
    G = sg2ada.Generator(resolution, channels, latent_dim, n_classes, mapping_layers=2, **TINY)
    return G, sg2ada.Discriminator(resolution, channels, n_classes, **TINY)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_classes", [0, 3])
def test_output_shapes(resolution, channels, n_classes):
    torch.manual_seed(0)
    G, D = small(resolution, channels, n_classes)
    labels = torch.tensor([0, 2, 1, 1]) if n_classes else None
    with torch.no_grad():
        x = G(torch.randn(4, 8), labels)
        assert x.shape == (4, channels, resolution, resolution) and torch.isfinite(x).all()
        assert D(x, labels).shape == (4,)
    if n_classes:
        with pytest.raises(ValueError, match="pass labels"):
            G(torch.randn(4, 8))
        with pytest.raises(ValueError, match="pass labels"):
            D(x)
    with pytest.raises(ValueError, match="D takes"):
        D(torch.randn(4, channels, resolution // 2, resolution // 2), labels)


@pytest.mark.parametrize("resolution,channels", [(16, 1), (1024, 1), (48, 1), (32, 2)])
def test_check_shape_refuses(resolution, channels):
    with pytest.raises(ValueError, match="resolution|channels") as err:
        sg2ada.check_shape(resolution, channels)
    assert "\n" not in str(err.value)
    assert sg2ada.check_shape(256, 3) == 6


def test_widths_and_style_count():
    assert sg2ada.widths(256, 16384, 512) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}
    G = sg2ada.Generator(32, 1, 8, mapping_layers=3, **TINY)
    assert G.num_ws == 2 + 3 * 3  # 4x4: conv + toRGB; each later side: two convs + toRGB
    assert len(G.mapping.net) == 3
    with pytest.raises(ValueError, match="channel_base"):
        sg2ada.Generator(64, 1, 8, channel_base=32)


def test_equalised_lr_scales():
    torch.manual_seed(0)
    mapping_layer = sg2ada.EqLinear(7, 4, lr_mul=0.01, activate=True)
    assert mapping_layer.weight_gain == pytest.approx(0.01 / math.sqrt(7)) and mapping_layer.bias_gain == 0.01
    with torch.no_grad():
        mapping_layer.bias.normal_()
    v = torch.randn(3, 7)
    expected = F.leaky_relu(F.linear(v, mapping_layer.weight * 0.01 / math.sqrt(7), mapping_layer.bias * 0.01), 0.2)
    torch.testing.assert_close(mapping_layer(v), expected * math.sqrt(2))
    big = sg2ada.EqLinear(512, 512, lr_mul=0.01)
    assert abs(big.weight.std().item() - 100.0) < 1.0  # stored N(0, 1) / lr_mul: its runtime weight is N(0, 1/fan_in)
    conv = sg2ada.EqConv2d(6, 5, 3)
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv(x), F.leaky_relu(F.conv2d(x, conv.weight / math.sqrt(54), conv.bias, padding=1),
                                                      0.2) * math.sqrt(2))
    G = sg2ada.Generator(32, 1, 8, mapping_layers=2, **TINY)
    assert all(layer.weight_gain == pytest.approx(0.01 / math.sqrt(8)) for layer in G.mapping.net)
    style = G.synthesis.blocks[1].layers[0].conv
    assert style.weight_gain == pytest.approx(1 / math.sqrt(16 * 9))
    torch.testing.assert_close(style.affine.bias * style.affine.bias_gain, torch.ones(16))  # styles start at 1


def test_modulated_conv_is_a_per_sample_weight():
    torch.manual_seed(0)
    layer = sg2ada.ModulatedConv2d(4, 3, 5, 3, demodulate=True)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(2, 5)
    styles = layer.affine(w)
    for n in range(2):
        weight = layer.weight * layer.weight_gain * styles[n][None, :, None, None]
        weight = weight / weight.square().sum((1, 2, 3), keepdim=True).add(1e-8).sqrt()
        torch.testing.assert_close(layer(x, w)[n], F.conv2d(x[n:n + 1], weight, padding=1)[0])


def test_demodulation_gives_unit_variance():
    torch.manual_seed(0)
    layer = sg2ada.ModulatedConv2d(16, 6, 8, 3, demodulate=True)
    with torch.no_grad():
        layer.affine.weight.mul_(30.0)  # styles far from 1: modulation alone would change the scale
        x, w = torch.randn(16, 16, 34, 34), torch.randn(16, 8)
        var = layer(x, w)[:, :, 1:-1, 1:-1].var((0, 2, 3))  # inside the zero padding
        assert ((var - 1).abs() < 0.08).all(), var
        layer.demodulate = False
        assert ((layer(x, w)[:, :, 1:-1, 1:-1].var((0, 2, 3)) - 1).abs() > 0.5).any()


def test_fir_resampling():
    x = torch.randn(2, 3, 8, 8)
    k = torch.tensor([1.0, 3.0, 3.0, 1.0])
    up = torch.zeros(2, 3, 16, 16)  # zero insertion, then the filter with gain 4 (2 per axis)
    up[:, :, ::2, ::2] = x
    kernel = (torch.outer(k, k) / 16).expand(3, 1, 4, 4)
    expected = F.conv2d(F.pad(up, (2, 1, 2, 1)), kernel, groups=3)
    torch.testing.assert_close(sg2ada.upsample2d(x)[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])
    # output i weighs inputs 2i-1, 2i, 2i+1, 2i+2 by 1, 3, 3, 1 (per axis, / 8): centred between 2i and 2i+1
    down = F.conv2d(x[..., 1:7, 1:7], (torch.outer(k, k) / 64).expand(3, 1, 4, 4), stride=2, groups=3)
    torch.testing.assert_close(sg2ada.downsample2d(x)[..., 1:3, 1:3], down)
    ones = torch.ones(1, 2, 8, 8)
    torch.testing.assert_close(sg2ada.upsample2d(ones), torch.ones(1, 2, 16, 16))
    torch.testing.assert_close(sg2ada.downsample2d(ones), torch.ones(1, 2, 4, 4))


def test_skip_generator_sums_upsampled_rgb_outputs():
    torch.manual_seed(0)
    G, _ = small(32, 3)
    rgbs = []
    for block in G.synthesis.blocks:
        block.to_rgb.register_forward_hook(lambda module, args, out: rgbs.append(out))
    with torch.no_grad():
        img = G(torch.randn(2, 8), noise_mode="const")
    expected = rgbs[0]
    for rgb in rgbs[1:]:
        expected = sg2ada.upsample2d(expected) + rgb
    assert [r.shape[-1] for r in rgbs] == [4, 8, 16, 32]
    torch.testing.assert_close(img, expected)


def test_noise_inputs_and_mapping():
    torch.manual_seed(0)
    G, _ = small(32, 1, n_classes=2)
    z, y = torch.randn(3, 8), torch.tensor([0, 1, 1])
    with torch.no_grad():
        # learnt strengths start at 0: random noise changes nothing yet
        torch.testing.assert_close(G(z, y, "random"), G(z, y, "const"), rtol=0, atol=0)
        for block in G.synthesis.blocks:
            for layer in block.layers:
                layer.noise_strength.fill_(0.5)
        assert torch.equal(G(z, y, "const"), G(z, y, "const"))
        assert not torch.allclose(G(z, y, "random"), G(z, y, "const"))
        torch.testing.assert_close(G.mapping(5 * z, y), G.mapping(z, y))  # z is pixel-normalised
        assert not torch.allclose(G.mapping(z, y), G.mapping(z, 1 - y))
    with pytest.raises(ValueError, match="noise_mode"):
        G(z, y, "none")


def test_projection_discriminator():
    torch.manual_seed(0)
    _, D = small(32, 1, n_classes=3)
    features = []
    D.fc.register_forward_hook(lambda module, args, out: features.append(out))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        a, b = D(x, torch.tensor([0, 0, 0, 0])), D(x, torch.tensor([2, 2, 2, 2]))
    h = features[0]
    assert torch.equal(h, features[1])
    torch.testing.assert_close(b - a, h @ (D.embed.weight[2] - D.embed.weight[0]) / math.sqrt(h.shape[1]))


def test_random_draws_follow_a_torch_generator():
    """Noise inputs, path-length directions and augmentations draw from the generator passed, so a trainer
    with its own torch.Generator (resumable) gets the same run; the global RNG is left alone."""
    torch.manual_seed(0)
    G, _ = small(32, 1)
    with torch.no_grad():
        for block in G.synthesis.blocks:
            for layer in block.layers:
                layer.noise_strength.fill_(1.0)
    z, x = torch.randn(4, 8), torch.rand(4, 1, 32, 32)
    pipe = ada.for_modality("histology", p=0.7)
    runs = []
    for _ in range(2):
        rng = torch.Generator().manual_seed(5)
        state = torch.get_rng_state()
        with torch.no_grad():
            images = G(z, generator=rng)
        runs.append((images, pipe(x, generator=rng), sg2ada.PathLengthPenalty()(G, z, generator=rng).detach()))
        assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class Quadratic(nn.Module):
    """D(x) = sum(w * x^2): its input gradient is 2 w x, so R1 = E_n |2 w x_n|^2 in closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 1, 4, 4))

    def forward(self, x, labels=None):
        return (self.w * x.square()).sum((1, 2, 3))


def test_r1_and_the_lazy_weight_on_a_toy_d():
    torch.manual_seed(0)
    D = Quadratic()
    real, fake = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    w = D.w.detach()
    r1_expected = (2 * w * real).square().sum((1, 2, 3)).mean()
    r1, logits = sg2ada.r1_penalty(D, real)
    torch.testing.assert_close(r1, r1_expected)
    torch.testing.assert_close(logits, D(real).detach())
    # through an augmentation the gradient is w.r.t. the images before it: D(2x) = 4 D(x), so R1 grows 16x
    torch.testing.assert_close(sg2ada.r1_penalty(D, real, augment=lambda x: 2 * x)[0], 16 * r1_expected)

    main = F.softplus(D(fake).detach()).mean() + F.softplus(-D(real).detach()).mean()
    plain = sg2ada.d_loss(D, real, fake, r1_gamma=0.5, do_r1=False)
    torch.testing.assert_close(plain.total, main)
    assert plain.r1 is None and not plain.real_logits.requires_grad
    lazy = sg2ada.d_loss(D, real, fake, r1_gamma=0.5, do_r1=True, r1_interval=16)
    torch.testing.assert_close(lazy.total, main + 0.5 / 2 * 16 * r1_expected)  # gamma / 2 * interval
    torch.testing.assert_close(lazy.r1, r1_expected)
    assert sg2ada.d_loss(D, real, fake, r1_gamma=0.0, do_r1=True).r1 is None
    lazy.total.backward()  # the penalty reaches w through the double backward: d/dw E|2 w x|^2 = 8 w E[x^2]
    grad_main = (torch.sigmoid(D(fake)).detach()[:, None, None, None] * fake.square()
                 - torch.sigmoid(-D(real)).detach()[:, None, None, None] * real.square()).mean(0, keepdim=True)
    torch.testing.assert_close(D.w.grad, grad_main + 4.0 * 8 * w * real.square().mean(0, keepdim=True))
    with pytest.raises(ValueError, match="r1_interval"):
        sg2ada.d_loss(D, real, fake, r1_interval=0)


def test_every_image_d_sees_is_augmented():
    D, seen = Quadratic(), []

    def augment(x):
        seen.append(x.detach())
        return -x  # the toy D is even in x, so the losses are unchanged: only the calls are counted
    real, fake = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    d = sg2ada.d_loss(D, real, fake, augment=augment, r1_gamma=1.0, do_r1=True)
    assert len(seen) == 2 and torch.equal(seen[0], fake) and torch.equal(seen[1], real)
    torch.testing.assert_close(d.total, sg2ada.d_loss(D, real, fake, r1_gamma=1.0, do_r1=True).total)
    sg2ada.d_loss(D, real, fake, augment=augment)
    assert len(seen) == 4 and torch.equal(seen[3], real)
    lg = sg2ada.g_loss(D, fake, augment=augment)
    assert len(seen) == 5 and torch.equal(seen[4], fake)
    torch.testing.assert_close(lg, F.softplus(-D(fake)).mean())


class LinearG(nn.Module):
    """Image = c * (first 4 of w of layer 0) as 2x2: the path-length gradient is c * y in layer 0, 0 elsewhere."""
    num_ws = 4

    def __init__(self, c):
        super().__init__()
        self.c, self.one = c, nn.Parameter(torch.ones(()))

    def mapping(self, z, labels=None):
        return z * self.one

    def synthesis(self, ws, generator=None):
        return self.c * ws[:, 0, :4].reshape(-1, 1, 2, 2)


def test_path_length_penalty_known_values():
    pl = sg2ada.PathLengthPenalty(decay=0.01)
    z = torch.randn(6, 5)
    torch.manual_seed(1)
    penalty = pl(LinearG(3.0), z)
    torch.manual_seed(1)
    y = torch.randn(6, 1, 2, 2) / 2  # / sqrt(H * W)
    lengths = (9.0 * y.flatten(1).square().sum(1) / 4).sqrt()  # |c y|^2 in one of 4 layers, averaged over layers
    mean = 0.01 * lengths.mean()
    torch.testing.assert_close(pl.mean, mean)
    torch.testing.assert_close(penalty, (lengths - mean).square().mean())
    assert "mean" in pl.state_dict()
    pl(LinearG(3.0), z)
    assert pl.mean > mean  # the running mean moves 1% of the way each call


def test_path_length_on_the_generator_trains_mapping_and_synthesis():
    torch.manual_seed(0)
    G, _ = small(32, 1, n_classes=2)
    penalty = sg2ada.PathLengthPenalty()(G, torch.randn(4, 8), torch.tensor([0, 1, 0, 1]))
    penalty.backward()
    assert torch.isfinite(penalty) and penalty > 0
    assert G.mapping.net[0].weight.grad.abs().sum() > 0
    assert G.synthesis.blocks[-1].layers[0].conv.weight.grad.abs().sum() > 0


def test_training_smoke_with_ada_and_lazy_regularisers():
    """The module docstring's training step, 20 times on 16 images: R1 every 4 D steps, path length every 4 G steps."""
    torch.manual_seed(0)
    G, D = small(32, 3, n_classes=2)
    opt_g, opt_d = sg2ada.make_optimizers(G, D)
    assert opt_d.defaults["lr"] == 0.0025 and opt_d.defaults["betas"] == (0.0, 0.99)
    pipe, adaptive = ada.for_modality("histology"), ada.AdaptiveP(interval=4, speed_images=200)
    pl = sg2ada.PathLengthPenalty()
    pipe.p = adaptive.p
    images, classes = torch.rand(16, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (16,))
    before = [p.detach().clone() for p in G.parameters()]
    n, r1_steps = 8, []
    for step in range(20):
        idx = torch.randperm(16)[:n]
        real, labels = images[idx], classes[idx]
        fake = G(torch.randn(n, G.latent_dim), labels).detach()
        d = sg2ada.d_loss(D, real, fake, labels, augment=pipe, r1_gamma=0.05, do_r1=step % 4 == 0, r1_interval=4)
        opt_d.zero_grad(); d.total.backward(); opt_d.step()
        adaptive.observe(d.real_logits)
        z = torch.randn(n, G.latent_dim)
        loss_g = sg2ada.g_loss(D, G(z, labels), labels, augment=pipe)
        if step % 4 == 0:
            loss_g = loss_g + 2.0 * 4 * pl(G, z[:n // 2], labels[:n // 2])
        opt_g.zero_grad(); loss_g.backward(); opt_g.step()
        assert torch.isfinite(d.total) and torch.isfinite(loss_g)
        if d.r1 is not None:
            r1_steps.append(step)
    assert r1_steps == [0, 4, 8, 12, 16]
    assert sum(not torch.equal(a, b) for a, b in zip(before, G.parameters())) == len(before)  # every G tensor learns
    assert 0.0 <= adaptive.p.item() <= 1.0 and not math.isnan(adaptive.r_t.item()) and pl.mean > 0


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    G, D = small(32, 1, n_classes=2)
    G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 1, 0])
    real = torch.randn(4, 1, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(torch.randn(4, 8), y)
        d = sg2ada.d_loss(D, real, fake, y, augment=ada.AugmentPipe(p=0.5), r1_gamma=1.0, do_r1=True)
        lg = sg2ada.g_loss(D, fake, y)
    assert fake.dtype == torch.bfloat16 and d.total.dtype == torch.float32 and torch.isfinite(d.total)
    (d.total + lg).backward()
