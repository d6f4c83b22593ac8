"""The built-in lymph-node H&E phantom: Camelyon16-style whole-slide images (see shared/PHANTOMS.md).

A slide is rendered as two stain concentration maps, hematoxylin H and eosin E, turned into colour by
Beer-Lambert: RGB = 255 exp(-(H h + E e + glass)), with per-slide stain vectors h, e from one of two
"centres" plus jitter, so colour varies between slides of either class and does not tell them apart.
Structure: an irregular node (capsule, subcapsular sinus, follicles with pale germinal centres in dark
mantles, paracortex, medulla with sinus channels) on white glass with dust and pen marks near the edges.
Tumour slides add a few metastases: cohesive nests of large, pleomorphic, vesicular nuclei with
nucleoli and pink cytoplasm, in pink desmoplastic stroma; their outlines go to ASAP XML, with
normal islands inside a tumour as exclusion polygons (Camelyon16's group _2).

Large shapes live on fields LOW times coarser than the slide and are upsampled; cells are sprites
(one small array per nucleus, computed for all nuclei at once) summed into H and E with bincount.
Scale: MPP um per level-0 px, so a lymphocyte nucleus is 3-4 px and a tumour nucleus 8-12 px.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from biomedsynth.lifetime import die_with_parent
from biomedsynth.sources.wsi import write_annotation_xml, write_pyramidal_tiff

MPP = 2.0          # um per level-0 px
LOW = 8            # coarse-field grid step, px
TIFF_TILE = 256
QUALITY = 90
# per centre: hematoxylin and eosin OD vectors (R, G, B) and their strengths; B stains paler H, redder E
CENTRES = ((np.array([0.62, 0.72, 0.30]), np.array([0.20, 0.80, 0.56]), 1.0, 1.0),
           (np.array([0.50, 0.78, 0.36]), np.array([0.08, 0.88, 0.46]), 0.85, 1.2))
INKS = (np.array([0.9, 0.25, 0.75]), np.array([1.1, 0.7, 0.15]), np.array([1.3, 1.3, 1.2]))  # green, blue, black


# ---------------------------------------------------------------- fields
def _noise(rng, shape, sigma):
    """Smooth Gaussian noise with unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / n.std()


def _up(lr, h, w, cubic=False):
    """A coarse field brought to (h, w) px (LOW px per cell), bilinear or bicubic."""
    hl, wl = lr.shape
    im = Image.fromarray(np.ascontiguousarray(lr, np.float32))
    im = im.resize((wl * LOW, hl * LOW), Image.Resampling.BICUBIC if cubic else Image.Resampling.BILINEAR)
    return np.asarray(im)[:h, :w]


def _at(lr, ys, xs):
    """A coarse field sampled (bilinear) at level-0 points."""
    return ndimage.map_coordinates(lr, [(ys + 0.5) / LOW - 0.5, (xs + 0.5) / LOW - 0.5], order=1, mode="nearest")


def _grid(rng, h, w, step, jitter=0.3):
    """Jittered hexagonal lattice of points (y, x) with spacing `step`, in raster order."""
    ys, xs = np.mgrid[step / 2:h:step * 0.866, step / 2:w + step:step]
    xs = xs + (np.arange(len(ys))[:, None] % 2) * step / 2
    ys, xs = ys.ravel(), xs.ravel()
    ys = ys + rng.uniform(-jitter, jitter, ys.size) * step
    xs = xs + rng.uniform(-jitter, jitter, xs.size) * step
    keep = (xs < w) & (ys < h) & (ys >= 0) & (xs >= 0)
    return ys[keep], xs[keep]


# ---------------------------------------------------------------- sprites
def _blobs(rng, ys, xs, size, a, b, angle, rough):
    """Per-point sprite geometry: (top-left rows, cols, normalised radius r (1 on the outline),
    coverage (antialiased inside fraction)) for ellipses with semi-axes a, b and a wobbly outline."""
    k, o = len(ys), np.arange(size, dtype=np.float32) - size // 2
    iy, ix = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    dy = o[None, :, None] - (ys - iy).astype(np.float32)[:, None, None]
    dx = o[None, None, :] - (xs - ix).astype(np.float32)[:, None, None]
    c, s = np.cos(angle).astype(np.float32)[:, None, None], np.sin(angle).astype(np.float32)[:, None, None]
    u, v = dx * c + dy * s, dy * c - dx * s
    r = np.sqrt((u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2)
    if rough is not None:  # outline radius 1 + sum_m rough * cos(m theta + phase), m = 2, 3
        th = np.arctan2(v, u)
        ph = rng.uniform(0, 2 * np.pi, (2, k)).astype(np.float32)
        r = r / (1 + rough[:, None, None] * (np.cos(2 * th + ph[0, :, None, None]) +
                                               np.cos(3 * th + ph[1, :, None, None])))
    cov = np.clip((1 - r) * b[:, None, None] + 0.5, 0, 1)
    return iy - size // 2, ix - size // 2, r, cov


def _splat(h, w, iy, ix, sprites):
    """Sum sprites (K, s, s) with top-left corners (iy, ix) into an (h, w) float32 image."""
    size = sprites.shape[1]
    o = np.arange(size)
    yy, xx = iy[:, None, None] + o[None, :, None], ix[:, None, None] + o[None, None, :]
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w) & (sprites > 0.004)
    return np.bincount((yy * w + xx)[ok], sprites[ok], minlength=h * w).reshape(h, w).astype(np.float32)


def _pick(rng, ys, xs, p):
    keep = rng.random(ys.size) < p
    return ys[keep], xs[keep]


def _u(rng, lo, hi, k):
    return rng.uniform(lo, hi, k).astype(np.float32)


# ---------------------------------------------------------------- anatomy
def _star(rng, cy, cx, radius, n=96):
    """An irregular closed outline (n, 2) of (x, y) around (cy, cx), mean radius `radius`."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    r = 1 + sum(rng.uniform(0, 0.14) / np.sqrt(m) * np.cos(m * t + rng.uniform(0, 2 * np.pi)) for m in range(2, 7))
    r = r + ndimage.gaussian_filter1d(rng.normal(0, 0.05, n), 2, mode="wrap")
    return np.stack([cx + radius * r * np.cos(t), cy + radius * r * np.sin(t)], 1)


def _node(rng, h, w):
    """Coarse fields of the node: signed shape sd (> 0 in tissue), depth from the edge (px), and 0/1
    region maps capsule, sinus, germinal centre, mantle, medulla, medullary sinus."""
    hl, wl = -(-h // LOW), -(-w // LOW)
    yl, xl = (np.mgrid[:hl, :wl].astype(np.float32) + 0.5) * LOW
    cy, cx = h * rng.uniform(0.42, 0.58), w * rng.uniform(0.40, 0.60)
    ry, rx, rot = h * rng.uniform(0.30, 0.38), w * rng.uniform(0.28, 0.36), rng.uniform(-0.4, 0.4)
    u, v = (xl - cx) * np.cos(rot) + (yl - cy) * np.sin(rot), (yl - cy) * np.cos(rot) - (xl - cx) * np.sin(rot)
    th = np.arctan2(v / ry, u / rx)
    wobble = sum(rng.uniform(0, 0.07) * np.cos(m * th + rng.uniform(0, 2 * np.pi)) for m in range(2, 6))
    hilum = rng.uniform(-np.pi, np.pi)  # the notch where vessels enter: a bean, not an egg
    wobble = wobble - 0.22 * np.exp(-(np.angle(np.exp(1j * (th - hilum))) / 0.25) ** 2)
    sd = 1 - np.hypot(u / rx, v / ry) / (1 + wobble) + 0.015 * _noise(rng, (hl, wl), 5)
    tissue = sd > 0
    depth = ndimage.distance_transform_edt(tissue).astype(np.float32) * LOW
    cap_w, sin_w = rng.uniform(10, 18), rng.uniform(8, 14)
    capsule = (depth < cap_w + 4).astype(np.float32) * tissue
    sinus = ((depth >= cap_w + 4) & (depth < cap_w + sin_w + 4)).astype(np.float32)
    cortex = rng.uniform(260, 420) + 60 * _noise(rng, (hl, wl), 6)
    medulla = (depth > cortex).astype(np.float32)
    med_sinus = medulla * (np.abs(_noise(rng, (hl, wl), 2.5)) < 0.4)
    gc, mantle = np.zeros((hl, wl), np.float32), np.zeros((hl, wl), np.float32)
    ok = np.flatnonzero((depth > cap_w + sin_w + 60) & (depth < cortex))
    inward = np.gradient(depth)
    placed = []
    for i in rng.permutation(ok)[:300]:  # follicles in the outer cortex, not overlapping
        y, x, r = yl.flat[i], xl.flat[i], rng.uniform(70, 170)
        if (depth.flat[i] < cap_w + sin_w + 0.7 * r
                or any(np.hypot(y - py, x - px) < 1.1 * (r + pr) for py, px, pr in placed)):
            continue
        placed.append((y, x, r))
        # germinal centre off-centre away from the capsule; a quarter of follicles are primary (none)
        gy, gx = inward[0].flat[i], inward[1].flat[i]
        g = np.hypot(gy, gx) + 1e-6
        d = np.hypot(yl - y, xl - x) / r * (1 + 0.08 * np.cos(3 * np.arctan2(yl - y, xl - x) + rng.uniform(0, 6)))
        mantle = np.maximum(mantle, (d < 1).astype(np.float32))
        if rng.random() < 0.75:
            gr = r * rng.uniform(0.55, 0.7)
            dg = np.hypot(yl - y - 0.25 * r * gy / g, xl - x - 0.25 * r * gx / g) / gr
            gc = np.maximum(gc, (dg < 1).astype(np.float32))
    mantle *= 1 - gc
    return dict(sd=sd, depth=depth, capsule=capsule, sinus=sinus * tissue, gc=gc * tissue,
                mantle=mantle * tissue, medulla=medulla * (1 - med_sinus) * tissue, med_sinus=med_sinus * tissue)


def _metastases(rng, depth, tissue_area):
    """Tumour outlines covering about 20-40% of the tissue, plus exclusion outlines of normal islands
    inside some of them; both as lists of (n, 2) level-0 (x, y)."""
    target = tissue_area * rng.uniform(0.22, 0.4)
    shares = rng.dirichlet(np.ones(rng.integers(1, 4))) * 0.93
    tumours, holes = [], []
    for share in [*shares, *rng.uniform(0.01, 0.02, rng.integers(0, 3))]:  # a few micro-metastases too
        radius = np.sqrt(share * target / np.pi)
        cand = np.flatnonzero(depth > min(0.6 * radius, depth.max() * 0.8))
        i = rng.choice(cand)
        cy, cx = (i // depth.shape[1] + 0.5) * LOW, (i % depth.shape[1] + 0.5) * LOW
        tumours.append(_star(rng, cy, cx, radius))
        if radius > 120 and rng.random() < 0.6:
            a = rng.uniform(0, 2 * np.pi)
            off = rng.uniform(0, 0.4) * radius
            holes.append(_star(rng, cy + off * np.sin(a), cx + off * np.cos(a), radius * rng.uniform(0.15, 0.25), 48))
    return tumours, holes


def _raster(polys, h, w):
    im = Image.new("1", (w, h))
    for p in polys:
        ImageDraw.Draw(im).polygon([tuple(v) for v in p], fill=1)
    return np.asarray(im)


# ---------------------------------------------------------------- cells
def _per(v, k):
    """A scalar or per-sprite value, shaped to broadcast over (k, s, s) sprites."""
    return np.broadcast_to(np.asarray(v, np.float32), (k,))[:, None, None]


def _nuclei(rng, h, w, ys, xs, size, a, b, rough, dark, vesicular=0.0, nucleolus=0.0, angle=None, granular=False):
    """H sprites of nuclei summed into an (h, w) image. `dark`: stain per nucleus; `vesicular` in 0..1
    moves chromatin to the rim (paler core); `nucleolus`: strength of one dark dot near the centre;
    `granular`: coarse chromatin clumps."""
    k = len(ys)
    angle = rng.uniform(0, np.pi, k).astype(np.float32) if angle is None else angle.astype(np.float32)
    iy, ix, r, cov = _blobs(rng, ys, xs, size, a, b, angle, rough)
    sprite = cov * (1 - _per(vesicular, k) * np.clip(1.2 - 1.4 * r, 0, 1)) * _per(dark, k)
    if np.any(nucleolus):
        o = np.arange(size, dtype=np.float32) - size // 2
        ny = (ys - iy - size // 2 + rng.uniform(-0.3, 0.3, k) * b).astype(np.float32)
        nx = (xs - ix - size // 2 + rng.uniform(-0.3, 0.3, k) * b).astype(np.float32)
        d2 = (o[None, :, None] - ny[:, None, None]) ** 2 + (o[None, None, :] - nx[:, None, None]) ** 2
        sprite = sprite + _per(nucleolus, k) * np.float32(1.3) * np.exp(-d2 / np.float32(1.6)) * cov
    if granular:
        sprite = sprite * (0.75 + 0.5 * rng.random(sprite.shape, np.float32))
    return _splat(h, w, iy, ix, sprite)


def _discs(rng, h, w, ys, xs, size, radius, value):
    """Soft round sprites (cytoplasm, dust, ink) of per-point radius and value."""
    iy, ix, _, cov = _blobs(rng, ys, xs, size, radius, radius, np.zeros(len(ys), np.float32), None)
    return _splat(h, w, iy, ix, cov * value[:, None, None])


def _lookup(mask, ys, xs):
    return mask[ys.astype(np.int64), xs.astype(np.int64)]


# ---------------------------------------------------------------- slide
def render_slide(rng: np.random.Generator, width: int, height: int, tumour: bool, centre: int
                 ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """One phantom slide: (H, W, 3) uint8 RGB, tumour outlines and exclusion outlines (level-0 x, y)."""
    h, w = height, width
    f = _node(rng, h, w)
    hl, wl = f["sd"].shape
    tissue = _up(f["sd"], h, w) > 0
    tumours, holes = _metastases(rng, f["depth"], tissue.sum()) if tumour else ([], [])
    tum = _raster(tumours, h, w) & ~_raster(holes, h, w) & tissue
    nest = tum & (_up(_noise(rng, (hl, wl), 5), h, w) > rng.uniform(-0.6, -0.1))
    stroma = tum & ~nest
    # collagen: stripes along the level lines of a phase field, broken into short bundles; parallel to
    # the capsule there, wavy bundles of one main direction in tumour stroma (slow enough for no whorls)
    yl, xl = np.mgrid[:hl, :wl].astype(np.float32) * LOW
    t = rng.uniform(0, np.pi)
    phase = np.where(f["depth"] < 60, f["depth"] / 5 + 1.5 * _noise(rng, (hl, wl), 3),
                     (xl * np.cos(t) + yl * np.sin(t)) / 5 + 2 * _noise(rng, (hl, wl), 4))
    phase += 0.7 * _noise(rng, (hl, wl), 1.2)  # waviness
    fib = np.cos(2 * np.pi * _up(phase, h, w, cubic=True))
    fib *= np.clip(_up(_noise(rng, (hl, wl), 0.8), h, w) + 0.3, 0, 1)
    gy, gx = np.gradient(phase)

    # eosin background: pale lymphoid tissue, pinker medulla and germinal centres, fibrous capsule
    base = 0.15 + 0.07 * f["gc"] + 0.07 * f["medulla"] + 0.45 * f["capsule"]
    E = np.where(stroma, np.float32(0.55), np.where(nest, np.float32(0.18), _up(base, h, w))) * tissue
    E *= 1 + 0.3 * (_up(f["capsule"], h, w) + stroma) * fib
    H = np.where(nest, np.float32(0.12), np.float32(0.06)) * tissue  # hematoxylin haze; amphophilic nests

    # lymphocytes: packed, small, round, dark; sparse in germinal centres, sinuses, capsule
    ys, xs = _grid(rng, h, w, 4.4)
    p = (0.82 + 0.18 * f["mantle"] - 0.55 * f["gc"] - 0.65 * f["sinus"] - 0.8 * f["capsule"]
         - 0.15 * f["medulla"] - 0.6 * f["med_sinus"])
    p = _at(p, ys, xs) * _lookup(tissue, ys, xs) * np.where(_lookup(tum, ys, xs), 0, 1)
    p = np.where(_lookup(stroma, ys, xs), 0.08, p)
    ys, xs = _pick(rng, ys, xs, p)
    a = _u(rng, 1.55, 2.0, ys.size)
    H += _nuclei(rng, h, w, ys, xs, 7, a, a * _u(rng, 0.8, 1.0, ys.size), None,
                 _u(rng, 1.9, 2.4, ys.size) + 0.4 * _at(f["mantle"], ys, xs))

    # histiocytes (sinuses, germinal centres, scattered) and germinal-centre blasts: larger, paler
    ys, xs = _grid(rng, h, w, 11)
    p = 0.05 + 0.4 * f["sinus"] + 0.35 * f["med_sinus"] + 0.15 * f["gc"] - 0.05 * f["capsule"]
    ys, xs = _pick(rng, ys, xs, _at(p, ys, xs) * _lookup(tissue & ~tum, ys, xs))
    a = _u(rng, 2.8, 3.6, ys.size)
    H += _nuclei(rng, h, w, ys, xs, 11, a, a * _u(rng, 0.55, 0.85, ys.size), _u(rng, 0.02, 0.08, ys.size),
                 _u(rng, 0.9, 1.3, ys.size), vesicular=0.3)
    E += _discs(rng, h, w, ys, xs, 17, _u(rng, 5, 7, ys.size), _u(rng, 0.06, 0.14, ys.size))
    ys, xs = _grid(rng, h, w, 7)
    ys, xs = _pick(rng, ys, xs, 0.35 * _at(f["gc"], ys, xs) * _lookup(tissue & ~tum, ys, xs))
    a = _u(rng, 2.4, 3.2, ys.size)
    H += _nuclei(rng, h, w, ys, xs, 9, a, a * _u(rng, 0.8, 1.0, ys.size), _u(rng, 0.02, 0.06, ys.size),
                 _u(rng, 1.3, 1.7, ys.size), _u(rng, 0.3, 0.5, ys.size), _u(rng, 0.3, 0.6, ys.size))

    # spindle cells along the fibres of capsule and tumour stroma
    ys, xs = _grid(rng, h, w, 13)
    ys, xs = _pick(rng, ys, xs, 0.4 * _at(f["capsule"], ys, xs) * _lookup(tissue, ys, xs)
                   + 0.3 * _lookup(stroma, ys, xs))
    a = _u(rng, 4.0, 6.0, ys.size)
    H += _nuclei(rng, h, w, ys, xs, 15, a, _u(rng, 1.0, 1.4, ys.size), None, _u(rng, 1.6, 2.2, ys.size),
                 angle=np.arctan2(_at(gy, ys, xs), _at(gx, ys, xs)) + np.pi / 2)

    # carcinoma: cohesive cells with pink cytoplasm; large, irregular, vesicular nuclei with nucleoli
    ys, xs = _grid(rng, h, w, 14, 0.3)
    ys, xs = _pick(rng, ys, xs, 0.95 * _lookup(nest, ys, xs))
    if ys.size:
        k = ys.size
        E += _discs(rng, h, w, ys, xs, 19, _u(rng, 6.0, 7.5, k), _u(rng, 0.22, 0.42, k))
        a = np.clip(rng.lognormal(np.log(rng.uniform(4.0, 5.2)), 0.22, k), 3.3, 7.5).astype(np.float32)
        mitosis = rng.random(k) < 0.02
        H += _nuclei(rng, h, w, ys, xs, 19, a, a * _u(rng, 0.6, 1.0, k), _u(rng, 0.04, 0.14, k),
                     np.where(mitosis, 2.8, rng.uniform(1.3, 1.9, k)).astype(np.float32),
                     np.where(mitosis, 0, rng.uniform(0.45, 0.65, k)).astype(np.float32),
                     np.where(mitosis, 0, rng.uniform(0.6, 1.0, k)).astype(np.float32), granular=True)

    # section thickness varies smoothly; fine grain on top
    thick = _up(1 + 0.12 * _noise(rng, (hl, wl), 10), h, w)
    H *= thick * (0.92 + 0.16 * rng.random((h, w), np.float32))
    E *= thick * (0.92 + 0.16 * rng.random((h, w), np.float32))
    N, P = _dust(rng, h, w), _pen(rng, h, w)

    hv, ev, hs, es = CENTRES[centre]
    hv, ev = (np.abs(v + rng.normal(0, 0.04, 3)) for v in (hv, ev))
    hv, ev = hv / np.linalg.norm(hv) * hs * rng.lognormal(0, 0.1), ev / np.linalg.norm(ev) * es * rng.lognormal(0, 0.12)
    ink, glass = INKS[rng.integers(len(INKS))], 0.03 + rng.uniform(-0.01, 0.01, 3)
    rgb = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        od = H * np.float32(hv[c]) + E * np.float32(ev[c]) + N * np.float32(0.55 + 0.08 * c) + P * np.float32(ink[c])
        rgb[..., c] = np.clip(255 * np.exp(-(od + np.float32(glass[c]))) + 0.5, 0, 255)
    clip = np.array([w - 1, h - 1])
    return rgb, [np.clip(t, 0, clip) for t in tumours], [np.clip(t, 0, clip) for t in holes]


def _edge_points(rng, h, w, n, band):
    """n points within `band` (fraction of the short side) of the slide border."""
    d = rng.uniform(0.01, band, n) * min(h, w)
    t = rng.random(n)
    side = rng.integers(4, size=n)
    ys = np.choose(side, [d, h - 1 - d, t * (h - 1), t * (h - 1)])
    xs = np.choose(side, [t * (w - 1), t * (w - 1), d, w - 1 - d])
    return ys, xs


def _dust(rng, h, w):
    """Grey specks and a few lint fibres near the slide edges."""
    ys, xs = _edge_points(rng, h, w, rng.integers(20, 80), 0.12)
    fy, fx = _edge_points(rng, h, w, rng.integers(0, 4), 0.08)
    for y, x in zip(fy, fx):  # a fibre: a smooth random walk of small dots
        turn = np.cumsum(rng.normal(0, 0.15, rng.integers(40, 160))) + rng.uniform(0, 2 * np.pi)
        ys, xs = np.r_[ys, y + np.cumsum(np.sin(turn))], np.r_[xs, x + np.cumsum(np.cos(turn))]
    k = ys.size
    return _discs(rng, h, w, ys, xs, 9, _u(rng, 0.7, 3.0, k), _u(rng, 0.08, 0.5, k))


def _pen(rng, h, w):
    """0-2 marker strokes running roughly along the slide edges."""
    ys, xs, rs = [], [], []
    for _ in range(rng.choice(3, p=[0.4, 0.4, 0.2])):
        (y0,), (x0,) = _edge_points(rng, h, w, 1, 0.06)
        along = 0.0 if min(y0, h - 1 - y0) < min(x0, w - 1 - x0) else np.pi / 2  # parallel to the near edge
        turn = along + np.clip(np.cumsum(rng.normal(0, 0.04, rng.integers(60, 250))), -0.5, 0.5)
        turn += np.pi * rng.integers(2)
        ys.append(y0 + np.cumsum(3 * np.sin(turn))), xs.append(x0 + np.cumsum(3 * np.cos(turn)))
        rs.append(np.full(turn.size, rng.uniform(6, 13)))
    if not ys:
        return np.zeros((h, w), np.float32)
    r = np.concatenate(rs).astype(np.float32)
    ink = _discs(rng, h, w, np.concatenate(ys), np.concatenate(xs), 29, r, np.ones_like(r))
    return np.minimum(ink, 1) * np.float32(rng.uniform(0.6, 1.0))


def _write_slide(root: Path, slide: tuple[int, int], seed: int, width: int, height: int) -> list[str]:
    """Write slide (class, index) into root from its own generator; the names of the files written."""
    cls, i = slide
    rng = np.random.default_rng([seed, cls, i])
    rgb, tumours, holes = render_slide(rng, width, height, tumour=cls == 1, centre=i % 2)
    name = f"{('normal', 'tumor')[cls]}_{i + 1:03d}"
    write_pyramidal_tiff(root / f"{name}.tif", rgb, tile=TIFF_TILE, quality=QUALITY, mpp=MPP)
    if not cls:
        return [f"{name}.tif"]
    write_annotation_xml(root / f"{name}.xml", tumours, holes)
    return [f"{name}.tif", f"{name}.xml"]


def write_histology_sample(root: Path, n_normal: int, n_tumor: int, seed: int, width: int, height: int,
                           workers: int = 1) -> int:
    """Write root/normal_001.tif ..., root/tumor_001.tif ... (pyramidal tiled JPEG TIFFs) and an ASAP
    XML of the tumour outlines beside each tumour slide; return the number of slides. Same arguments,
    same bytes, whatever `workers` (processes): each slide draws from its own generator seeded by
    (seed, class, index). Phantom files from an earlier, larger sample are removed so the folder holds
    exactly this sample."""
    if min(width, height) < 256 or n_normal < 0 or n_tumor < 0:
        raise ValueError(f"histology sample: need width, height >= 256 and slide counts >= 0, got "
                         f"{width}x{height}, {n_normal} normal, {n_tumor} tumor")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    slides = [(0, i) for i in range(n_normal)] + [(1, i) for i in range(n_tumor)]
    write = partial(_write_slide, root, seed=seed, width=width, height=height)
    if workers > 1 and len(slides) > 1:
        with ProcessPoolExecutor(min(workers, len(slides)), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            per_slide = list(pool.map(write, slides))
    else:
        per_slide = [write(slide) for slide in slides]
    written = {name for names in per_slide for name in names}
    for stale in [*root.glob("normal_[0-9][0-9][0-9].tif"), *root.glob("tumor_[0-9][0-9][0-9].*")]:
        if stale.name not in written and stale.suffix in (".tif", ".xml"):
            stale.unlink()
    return len(slides)
