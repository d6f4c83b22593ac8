"""StyleGAN2 (Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"), the generator and
discriminator that adaptive discriminator augmentation (ada.py; Karras et al. 2020, "Training Generative
Adversarial Networks with Limited Data") trains on small sets.

G: a mapping network (pixel-normalised z, joined with a pixel-normalised label embedding in conditional models,
`mapping_layers` fully connected layers at a 0.01 learning-rate multiplier) gives w; the synthesis network starts
from a learnt 4x4 constant and at every resolution runs modulated/demodulated 3x3 convolutions styled by w, with
per-pixel noise of learnt strength, and sums its toRGB outputs across resolutions (the "skip" generator).
D: fromRGB at full size, residual blocks down to 4x4, minibatch stddev, a 3x3 conv and two dense layers; a
conditional D adds the projection <embed(label), last features> / sqrt(width). Every layer has an equalised
learning rate and leaky ReLUs have gain sqrt(2). Resampling is the [1, 3, 3, 1] FIR filter in plain torch ops.

Losses: the non-saturating logistic loss; R1 on reals, lazily (every `r1_interval` D steps, weighted
r1_gamma / 2 * r1_interval); optional path-length regularisation (PathLengthPenalty, lazily likewise). Each
regulariser is added to the main loss of the step it falls on, so the loop keeps one backward and one optimiser
step per network per batch, and Adam needs none of the paper's lr/beta corrections for extra regulariser steps.
`augment` (e.g. an ada.AugmentPipe) is applied to every image D sees: reals, fakes and R1's reals, whose gradient
is taken through the augmentation. A training step, with pipe = ada.for_modality(...), adaptive = ada.AdaptiveP(...),
pipe.p = adaptive.p and pl = PathLengthPenalty() made once (tests/test_sg2ada.py runs it):

    fake = G(torch.randn(n, G.latent_dim), labels).detach()
    d = d_loss(D, real, fake, labels, augment=pipe, r1_gamma=gamma, do_r1=step % 16 == 0, r1_interval=16)
    opt_d.zero_grad(); d.total.backward(); opt_d.step()
    adaptive.observe(d.real_logits)        # moves p (shared with the pipe) every adaptive.interval steps
    z = torch.randn(n, G.latent_dim)
    loss_g = g_loss(D, G(z, labels), labels, augment=pipe)
    if pl_weight and step % 4 == 0:        # path length on half the batch, as in the paper
        loss_g = loss_g + pl_weight * 4 * pl(G, z[:n // 2], labels if labels is None else labels[:n // 2])
    opt_g.zero_grad(); loss_g.backward(); opt_g.step()
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import doublings
from biomedsynth.gan.pggan import minibatch_stddev, pixel_norm

SQRT2 = math.sqrt(2.0)
FIR = torch.tensor([1.0, 3.0, 3.0, 1.0])  # the resampling filter of the paper's code, a binomial (bilinear-like) one
Augment = Callable[[torch.Tensor], torch.Tensor]


def check_shape(resolution: int, channels: int) -> int:
    return doublings(resolution, channels, 32, 512)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """Leaky ReLU (slope 0.2) times sqrt(2), so unit-variance inputs keep roughly unit second moment."""
    return F.leaky_relu(x, 0.2) * SQRT2


def upsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling with the [1, 3, 3, 1] filter. Bilinear interpolation with align_corners=False is exactly
    that filter's two phases ([1, 3] / 4 and [3, 1] / 4) with the edge pixel repeated, so torch does it in one op."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def downsample2d(x: torch.Tensor) -> torch.Tensor:
    """2x downsampling: blur with the normalised [1, 3, 3, 1] x [1, 3, 3, 1] filter, keep every second pixel;
    edges repeated, so a constant image stays constant."""
    c = x.shape[1]
    k = torch.outer(FIR, FIR).to(x.device, x.dtype) / FIR.sum() ** 2
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(c, 1, 4, 4), stride=2, groups=c)


def _check_labels(n_classes: int, labels: torch.Tensor | None) -> None:
    if n_classes and labels is None:
        raise ValueError(f"this model is conditional on {n_classes} classes: pass labels (LongTensor of class ids)")


class EqLinear(nn.Module):
    """Dense layer with equalised learning rate: weight stored N(0, 1) / lr_mul and used times lr_mul / sqrt(fan_in),
    bias stored bias_init / lr_mul and used times lr_mul, so Adam's step on them is lr_mul times smaller."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), bias_init / lr_mul))
        self.weight_gain, self.bias_gain, self.activate = lr_mul / math.sqrt(in_features), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return lrelu(x) if self.activate else x


class EqConv2d(nn.Module):
    """'Same'-padded convolution with equalised learning rate (weight used times 1 / sqrt(in * k * k)),
    optionally after 2x downsampling and followed by lrelu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activate: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activate, self.down = activate, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            x = downsample2d(x)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        return lrelu(x) if self.activate else x


class ModulatedConv2d(nn.Module):
    """Convolution whose weight is scaled per sample and input channel by a style (an affine map of w, bias 1)
    and, when demodulating, rescaled per sample and output channel to unit L2 norm over (in, kh, kw), so
    unit-variance inputs give unit-variance outputs. Done as input scaling, one shared conv and output scaling,
    which equals convolving each sample with its own modulated weight."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int, demodulate: bool):
        super().__init__()
        self.affine = EqLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate = demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w).float()  # (N, in); demodulation in fp32 under bf16 autocast
        weight = self.weight * self.weight_gain
        x = F.conv2d(x * styles[:, :, None, None].to(x.dtype), weight, padding=weight.shape[-1] // 2)
        if self.demodulate:
            # |weight * styles[n]|^2 over (in, kh, kw) for every (n, out) = styles^2 @ (sum_k weight^2)^T
            norms = styles.square() @ weight.float().square().sum((2, 3)).T
            x = x * torch.rsqrt(norms + 1e-8)[:, :, None, None].to(x.dtype)
        return x


class SynthesisLayer(nn.Module):
    """[2x upsampling,] modulated 3x3 conv, per-pixel noise times a learnt strength (0 at start), bias, lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, w_dim, 3, demodulate=True)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))  # the 'const' noise mode's noise
        self.up = up

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.conv(upsample2d(x) if self.up else x, w)
        if noise_mode == "random":
            noise = torch.randn(len(x), 1, *x.shape[2:], device=x.device, dtype=x.dtype, generator=generator)
        else:
            noise = self.noise_const.to(x.dtype)
        return lrelu(x + noise * self.noise_strength.to(x.dtype) + self.bias[:, None, None].to(x.dtype))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, not demodulated, plus bias, no activation."""

    def __init__(self, in_channels: int, channels: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, w_dim, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[:, None, None].to(x.dtype)


def widths(resolution: int, channel_base: int, channel_max: int) -> dict[int, int]:
    """Feature maps at each side 4, 8, ..., resolution: channel_base / side, capped at channel_max."""
    if channel_base < resolution or channel_max < 1:
        raise ValueError(f"channel_base must be >= the resolution ({resolution}) and channel_max >= 1, "
                         f"got {channel_base} and {channel_max}")
    return {4 << d: min(channel_base // (4 << d), channel_max) for d in range(check_shape(resolution, 1) + 1)}


class MappingNetwork(nn.Module):
    """z [+ class id] -> w: pixel-normalised z (and label embedding), then `layers` dense lrelu layers."""

    def __init__(self, latent_dim: int, w_dim: int, n_classes: int, layers: int, lr_mul: float):
        super().__init__()
        if layers < 1:
            raise ValueError(f"mapping_layers must be >= 1, got {layers}")
        self.n_classes = n_classes
        self.embed = nn.Embedding(n_classes, latent_dim) if n_classes else None
        dims = [latent_dim * (2 if n_classes else 1)] + [w_dim] * layers
        self.net = nn.Sequential(*[EqLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims, dims[1:])])

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        _check_labels(self.n_classes, labels)
        x = pixel_norm(z)
        if self.embed is not None:  # normalised apart, so label and noise weigh the same whatever their scales
            x = torch.cat([x, pixel_norm(self.embed(labels).to(z.dtype))], 1)
        return self.net(x)


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int | None, out_channels: int, w_dim: int, resolution: int, channels: int):
        super().__init__()
        if in_channels is None:  # the 4x4 block: a learnt constant and one conv
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            layers = [SynthesisLayer(out_channels, out_channels, w_dim, 4, up=False)]
        else:
            self.const = None
            layers = [SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True),
                      SynthesisLayer(out_channels, out_channels, w_dim, resolution, up=False)]
        self.layers = nn.ModuleList(layers)
        self.to_rgb = ToRGB(out_channels, channels, w_dim)
        self.num_ws = len(layers) + 1


class SynthesisNetwork(nn.Module):
    """ws (N, num_ws, w_dim), one w per styled layer (convs and toRGBs, in order) -> images."""

    def __init__(self, w_dim: int, resolution: int, channels: int, channel_base: int, channel_max: int):
        super().__init__()
        nf = widths(resolution, channel_base, channel_max)
        sides = sorted(nf)
        self.blocks = nn.ModuleList([SynthesisBlock(nf[s // 2] if s > 4 else None, nf[s], w_dim, s, channels)
                                     for s in sides])
        self.num_ws = sum(b.num_ws for b in self.blocks)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random",
                generator: torch.Generator | None = None) -> torch.Tensor:
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"synthesis takes ws of shape (N, {self.num_ws}, w_dim), got {tuple(ws.shape)}")
        if noise_mode not in ("random", "const"):
            raise ValueError(f"noise_mode must be 'random' or 'const', got {noise_mode!r}")
        x, img, i = self.blocks[0].const[None].expand(len(ws), -1, -1, -1), None, 0
        for block in self.blocks:
            for layer in block.layers:
                x = layer(x, ws[:, i], noise_mode, generator)
                i += 1
            rgb = block.to_rgb(x, ws[:, i])
            i += 1
            img = rgb if img is None else upsample2d(img).to(rgb.dtype) + rgb  # skip architecture
        return img


class Generator(nn.Module):
    def __init__(self, resolution: int, channels: int, latent_dim: int, n_classes: int = 0,
                 channel_base: int = 16384, channel_max: int = 512, mapping_layers: int = 8,
                 w_dim: int | None = None, mapping_lr_mul: float = 0.01):
        super().__init__()
        check_shape(resolution, channels)
        self.resolution, self.channels, self.latent_dim, self.n_classes = resolution, channels, latent_dim, n_classes
        self.w_dim = w_dim or latent_dim
        self.mapping = MappingNetwork(latent_dim, self.w_dim, n_classes, mapping_layers, mapping_lr_mul)
        self.synthesis = SynthesisNetwork(self.w_dim, resolution, channels, channel_base, channel_max)
        self.num_ws = self.synthesis.num_ws

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, noise_mode: str = "random",
                generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, latent_dim) noise [+ (N,) class ids] -> (N, channels, resolution, resolution) images, not clamped.
        The per-pixel noise is drawn from `generator` ('random'), or is each layer's fixed map ('const':
        repeatable samples, e.g. for grids)."""
        w = self.mapping(z, labels)
        return self.synthesis(w[:, None].expand(-1, self.num_ws, -1), noise_mode, generator)


class DiscriminatorBlock(nn.Module):
    """Residual block at one side: (2x-down 1x1 skip + [3x3 conv, 2x-down 3x3 conv]) * sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqConv2d(in_channels, in_channels, 3)
        self.conv1 = EqConv2d(in_channels, out_channels, 3, down=True)
        self.skip = EqConv2d(in_channels, out_channels, 1, bias=False, activate=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class Discriminator(nn.Module):
    def __init__(self, resolution: int, channels: int, n_classes: int = 0, channel_base: int = 16384,
                 channel_max: int = 512, mbstd_group: int = 4):
        super().__init__()
        check_shape(resolution, channels)
        self.resolution, self.channels, self.n_classes, self.mbstd_group = resolution, channels, n_classes, mbstd_group
        nf = widths(resolution, channel_base, channel_max)
        self.from_rgb = EqConv2d(channels, nf[resolution], 1)
        self.blocks = nn.ModuleList([DiscriminatorBlock(nf[s], nf[s // 2]) for s in sorted(nf, reverse=True)[:-1]])
        self.conv = EqConv2d(nf[4] + 1, nf[4], 3)
        self.fc = EqLinear(nf[4] * 16, nf[4], activate=True)
        self.out = EqLinear(nf[4], 1)
        self.embed = nn.Embedding(n_classes, nf[4]) if n_classes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, channels, resolution, resolution) [+ (N,) class ids] -> (N,) logits (real > 0)."""
        _check_labels(self.n_classes, labels)
        if tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"D takes (N, {self.channels}, {self.resolution}, {self.resolution}) images, "
                             f"got {tuple(x.shape)}")
        h = self.from_rgb(x)
        for block in self.blocks:
            h = block(h)
        h = self.fc(self.conv(minibatch_stddev(h, self.mbstd_group)).flatten(1))
        logit = self.out(h).flatten()
        if self.embed is not None:  # projection, scaled like an equalised dense layer of fan-in width
            logit = logit + (self.embed(labels).to(h.dtype) * h).sum(1) / math.sqrt(h.shape[1])
        return logit


def _seen(x: torch.Tensor, augment: Augment | None) -> torch.Tensor:
    return x if augment is None else augment(x)


def r1_penalty(D: nn.Module, real: torch.Tensor, labels: torch.Tensor | None = None,
               augment: Augment | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E over reals of |d D(augment(x)) / dx|^2, D's logits on them), both keeping their graphs (the penalty's
    backward is a double backward). The gradient is taken with respect to the images before augmentation."""
    real = real.detach().requires_grad_(True)
    logits = D(_seen(real, augment), labels).float()
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean(), logits


class DLoss(NamedTuple):
    total: torch.Tensor                  # the scalar to backward
    real_logits: torch.Tensor            # (N,), detached: for ada.AdaptiveP.observe and logging
    fake_logits: torch.Tensor            # (N,), detached
    r1: torch.Tensor | None              # the unweighted R1 penalty, detached, on R1 steps; else None


def d_loss(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None = None, *,
           augment: Augment | None = None, r1_gamma: float = 0.0, do_r1: bool = False,
           r1_interval: int = 16) -> DLoss:
    """softplus(D(fake)) + softplus(-D(real)), means over the batch; on R1 steps (do_r1, r1_gamma > 0) plus
    r1_gamma / 2 * r1_interval * R1, the lazy weight that makes one penalty every r1_interval steps weigh what
    one every step would. fake is detached. Logits are upcast, so bf16 autocast leaves the losses in fp32."""
    if r1_interval < 1:
        raise ValueError(f"r1_interval must be >= 1, got {r1_interval}")
    fake_logits = D(_seen(fake.detach(), augment), labels).float()
    r1 = None
    if do_r1 and r1_gamma > 0:
        r1, real_logits = r1_penalty(D, real, labels, augment)
    else:
        real_logits = D(_seen(real, augment), labels).float()
    total = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
    if r1 is not None:
        total = total + r1 * (r1_gamma / 2 * r1_interval)
    return DLoss(total, real_logits.detach(), fake_logits.detach(), None if r1 is None else r1.detach())


def g_loss(D: nn.Module, fake: torch.Tensor, labels: torch.Tensor | None = None, *,
           augment: Augment | None = None) -> torch.Tensor:
    """Non-saturating loss of G: softplus(-D(augment(fake))), the mean over the batch."""
    return F.softplus(-D(_seen(fake, augment), labels).float()).mean()


class PathLengthPenalty(nn.Module):
    """Path-length regulariser of StyleGAN2: for y ~ N(0, I) / sqrt(H * W), the lengths |J_w^T y| of the
    gradient of <G(w), y> with respect to the per-layer ws (squared norm summed over w_dim, averaged over
    layers), pulled towards their running mean a (a <- lerp(a, mean length, decay), a buffer, so it is
    checkpointed with state_dict). Returns E[(length - a)^2]; the caller weighs it (pl_weight * interval).
    G needs `mapping(z, labels)`, `synthesis(ws, generator=)` and `num_ws`: pass the bare Generator, not a wrapper."""

    def __init__(self, decay: float = 0.01):
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"path-length decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.register_buffer("mean", torch.zeros(()))

    def forward(self, G: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The penalty on G(z, labels); its random directions y (and G's noise) come from `generator`."""
        ws = G.mapping(z, labels)[:, None].repeat(1, G.num_ws, 1)  # one copy per layer: a gradient per layer
        img = G.synthesis(ws, generator=generator)
        y = torch.randn(img.shape, device=img.device, dtype=img.dtype, generator=generator)
        y = y / math.sqrt(img.shape[2] * img.shape[3])
        (grad,) = torch.autograd.grad((img * y).sum(), ws, create_graph=True)
        lengths = grad.float().square().sum(2).mean(1).sqrt()
        with torch.no_grad():
            self.mean.lerp_(lengths.mean(), self.decay)
        return (lengths - self.mean).square().mean()


def make_optimizers(G: nn.Module, D: nn.Module, lr: float = 0.0025, betas: tuple[float, float] = (0.0, 0.99),
                    fused: bool = False) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and D with the papers' settings (fused: one kernel per step, for CUDA); (opt_g, opt_d).
    No lazy-regularisation correction of lr and betas: the regularisers ride on the main steps (module docstring)."""
    return (torch.optim.Adam(G.parameters(), lr=lr, betas=betas, eps=1e-8, fused=fused or None),
            torch.optim.Adam(D.parameters(), lr=lr, betas=betas, eps=1e-8, fused=fused or None))
