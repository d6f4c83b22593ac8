"""Checkpoint scores that replace the study's pick-by-eye: the sliced Wasserstein distance (SWD) on
Laplacian pyramids from the PGGAN paper, and the kernel inception distance (KID) in the feature space
of a small CNN trained here, since no pretrained Inception can be downloaded.

Image arguments take either stored images, uint8 (N, H, W, C) as ImageSet gives them (memory-maps
are fine), or model images, float (N, C, H, W) in [-1, 1] as the generators give them.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biomedsynth.store import ImageSet, load_weights

MIN_LEVEL_SIDE = 16  # the coarsest pyramid level, as in the PGGAN paper


def as_model_images(batch) -> torch.Tensor:
    """uint8 (N, H, W[, C]) stored images -> float (N, C, H, W) in [-1, 1]; float (N, C, H, W) passes as float32."""
    t = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.asarray(batch))
    if t.dtype == torch.uint8:
        t = t[..., None] if t.ndim == 3 else t
        return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if t.ndim != 4 or not t.is_floating_point():
        raise ValueError(f"images must be uint8 (N, H, W, C) or float (N, C, H, W), got {t.dtype} {tuple(t.shape)}")
    return t.float()


def _take(images, idx: np.ndarray):
    return images[torch.as_tensor(idx)] if isinstance(images, torch.Tensor) else images[idx]


# ---- sliced Wasserstein distance ----

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # 5-tap Gaussian of the paper's pyramid, /16 per axis


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5x5 binomial blur per channel, mirror borders, kernel summing to `gain`."""
    n, c, h, w = x.shape
    k = torch.tensor(_BINOMIAL, dtype=x.dtype, device=x.device) * (math.sqrt(gain) / 16.0)
    y = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    return y.reshape(n, c, h, w)


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _up(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    y = x.new_zeros(n, c, 2 * h, 2 * w)
    y[:, :, ::2, ::2] = x
    return _blur(y, 4.0)  # zeros fill 3 of 4 pixels, so the kernel sums to 4 to keep the brightness


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Float (N, C, H, W) -> `levels` maps at H, H/2, ...: band-pass details, the last one the low-pass rest."""
    if levels < 1 or min(images.shape[-2:]) >> (levels - 1) < 4:
        raise ValueError(f"cannot build {levels} pyramid levels from {tuple(images.shape[-2:])} images")
    gauss = [images]
    for _ in range(levels - 1):
        gauss.append(_down(gauss[-1]))
    return [a - _up(b) for a, b in zip(gauss, gauss[1:])] + [gauss[-1]]


def _descriptors(images, centres: list[torch.Tensor], nhood_size: int, batch_size: int,
                 device: torch.device) -> list[torch.Tensor]:
    """Per pyramid level, the (N * K, k, k, C) neighbourhoods around `centres` [(N, K, 2) (y, x) per level]."""
    offsets = torch.arange(nhood_size, device=device) - nhood_size // 2
    out = [[] for _ in centres]
    for start in range(0, len(images), batch_size):
        x = as_model_images(images[start:start + batch_size]).to(device)
        b = torch.arange(len(x), device=device)[:, None, None, None]
        for level, band in enumerate(laplacian_pyramid(x, len(centres))):
            c = centres[level][start:start + len(x)].to(device)
            ys, xs = c[..., 0, None] + offsets, c[..., 1, None] + offsets  # (B, K, k)
            out[level].append(band.permute(0, 2, 3, 1)[b, ys[..., :, None], xs[..., None, :]])
    return [torch.cat(o).flatten(0, 1) for o in out]


def _sort_columns(x: torch.Tensor) -> torch.Tensor:
    """Each column of (N, D) sorted; on the CPU through numpy, whose sort is ~4x faster than torch's there."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.T.numpy(), axis=1)).T
    return x.sort(0).values


def sliced_wasserstein(real, fake, nhoods_per_image: int = 128, nhood_size: int = 7, dirs_per_repeat: int = 128,
                       dir_repeats: int = 4, seed: int = 0, per_set_norm: bool = False,
                       batch_size: int = 64) -> tuple[list[float], float]:
    """SWD between two equal-sized image sets on each Laplacian pyramid level down to 16 px.

    From every level, `nhoods_per_image` random 7x7 neighbourhoods per image are normalised per colour
    channel, projected onto dir_repeats x dirs_per_repeat random unit directions, sorted, and the mean
    |difference| of the sorted projections taken. Returns (per-level list, finest first; their mean).
    Lower is better; the paper's tables print these x 1e3.

    Both sets use the same neighbourhood positions and directions (drawn from `seed`), so identical
    sets score exactly 0 and repeated calls give the same number. Descriptors are normalised by the
    real set's mean/std, so a change of brightness or contrast counts; per_set_norm=True normalises
    each set by its own statistics as the paper's code does, which makes SWD blind to such changes.
    Computes on the device of a tensor argument, else on the CPU.
    """
    if len(real) != len(fake) or len(real) == 0:
        raise ValueError(f"SWD needs two non-empty sets of the same size, got {len(real)} real and {len(fake)} fake")
    shape_r, shape_f = as_model_images(real[:1]).shape, as_model_images(fake[:1]).shape
    if shape_r != shape_f:
        raise ValueError(f"real and fake images differ in shape: {tuple(shape_r[1:])} vs {tuple(shape_f[1:])}")
    side = shape_r[-1]
    if shape_r[-2] != side or side < MIN_LEVEL_SIDE or side & (side - 1):
        raise ValueError(f"SWD needs square images with a power-of-two side >= {MIN_LEVEL_SIDE}, got {tuple(shape_r[-2:])}")
    device = next((t.device for t in (fake, real) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    levels = int(math.log2(side // MIN_LEVEL_SIDE)) + 1
    rng = np.random.default_rng(seed)
    half = nhood_size // 2
    centres = [torch.from_numpy(rng.integers(half, (side >> lv) - half, size=(len(real), nhoods_per_image, 2)))
               for lv in range(levels)]
    desc_real = _descriptors(real, centres, nhood_size, batch_size, device)
    desc_fake = _descriptors(fake, centres, nhood_size, batch_size, device)

    def normalise(d: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        mean, std = ref.mean((0, 1, 2)), ref.std((0, 1, 2), unbiased=False).clamp_min(1e-8)
        return ((d - mean) / std).flatten(1)

    per_level = []
    for a, b in zip(desc_real, desc_fake):
        a, b = normalise(a, a), normalise(b, b if per_set_norm else a)
        dists = []
        for _ in range(dir_repeats):
            dirs = torch.from_numpy(rng.standard_normal((a.shape[1], dirs_per_repeat), dtype=np.float32)).to(device)
            dirs /= dirs.norm(dim=0, keepdim=True)
            dists.append((_sort_columns(a @ dirs) - _sort_columns(b @ dirs)).abs().mean())
        per_level.append(torch.stack(dists).mean().item())
    return per_level, float(np.mean(per_level))


# ---- trivial imitations: what a generator that learnt nothing scores ----

def noise_images(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Pixel-wise Gaussian noise with each channel's mean and std of `like` (float model images), clamped to
    [-1, 1]: an imitation that got the colours right and nothing else (a GAN drawing checkerboard noise)."""
    g = torch.Generator().manual_seed(seed)
    mean, std = like.mean((0, 2, 3), keepdim=True), like.std((0, 2, 3), keepdim=True)
    noise = torch.randn(like.shape, generator=g).to(like.device)
    return (mean + std * noise).clamp(-1, 1)


def blurred(images: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Float model images area-downsampled `factor` times and bilinearly upsampled back: the layout and
    colours of real images without any of their detail (a GAN that drew only smudges)."""
    side = images.shape[-1]
    small = F.interpolate(images, size=max(1, side // factor), mode="area")
    return F.interpolate(small, size=side, mode="bilinear", align_corners=False)


# ---- kernel inception distance ----

def kid(real_feats, fake_feats, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, over `n_subsets` random subsets of
    min(subset_size, len(real), len(fake)) features from each set. Returns (mean, std) over subsets;
    ~0 (may be slightly negative) for one distribution, larger the further apart the two are."""
    x, y = np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"KID needs (N, D) feature arrays of the same D, got {x.shape} and {y.shape}")
    m, d = min(subset_size, len(x), len(y)), x.shape[1]
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(x)} real and {len(y)} fake")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_subsets):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
        off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off_diag - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


class FeatureNet(nn.Module):
    """A small CNN classifier; `features` (its globally pooled last conv layer) is the space KID is measured in.

    Inputs of any side are resized to `input_size` first, so one net serves 32 to 512 px images.
    `config` holds the constructor arguments, to save next to the state dict.
    """

    def __init__(self, channels: int, n_classes: int, width: int = 16, input_size: int = 64):
        super().__init__()
        self.config = dict(channels=channels, n_classes=n_classes, width=width, input_size=input_size)
        layers, c = [], channels
        for w in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(True), nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)
        self.input_size = input_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Float (N, C, H, W) in [-1, 1] -> (N, 8 * width) features."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_feature_net(images, labels, epochs: int = 5, batch_size: int = 64, lr: float = 2e-3, width: int = 16,
                      input_size: int = 64, seed: int = 0, device: str = "cpu", augment=None) -> FeatureNet:
    """Train a FeatureNet as a classifier of the real images' labels: (N,) values of one attribute, or (N, A)
    values of A attributes (e.g. sex and age bin), each with its own block of output logits (its head; class
    ids follow np.unique's order) and its own cross-entropy, summed. Any hashable values, at least two per
    attribute. `images` are stored or model images indexable by an index array (a tensor, an array, a
    memory-map); `augment(x, rng)`, when given, transforms each float (N, C, H, W) batch, so the features
    learn what a label looks like, not where it sits. Returns the net in eval mode."""
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"train_feature_net: {len(labels)} labels for {n} images")
    columns = np.asarray(labels).reshape(n, -1).T  # one row per attribute
    classes, targets = zip(*(np.unique(c, return_inverse=True) for c in columns))
    if min(len(c) for c in classes) < 2:
        raise ValueError(f"train_feature_net needs at least 2 values per label to tell apart, got "
                         f"{[c.tolist() for c in classes]}")
    targets = [torch.from_numpy(t) for t in targets]
    heads = [len(c) for c in classes]
    channels = as_model_images(images[:1]).shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(channels, sum(heads), width, input_size).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = np.sort(order[start:start + batch_size])  # sorted reads are kinder to memory-maps
            x = as_model_images(_take(images, idx)).to(device)
            if augment is not None:
                x = augment(x, rng)
            logits = net(x).split(heads, 1)
            loss = sum(F.cross_entropy(z, t[idx].to(device)) for z, t in zip(logits, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def save_feature_net(net: FeatureNet, path, **info) -> None:
    """Save the net's config and weights, plus `info` (e.g. its heads and the image side it was trained at),
    via a temporary name, so a killed run never leaves a half-written net that a GAN stage would load. The
    same weights give the same bytes whatever the file's name (torch.save names its archive after the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"config": net.config, "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "info": info},
               buf)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_feature_net(path, device="cpu") -> FeatureNet:
    """The FeatureNet saved at `path` (e.g. models/feature_net/<modality>.pt), in eval mode on `device`;
    what it was saved with beyond its weights is in `net.info`."""
    ck = load_weights(path)
    net = FeatureNet(**ck["config"])
    net.load_state_dict(ck["state_dict"])
    net.info = ck["info"]
    return net.to(device).eval()


@torch.no_grad()
def extract_features(net: FeatureNet, images, batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 features of stored or model images, for `kid`."""
    net.eval()
    device = next(net.parameters()).device
    out = [net.features(as_model_images(images[s:s + batch_size]).to(device)).float().cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def read_batch(images: ImageSet, idx: np.ndarray, resolution: int) -> torch.Tensor:
    """Stored images at idx (in that order) -> float (N, C, resolution, resolution) in [-1, 1], area-downsampled."""
    x = as_model_images(np.stack([images[int(i)] for i in idx]))
    return F.interpolate(x, size=resolution, mode="area") if x.shape[-1] != resolution else x
