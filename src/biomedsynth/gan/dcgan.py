"""DCGAN (Radford et al. 2016): all-convolutional generator and discriminator with BatchNorm.

G turns the latent (a 1x1 map) into a 4x4 map, then doubles the side with strided transposed
convolutions up to the output resolution; D mirrors it with strided convolutions down to 4x4 and
a last 4x4 convolution to one logit. Conditional models (n_classes > 0) join a label embedding to
the latent in G and add a projection term <embed(y), features> to D's logit (Miyato & Koyama 2018).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import doublings

MAX_WIDTH = 512  # cap on feature maps, so a 512 px model does not start from 4096 channels


def check_shape(resolution: int, channels: int) -> int:
    return doublings(resolution, channels, 32, 512)


def widths(base_width: int, steps: int) -> list[int]:
    """Feature maps at 4x4, 8x8, ... up to half the output side: halving per doubling, capped."""
    return [min(base_width * 2 ** (steps - 1 - i), MAX_WIDTH) for i in range(steps)]


def init_weights(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: conv weights N(0, 0.02), BatchNorm gamma N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _check_labels(n_classes: int, labels: torch.Tensor | None) -> None:
    if n_classes and labels is None:
        raise ValueError(f"this model is conditional on {n_classes} classes: pass labels (LongTensor of class ids)")


class Generator(nn.Module):
    def __init__(self, resolution: int, channels: int, latent_dim: int, base_width: int = 64, n_classes: int = 0):
        super().__init__()
        steps = check_shape(resolution, channels)
        self.resolution, self.channels, self.latent_dim, self.n_classes = resolution, channels, latent_dim, n_classes
        w = widths(base_width, steps)
        # the embedding has the latent's size and scale, so the label weighs as much as the noise
        self.embed = nn.Embedding(n_classes, latent_dim) if n_classes else None
        layers = [nn.ConvTranspose2d(latent_dim * (2 if n_classes else 1), w[0], 4, 1, 0, bias=False),
                  nn.BatchNorm2d(w[0]), nn.ReLU(True)]
        for a, b in zip(w, w[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(w[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, latent_dim) noise [+ (N,) class ids] -> (N, channels, resolution, resolution) in [-1, 1]."""
        _check_labels(self.n_classes, labels)
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels).to(z.dtype)], 1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    def __init__(self, resolution: int, channels: int, base_width: int = 64, n_classes: int = 0):
        super().__init__()
        steps = check_shape(resolution, channels)
        self.resolution, self.channels, self.n_classes = resolution, channels, n_classes
        w = widths(base_width, steps)[::-1]  # widest at 4x4, as in G
        layers = [nn.Conv2d(channels, w[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for a, b in zip(w, w[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.out = nn.Conv2d(w[-1], 1, 4, 1, 0)
        self.embed = nn.Embedding(n_classes, w[-1]) if n_classes else None
        init_weights(self)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, channels, resolution, resolution) [+ (N,) class ids] -> (N,) logits (real > 0)."""
        _check_labels(self.n_classes, labels)
        h = self.features(x)
        logit = self.out(h).flatten()
        if self.embed is not None:
            logit = logit + (self.embed(labels) * h.sum((2, 3))).sum(1)
        return logit


def d_loss(D: Discriminator, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating BCE-with-logits loss of D: real -> 1, fake -> 0 (fake is detached).

    Real and fake go through D as separate batches, as in the paper, so BatchNorm sees one kind at a time.
    softplus(-l) = BCE(l, 1) and softplus(l) = BCE(l, 0); logits are upcast so bf16 autocast stays exact.
    """
    return F.softplus(-D(real, labels).float()).mean() + F.softplus(D(fake.detach(), labels).float()).mean()


def g_loss(D: Discriminator, fake: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating loss of G: BCE of D's logit on fakes against the 'real' target."""
    return F.softplus(-D(fake, labels).float()).mean()


def make_optimizers(G: nn.Module, D: nn.Module, lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
                    fused: bool = False) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and D with the paper's settings (fused: one kernel per step, for CUDA); (opt_g, opt_d)."""
    return (torch.optim.Adam(G.parameters(), lr=lr, betas=betas, fused=fused or None),
            torch.optim.Adam(D.parameters(), lr=lr, betas=betas, fused=fused or None))
