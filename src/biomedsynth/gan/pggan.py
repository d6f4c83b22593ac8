"""PGGAN (Karras et al. 2018): progressive growing from 4x4 with fade-in, equalised learning rate,
pixel norm, minibatch standard deviation and the WGAN-GP loss.

Both networks hold every resolution's layers from the start; `depth` picks how many are used
(0 -> 4x4, k -> 4 * 2**k) and `alpha` fades the newest block in. Conditional models (n_classes > 0)
join a label embedding to the latent before G's first pixel norm and add a projection term to D.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.gan import doublings

SQRT2 = math.sqrt(2.0)


def check_shape(resolution: int, channels: int) -> int:
    return doublings(resolution, channels, 8, 1024)


class EqLinear(nn.Module):
    """Linear layer with equalised learning rate: weight stored N(0, 1), scaled by gain/sqrt(fan_in) at run time."""

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


class EqConv2d(nn.Module):
    """'Same'-padded convolution with equalised learning rate; fan_in = in_channels * k * k."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, gain: float = SQRT2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel_size * kernel_size)
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each pixel's feature vector (dim 1) to unit root-mean-square, in x's dtype: autocast would run
    rsqrt in fp32 and hand the next conv an fp32 tensor to cast back (the reduction accumulates in fp32)."""
    with torch.autocast(x.device.type, enabled=False):
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + eps)


def upsample_conv(x: torch.Tensor, conv: EqConv2d) -> torch.Tensor:
    """conv(nearest 2x upsampling of x) as one stride-2 transposed conv, the same sums in 4/9 of the
    multiply-adds. Output row 2i sees input rows i-1 (tap -1) and i (taps 0 and 1), row 2i+1 rows i (taps -1
    and 0) and i+1 (tap 1): the 3x3 kernel folds into a 4x4 one whose taps are sums of adjacent 3x3 taps."""
    w = F.pad(conv.weight * conv.scale, (1, 1, 1, 1))
    w = w[..., 1:, 1:] + w[..., :-1, 1:] + w[..., 1:, :-1] + w[..., :-1, :-1]
    return F.conv_transpose2d(x, w.transpose(0, 1).flip(2, 3), conv.bias, stride=2, padding=1)


def minibatch_stddev(x: torch.Tensor, group_size: int = 4) -> torch.Tensor:
    """Append one feature map: the std over each group of samples, averaged over features and pixels.

    Groups are strided as in the paper's code (sample i is in group i % (N // G)). The batch must be a
    multiple of the group size (use drop_last=True in the loader).
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch stddev: batch size {n} is not a multiple of the group size {g}; use drop_last")
    y = x.float().reshape(g, n // g, c, h, w)
    std = (y.var(0, unbiased=False) + 1e-8).sqrt().mean((1, 2, 3))  # (N // G,)
    return torch.cat([x, std.to(x.dtype).repeat(g)[:, None, None, None].expand(n, 1, h, w)], 1)


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class Generator(nn.Module):
    def __init__(self, resolution: int, channels: int, latent_dim: int, n_classes: int = 0,
                 fmap_base: int = 8192, fmap_max: int = 512):
        super().__init__()
        self.max_depth = check_shape(resolution, channels)
        self.resolution, self.channels, self.latent_dim, self.n_classes = resolution, channels, latent_dim, n_classes
        # width at depth d (side 4 * 2**d), the paper's min(fmap_base / 2**stage, fmap_max) with stage = d + 1
        nf = [min(fmap_base // (2 << d), fmap_max) for d in range(self.max_depth + 1)]
        self.embed = nn.Embedding(n_classes, latent_dim) if n_classes else None  # N(0, 1) rows, like z
        self.dense = EqLinear(latent_dim * (2 if n_classes else 1), nf[0] * 16, gain=SQRT2 / 4)  # the paper's gain
        self.conv4 = EqConv2d(nf[0], nf[0], 3)
        self.blocks = nn.ModuleList([  # blocks[d - 1] grows depth d - 1 into depth d
            nn.ModuleList([EqConv2d(nf[d - 1], nf[d], 3), EqConv2d(nf[d], nf[d], 3)]) for d in range(1, self.max_depth + 1)])
        self.to_rgb = nn.ModuleList([EqConv2d(nf[d], channels, 1, gain=1.0) for d in range(self.max_depth + 1)])

    def block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        """Depth d's block: nearest 2x upsampling, two 3x3 convs, each followed by LeakyReLU and pixel norm."""
        up, conv = self.blocks[d - 1]
        return pixel_norm(_act(conv(pixel_norm(_act(upsample_conv(x, up))))))

    def features(self, z: torch.Tensor, labels: torch.Tensor | None, depth: int) -> torch.Tensor:
        """The feature map at 4 * 2**depth before toRGB."""
        if self.embed is not None:
            if labels is None:
                raise ValueError(f"this model is conditional on {self.n_classes} classes: pass labels")
            z = torch.cat([z, self.embed(labels).to(z.dtype)], 1)
        x = self.dense(pixel_norm(z)).reshape(len(z), -1, 4, 4)
        x = pixel_norm(_act(self.conv4(pixel_norm(_act(x)))))
        for d in range(1, depth + 1):
            x = self.block(d, x)
        return x

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, depth: int | None = None,
                alpha: float = 1.0) -> torch.Tensor:
        """(N, latent_dim) noise [+ (N,) class ids] -> (N, channels, 4 * 2**depth, same) images, not clamped.

        depth defaults to the final one. For 0 < alpha < 1 the output is lerp(old, new, alpha), where old is
        the previous depth's image upsampled 2x and new the newest block's; alpha 0 and 1 give them exactly.
        """
        depth = self.max_depth if depth is None else _check_depth(depth, self.max_depth)
        if depth == 0:
            return self.to_rgb[0](self.features(z, labels, 0))
        x = self.features(z, labels, depth - 1)
        new = self.to_rgb[depth](self.block(depth, x))
        if alpha >= 1.0:
            return new
        old = F.interpolate(self.to_rgb[depth - 1](x), scale_factor=2, mode="nearest")
        return fade(old, new, alpha)


class Discriminator(nn.Module):
    def __init__(self, resolution: int, channels: int, n_classes: int = 0,
                 fmap_base: int = 8192, fmap_max: int = 512, mbstd_group: int = 4):
        super().__init__()
        self.max_depth = check_shape(resolution, channels)
        self.resolution, self.channels, self.n_classes, self.mbstd_group = resolution, channels, n_classes, mbstd_group
        nf = [min(fmap_base // (2 << d), fmap_max) for d in range(self.max_depth + 1)]
        self.from_rgb = nn.ModuleList([EqConv2d(channels, nf[d], 1) for d in range(self.max_depth + 1)])
        self.blocks = nn.ModuleList([  # blocks[d - 1] takes depth d down to depth d - 1
            nn.ModuleList([EqConv2d(nf[d], nf[d], 3), EqConv2d(nf[d], nf[d - 1], 3)]) for d in range(1, self.max_depth + 1)])
        self.conv4 = EqConv2d(nf[0] + 1, nf[0], 3)
        self.dense = EqLinear(nf[0] * 16, nf[0])
        self.out = EqLinear(nf[0], 1, gain=1.0)
        self.embed = nn.Embedding(n_classes, nf[0]) if n_classes else None

    def block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        """Depth d's block: two 3x3 convs with LeakyReLU, then 2x2 average pooling."""
        for conv in self.blocks[d - 1]:
            x = _act(conv(x))
        return F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, depth: int | None = None,
                alpha: float = 1.0) -> torch.Tensor:
        """(N, channels, 4 * 2**depth, same) [+ (N,) class ids] -> (N,) scores (real higher).

        For alpha < 1 the newest block's output is lerped with the previous fromRGB applied to the
        2x average-pooled input, so alpha 0 gives exactly the previous depth's D on the pooled images.
        """
        depth = self.max_depth if depth is None else _check_depth(depth, self.max_depth)
        if x.shape[-1] != 4 << depth or x.shape[-2] != 4 << depth:
            raise ValueError(f"D at depth {depth} takes {4 << depth}x{4 << depth} images, got {tuple(x.shape[-2:])}")
        h = _act(self.from_rgb[depth](x))
        if depth > 0:
            h = self.block(depth, h)
            if alpha < 1.0:
                h = fade(_act(self.from_rgb[depth - 1](F.avg_pool2d(x, 2))), h, alpha)
            for d in range(depth - 1, 0, -1):
                h = self.block(d, h)
        h = _act(self.conv4(minibatch_stddev(h, self.mbstd_group)))
        h = _act(self.dense(h.flatten(1)))
        score = self.out(h).flatten()
        if self.embed is not None:
            if labels is None:
                raise ValueError(f"this model is conditional on {self.n_classes} classes: pass labels")
            # projection scaled like an equalised linear layer of fan-in nf[0]
            score = score + (self.embed(labels) * h).sum(1) / math.sqrt(h.shape[1])
        return score


def fade(old: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """lerp(old, new, alpha), exact at alpha 0 and 1, in new's dtype: under CUDA bf16 autocast the two paths of
    a fade-in can come out in different dtypes (fp32 upsampling vs a bf16 conv), which lerp refuses."""
    return torch.lerp(old.to(new.dtype), new, float(alpha))


def _check_depth(depth: int, max_depth: int) -> int:
    if not 0 <= depth <= max_depth:
        raise ValueError(f"depth must be in 0..{max_depth}, got {depth}")
    return int(depth)


def fade_reals(images: torch.Tensor, depth: int, alpha: float) -> torch.Tensor:
    """Real images as D must see them at (depth, alpha): average-pooled to 4 * 2**depth, and during a
    fade-in blended with their 2x blockier version, so reals fade in the way G's outputs do."""
    side = 4 << depth
    if images.shape[-1] % side or images.shape[-1] < side:
        raise ValueError(f"images of side {images.shape[-1]} cannot be pooled to {side}")
    x = F.avg_pool2d(images, images.shape[-1] // side) if images.shape[-1] != side else images
    if depth == 0 or alpha >= 1.0:
        return x
    return fade(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest"), x, alpha)


def d_loss(D: Discriminator, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor | None = None,
           depth: int | None = None, alpha: float = 1.0, gp_weight: float = 10.0, drift: float = 0.001,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(WGAN-GP critic loss, mean gradient norm at the interpolates or None): E[D(fake)] - E[D(real)]
    + gp_weight * E[(|grad D(x_hat)| - 1)^2] + drift * E[D(real)^2]; gp_weight 0 skips the penalty (a lazy
    penalty runs it every k-th step with weight k * lambda).

    x_hat are random interpolates of real and (detached) fake, drawn from `generator`; the penalty is
    differentiated again (create_graph), so the backward pass is a double backward. Scores are upcast for
    bf16 autocast. The gradient norm says how near D stays to 1-Lipschitz.
    """
    fake = fake.detach()
    real_score = D(real, labels, depth, alpha).float()
    fake_score = D(fake, labels, depth, alpha).float()
    loss = fake_score.mean() - real_score.mean() + drift * real_score.square().mean()
    if not gp_weight:
        return loss, None
    eps = torch.rand(len(real), 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    x_hat = torch.lerp(real, fake.to(real.dtype), eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat, labels, depth, alpha).float().sum(), x_hat, create_graph=True)
    norm = grad.float().flatten(1).norm(dim=1)
    return loss + gp_weight * (norm - 1.0).square().mean(), norm.detach().mean()


def g_loss(D: Discriminator, fake: torch.Tensor, labels: torch.Tensor | None = None,
           depth: int | None = None, alpha: float = 1.0) -> torch.Tensor:
    """WGAN generator loss: -E[D(fake)]."""
    return -D(fake, labels, depth, alpha).float().mean()


def make_optimizers(G: nn.Module, D: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.0, 0.99),
                    fused: bool = False) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G and D with the paper's settings (fused: one kernel per step, for CUDA); (opt_g, opt_d)."""
    return (torch.optim.Adam(G.parameters(), lr=lr, betas=betas, eps=1e-8, fused=fused or None),
            torch.optim.Adam(D.parameters(), lr=lr, betas=betas, eps=1e-8, fused=fused or None))


@dataclass(frozen=True)
class PhaseSchedule:
    """Images seen -> (depth, alpha), a pure function so training can resume at any image count.

    Depth 0 trains (stabilises) for first_phase_images (default images_per_phase); every later depth first
    fades its block in (alpha rising linearly from 0 to 1 over images_per_phase) and then stabilises
    (alpha 1) for images_per_phase more. After the last depth's fade-in it stays at (max_depth, 1.0).
    """
    resolution: int
    images_per_phase: int
    first_phase_images: int | None = None

    def __post_init__(self):
        check_shape(self.resolution, 1)
        if self.images_per_phase <= 0 or (self.first_phase_images or 1) <= 0:
            raise ValueError(f"phases must last a positive number of images, got {self.images_per_phase} "
                             f"(first {self.first_phase_images})")

    @property
    def max_depth(self) -> int:
        return int(math.log2(self.resolution)) - 2

    @property
    def first(self) -> int:
        return self.first_phase_images or self.images_per_phase

    @property
    def growth_images(self) -> int:
        """Images until the final depth is fully faded in (its stabilising phase starts here)."""
        return self.first + self.images_per_phase * (2 * self.max_depth - 1)

    def __call__(self, images_seen: int) -> tuple[int, float]:
        if images_seen < 0:
            raise ValueError(f"images_seen must be >= 0, got {images_seen}")
        p = self.images_per_phase
        if images_seen < self.first:
            return 0, 1.0
        depth, into = divmod(images_seen - self.first, 2 * p)  # each later depth: fade (p) then stabilise (p)
        if depth + 1 > self.max_depth:
            return self.max_depth, 1.0
        return depth + 1, min(into / p, 1.0)

    def phases(self, total_images: int) -> list[tuple[str, int, int]]:
        """(name, first image, end image) of each phase of a run of total_images: '4 px', 'fade 8 px', '8 px', ..."""
        out, start = [("4 px", 0, self.first)], self.first
        for depth in range(1, self.max_depth + 1):
            side, p = 4 << depth, self.images_per_phase
            stable_end = total_images if depth == self.max_depth else start + 2 * p
            out += [(f"fade {side} px", start, start + p), (f"{side} px", start + p, stable_end)]
            start += 2 * p
        return out
