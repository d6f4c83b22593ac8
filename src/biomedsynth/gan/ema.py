"""The sampling generator: an exponential moving average of G's weights, its memory a half-life in images.

A fixed decay per step says nothing about how much of training the average holds: 0.999 over a 170-step
growth phase keeps 16% of what the phase learnt. A half-life in images (stylegan2-ada's ema_kimg) does:
after a phase of P images the average holds 1 - 0.5 ** (P / half_life) of it. The ramp-up caps the
half-life at `rampup` times the images seen so far, so the first steps are not averaged with the random
initial weights for thousands of images.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# a quarter of a phase keeps 1 - 0.5 ** 4 = 93.75% of it; 10,000 images is stylegan2-ada's at batch 32
PHASE_QUARTERS = 4
DEFAULT_HALF_LIFE = 10_000
MIN_PHASE_SHARE = 0.9


def beta(batch_images: int, half_life: float, rampup: float | None, images_seen: int) -> float:
    """The decay of one step of batch_images taken after images_seen images."""
    if rampup:
        half_life = min(half_life, rampup * images_seen)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


def half_life_for(phase_images: int, configured: float | None) -> float:
    """The configured half-life, or (None) the default one shortened to a quarter of a phase."""
    return configured if configured is not None else min(DEFAULT_HALF_LIFE, phase_images / PHASE_QUARTERS)


def phase_shares(phases: list[tuple[str, int, int]], batch_images: int, half_life: float,
                 rampup: float | None) -> dict[str, float]:
    """Per phase (name, first image, end image): the share of the sampled generator's weights that come
    from the steps of that phase at its end, 1 - prod(beta) over them."""
    shares = {}
    for name, start, end in phases:
        kept = 1.0  # the share of the weights from before the phase
        for seen in range(start, end, batch_images):
            kept *= beta(batch_images, half_life, rampup, seen)
        shares[name] = 1.0 - kept
    return shares


class EMA:
    """`ema.model` is a frozen copy of G; `ema.update(G, images_seen, batch_images)` after every G step
    (the bare module, not a wrapper). Buffers are copied, not averaged."""

    def __init__(self, G: nn.Module, half_life: float, rampup: float | None):
        self.half_life, self.rampup = half_life, rampup
        self.model = copy.deepcopy(G).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, G: nn.Module, images_seen: int, batch_images: int) -> None:
        weight = 1.0 - beta(batch_images, self.half_life, self.rampup, images_seen)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in G.parameters()], weight)
        for b_ema, b in zip(self.model.buffers(), G.buffers(), strict=True):
            b_ema.copy_(b)
