"""Adaptive discriminator augmentation (Karras et al. 2020, "Training Generative Adversarial Networks with
Limited Data"): every image D sees, real or fake, goes through the same random, differentiable augmentations,
each applied to each image with probability p, and p follows how much D overfits the reals.

AugmentPipe: x-flip, y-flip, 90-degree rotations, integer translation (one exact pixel gather), isotropic
scaling (bilinear grid_sample, reflection padding), brightness and contrast. As in the paper an applied flip
or rotation is drawn uniformly from its group, identity included (a flip happens with probability p / 2), so
the identity stays the most likely outcome at every p < 1 and the augmentations do not leak into G's outputs.
Which transforms a modality allows is `for_modality`: histology tiles have no up or down, so they get y-flips
and rotations; chest X-rays have an anatomical orientation, so they get neither.

AdaptiveP: r_t = E[sign(D(augmented real))] over `interval` D steps; then
p <- clamp(p + sign(r_t - target) * images / speed_images, 0, 1), images being those of the interval.
The sums stay on the device (no host sync per step); p is a 0-dim device tensor updated in place, so
`pipe.p = ada.p` once keeps the pipe current.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

PADDINGS = ("reflect", "wrap")
MODALITIES = {"xray": dict(yflip=0.0, rotate90=0.0), "histology": dict(yflip=1.0, rotate90=1.0)}


@dataclass
class AugmentPipe:
    """Call it on (N, C, S, S) images in [-1, 1]; gradients flow to the input.

    p is the probability each transform is applied to an image (a float, or a 0-dim tensor such as
    AdaptiveP.p); each transform's flag multiplies it (0 turns it off). Defaults: the paper's 'bgc' strengths
    restricted to the transforms listed in the module docstring, without y-flip and rotations."""
    p: float | torch.Tensor = 0.0
    xflip: float = 1.0
    yflip: float = 0.0
    rotate90: float = 0.0
    translate: float = 1.0
    scale: float = 1.0
    brightness: float = 1.0
    contrast: float = 1.0
    translate_max: float = 0.125  # of the side, uniform in +-, rounded to whole pixels
    scale_std: float = 0.2        # of log2(scale): lognormal with sigma 0.2 ln 2
    brightness_std: float = 0.2   # added, N(0, std)
    contrast_std: float = 0.5     # of log2(contrast), multiplied around 0 (mid-grey in [-1, 1])
    padding: str = "reflect"      # how translation fills the border: 'reflect' or 'wrap'

    def __post_init__(self):
        if not torch.is_tensor(self.p) and not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augment p must be in [0, 1], got {self.p}")
        for name in ("xflip", "yflip", "rotate90", "translate", "scale", "brightness", "contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.translate_max <= 0.5:
            raise ValueError(f"augment translate_max must be in [0, 0.5] of the side, got {self.translate_max}")
        if min(self.scale_std, self.brightness_std, self.contrast_std) < 0:
            raise ValueError("augment scale_std, brightness_std and contrast_std must be >= 0")
        if self.padding not in PADDINGS:
            raise ValueError(f"augment padding must be one of {PADDINGS}, got {self.padding!r}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x augmented, with every random draw from `generator` (bind it with functools.partial to pass the
        pipe as sg2ada's `augment`)."""
        if x.ndim != 4 or x.shape[2] != x.shape[3]:
            raise ValueError(f"augment takes square (N, C, S, S) images, got {tuple(x.shape)}")
        p = torch.as_tensor(self.p, dtype=torch.float32, device=x.device)
        n, dev = len(x), x.device

        def uniform(*shape: int) -> torch.Tensor:
            return torch.rand(shape, device=dev, generator=generator)

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(shape, device=dev, generator=generator)

        def applied(flag: float) -> torch.Tensor:  # (N,) bool: this transform is applied to this image
            return uniform(n) < p * flag

        if self.xflip or self.yflip or self.rotate90 or self.translate:
            x = self._move_pixels(x, applied, uniform)
        if self.scale:
            s = torch.exp2(normal(n) * self.scale_std)
            chosen = applied(self.scale)
            theta = torch.zeros(n, 2, 3, device=dev)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s  # output point u samples the input at u / s: zoom by s
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            scaled = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            x = torch.where(chosen[:, None, None, None], scaled, x)  # exact for the images left alone
        if self.brightness:
            b = normal(n) * self.brightness_std * applied(self.brightness)
            x = x + b[:, None, None, None].to(x.dtype)
        if self.contrast:
            c = torch.where(applied(self.contrast), torch.exp2(normal(n) * self.contrast_std), 1.0)
            x = x * c[:, None, None, None].to(x.dtype)
        return x

    def _move_pixels(self, x: torch.Tensor, applied, uniform) -> torch.Tensor:
        """Flips, 90-degree rotations and integer translation as one gather of whole pixels (exact)."""
        n, c, side, _ = x.shape
        dev = x.device
        # doubled coordinates about the centre: pixel k sits at 2k - (side - 1), so flips and rotations are integer
        ax = torch.arange(side, device=dev) * 2 - (side - 1)
        u, v = ax[None, None, :].expand(n, side, side), ax[None, :, None].expand(n, side, side)  # column, row

        def per_image(t: torch.Tensor) -> torch.Tensor:
            return t[:, None, None]

        if self.xflip:
            u = torch.where(per_image(applied(self.xflip) & (uniform(n) < 0.5)), -u, u)
        if self.yflip:
            v = torch.where(per_image(applied(self.yflip) & (uniform(n) < 0.5)), -v, v)
        if self.rotate90:
            quarter_turns = per_image((uniform(n) * 4).long() * applied(self.rotate90))
            for k, (uk, vk) in enumerate([(-v, u), (-u, -v), (v, -u)], start=1):
                u, v = torch.where(quarter_turns == k, uk, u), torch.where(quarter_turns == k, vk, v)
        if self.translate:
            shift = torch.round((uniform(n, 2) * 2 - 1) * self.translate_max * side).long()
            shift = shift * applied(self.translate)[:, None]
            u, v = u - 2 * per_image(shift[:, 0]), v - 2 * per_image(shift[:, 1])
        col, row = self._border((u + side - 1) // 2, side), self._border((v + side - 1) // 2, side)
        index = (row * side + col).reshape(n, 1, side * side).expand(n, c, side * side)
        return x.reshape(n, c, side * side).gather(2, index).reshape(n, c, side, side)

    def _border(self, k: torch.Tensor, side: int) -> torch.Tensor:
        """Pixel indices outside 0..side-1 mapped back in: wrapped around, or mirrored without repeating the edge."""
        if self.padding == "wrap":
            return k % side
        k = k % (2 * side - 2)
        return torch.where(k < side, k, 2 * side - 2 - k)


def for_modality(modality: str, **overrides) -> AugmentPipe:
    """The augmentations a modality allows (see the module docstring), with any field overridden."""
    if modality not in MODALITIES:
        raise ValueError(f"augment modality must be one of {sorted(MODALITIES)}, got {modality!r}")
    return AugmentPipe(**{**MODALITIES[modality], **overrides})


class AdaptiveP:
    """The ADA controller. Call `observe(real_logits)` after every D step with D's logits on the augmented
    reals (sg2ada.DLoss.real_logits); every `interval` calls it sets r_t and moves p by
    sign(r_t - target) * images / speed_images. Under torch.distributed the interval's sums are all-reduced
    first, so every rank keeps the same p; `sync=False` where each rank trains a model of its own. r_t is nan
    until the first interval ends."""

    def __init__(self, target: float = 0.6, interval: int = 4, speed_images: int = 500_000, p: float = 0.0,
                 device: torch.device | str = "cpu", sync: bool = True):
        if not 0.0 < target < 1.0:
            raise ValueError(f"ada target must be in (0, 1), got {target}")
        if interval < 1 or speed_images < 1:
            raise ValueError(f"ada interval and speed_images must be >= 1, got {interval} and {speed_images}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ada p must be in [0, 1], got {p}")
        self.target, self.interval, self.speed_images, self.sync = target, interval, speed_images, sync
        self.device = torch.device(device)
        self.p = torch.tensor(float(p), device=self.device)
        self.r_t = torch.tensor(math.nan, device=self.device)
        self._signs = torch.zeros((), device=self.device)  # sum of sign(logit) over the interval so far
        self._images, self._steps = 0, 0

    def observe(self, real_logits: torch.Tensor) -> None:
        self._signs += real_logits.detach().float().sign().sum().to(self.device)
        self._images += real_logits.numel()
        self._steps += 1
        if self._steps == self.interval:
            self._adjust()

    def _adjust(self) -> None:
        sums = torch.stack([self._signs, torch.tensor(float(self._images), device=self.device)])
        if self.sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        signs, images = sums.unbind()
        self.r_t.copy_(signs / images)
        self.p.copy_((self.p + torch.sign(self.r_t - self.target) * images / self.speed_images).clamp(0.0, 1.0))
        self._signs.zero_()
        self._images, self._steps = 0, 0

    def state_dict(self) -> dict:
        return {"p": self.p.cpu().clone(), "r_t": self.r_t.cpu().clone(), "signs": self._signs.cpu().clone(),
                "images": self._images, "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore p, r_t and the half-accumulated interval, so a resumed run moves p exactly as an unbroken one."""
        self.p.copy_(state["p"])
        self.r_t.copy_(state["r_t"])
        self._signs.copy_(state["signs"])
        self._images, self._steps = int(state["images"]), int(state["steps"])
