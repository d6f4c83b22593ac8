import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import dcgan


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("n_classes", [0, 4])
def test_output_shapes(resolution, channels, n_classes):
    torch.manual_seed(0)
    G = dcgan.Generator(resolution, channels, 16, base_width=4, n_classes=n_classes)
    D = dcgan.Discriminator(resolution, channels, base_width=4, n_classes=n_classes)
    labels = torch.tensor([0, 3]) if n_classes else None
    x = G(torch.randn(2, 16), labels)
    assert x.shape == (2, channels, resolution, resolution)
    assert x.abs().max() <= 1.0  # tanh output
    assert D(x, labels).shape == (2,)


def test_512_px_and_width_cap():
    G = dcgan.Generator(512, 1, 8, base_width=64)
    D = dcgan.Discriminator(512, 1, base_width=64)
    assert dcgan.widths(64, 7) == [512, 512, 512, 512, 256, 128, 64]
    assert max(m.out_channels for m in G.modules() if isinstance(m, nn.ConvTranspose2d)) == 512
    with torch.no_grad():
        x = G(torch.randn(2, 8))
        assert x.shape == (2, 1, 512, 512) and D(x).shape == (2,)


def test_layout_batchnorm_activations_and_init():
    torch.manual_seed(0)
    G, D = dcgan.Generator(64, 3, 100), dcgan.Discriminator(64, 3)
    g, d = list(G.net), list(D.features)
    # 64 px: latent -> 4x4 -> 8 -> 16 -> 32 -> 64, each hidden layer ConvT + BN + ReLU, tanh output without BN
    assert [type(m) for m in g[-2:]] == [nn.ConvTranspose2d, nn.Tanh]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g) == 4 and sum(isinstance(m, nn.ReLU) for m in g) == 4
    assert [m.out_channels for m in g if isinstance(m, nn.ConvTranspose2d)] == [512, 256, 128, 64, 3]
    # D: input conv without BN, then conv + BN + LeakyReLU(0.2) down to 4x4
    assert [type(m) for m in d[:2]] == [nn.Conv2d, nn.LeakyReLU]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d) == 3
    assert all(m.negative_slope == 0.2 for m in d if isinstance(m, nn.LeakyReLU))
    assert D.features(torch.randn(2, 3, 64, 64)).shape == (2, 512, 4, 4)
    convs = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    assert convs.mean().abs() < 1e-3 and abs(convs.std().item() - 0.02) < 1e-3
    gammas = torch.cat([m.weight for m in D.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(gammas.mean().item() - 1.0) < 5e-3 and 0.01 < gammas.std().item() < 0.03
    assert all(m.bias.abs().sum() == 0 for m in G.modules() if isinstance(m, nn.BatchNorm2d))


def test_conditional_label_enters_g_and_projection_in_d():
    torch.manual_seed(0)
    G = dcgan.Generator(32, 1, 8, base_width=4, n_classes=3).eval()
    D = dcgan.Discriminator(32, 1, base_width=4, n_classes=3).eval()
    z = torch.randn(1, 8).repeat(3, 1)
    x = G(z, torch.arange(3))
    assert not torch.allclose(x[0], x[1]) and not torch.allclose(x[1], x[2])
    y = torch.tensor([2, 0, 1])
    h = D.features(x)
    expected = D.out(h).flatten() + (D.embed.weight[y] * h.sum((2, 3))).sum(1)
    torch.testing.assert_close(D(x, y), expected)
    with pytest.raises(ValueError, match="labels"):
        G(z)


def test_losses_are_non_saturating_bce():
    class Fixed(nn.Module):  # a D that returns the mean pixel as its logit
        def forward(self, x, labels=None):
            return x.mean((1, 2, 3))
    real, fake = torch.full((2, 1, 4, 4), 2.0), torch.full((2, 1, 4, 4), -1.0)
    bce = F.binary_cross_entropy_with_logits
    expected_d = bce(torch.tensor([2.0, 2.0]), torch.ones(2)) + bce(torch.tensor([-1.0, -1.0]), torch.zeros(2))
    torch.testing.assert_close(dcgan.d_loss(Fixed(), real, fake), expected_d)
    torch.testing.assert_close(dcgan.g_loss(Fixed(), fake), bce(torch.tensor([-1.0, -1.0]), torch.ones(2)))


@pytest.mark.parametrize("n_classes", [0, 2])
def test_training_steps_finite_and_change_weights(n_classes):
    torch.manual_seed(0)
    G = dcgan.Generator(32, 3, 16, base_width=8, n_classes=n_classes)
    D = dcgan.Discriminator(32, 3, base_width=8, n_classes=n_classes)
    opt_g, opt_d = dcgan.make_optimizers(G, D)
    assert opt_g.defaults["lr"] == 2e-4 and opt_g.defaults["betas"] == (0.5, 0.999)
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = torch.randint(0, 2, (8,)) if n_classes else None
    for _ in range(3):
        fake = G(torch.randn(8, 16), labels)
        ld = dcgan.d_loss(D, real, fake, labels)
        opt_d.zero_grad(); ld.backward(); opt_d.step()
        lg = dcgan.g_loss(D, fake, labels)
        opt_g.zero_grad(); lg.backward(); opt_g.step()
        assert torch.isfinite(ld) and torch.isfinite(lg)
    after = list(G.parameters()) + list(D.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after))


def test_bf16_autocast_and_channels_last():
    G = dcgan.Generator(32, 1, 8, base_width=4, n_classes=2).to(memory_format=torch.channels_last)
    D = dcgan.Discriminator(32, 1, base_width=4, n_classes=2).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = G(torch.randn(2, 8), y)
        loss = dcgan.g_loss(D, fake, y)
    assert fake.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("resolution,channels", [(48, 1), (16, 1), (1024, 3), (64, 2)])
def test_bad_shapes_rejected(resolution, channels):
    with pytest.raises(ValueError, match="resolution|channels"):
        dcgan.Generator(resolution, channels, 8)
