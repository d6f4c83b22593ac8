"""The built-in chest X-ray phantom: PA scans whose sex and age show only through several weak
anatomical cues (see shared/PHANTOMS.md) under the nuisance variation real scans have, written
as an NIH ChestX-ray14-style sample (16-bit PNGs + Data_Entry.csv).

Geometry lives in a body frame: x across (thorax half-width about 1, patient's left on the
image right as in a displayed PA film), y down (0 at the lung apices, about 1.6 at the
costophrenic angles). Each scan is a map of attenuation A >= 0 in that frame, shown bright
where A is high. `difficulty` widens individual and nuisance variation; the sex and age
effects stay fixed, so it sets how hidden the label is. After a lung-hull percentile
normalisation everything outside the lungs saturates, so the cues that matter for a classifier
are those that shape the lung fields or project over them.
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from biomedsynth.lifetime import die_with_parent
from biomedsynth.store import atomic_write_text

FINDINGS = ("Cardiomegaly", "Effusion", "Mass", "Nodule")
CSV_COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID",
               "Patient Age", "Patient Gender", "View Position"]
AGE_RANGE = (18, 80)


def _ramp(d, e):
    """Soft step: 0 below -e/2, 1 above e/2 (cheaper than a sigmoid and as good after resizing)."""
    return np.clip(d * (1.0 / e) + 0.5, 0.0, 1.0)


def _bump(d2):
    """Smooth dome from a squared normalised distance: 1 at the centre, 0 from d2 >= 1."""
    return np.square(np.clip(1.0 - d2, 0.0, 1.0))


def _parse_findings(finding: str) -> list[str]:
    if finding == "No Finding":
        return []
    names = finding.split("|")
    bad = [n for n in names if n not in FINDINGS]
    if bad:
        raise ValueError(f"unknown finding {bad[0]!r} in {finding!r} (allowed: 'No Finding' or "
                         f"'|'-joined {', '.join(FINDINGS)})")
    return names


def _anatomy(ind: np.random.Generator, sex: str, age: int, difficulty: float) -> dict:
    """The patient's anatomy at `age`. `ind` is drawn in a fixed order whatever the sex, age or
    finding, so one generator seed gives one individual across follow-ups."""
    z, u = ind.standard_normal(20).tolist(), ind.random(4).tolist()   # python floats keep arrays float32
    m = sex == "M"
    s = 0.45 + 1.1 * difficulty              # individual spread, relative to the fixed label effects
    dec = (age - 40) / 10.0                   # decades from 40

    def past(start):                          # decades past `start`
        return max(age - start, 0) / 10.0

    def trait(i, f, mval, sd):
        return (mval if m else f) + s * sd * z[i]

    return dict(
        tw=trait(0, 0.93, 1.0, 0.045) + 0.008 * dec,                # thorax half-width
        lh=trait(1, 1.58, 1.68, 0.07) + 0.035 * dec,                # lung height: lower diaphragm when older
        cone=trait(2, 0.50, 0.58, 0.05),                            # apex/base width: women more conical
        ctr=trait(3, 0.43, 0.46, 0.025) + 0.008 * dec,              # heart half-width / thorax half-width
        mw=trait(4, 0.12, 0.135, 0.012) + 0.004 * dec,              # upper mediastinum half-width
        trw=trait(5, 0.036, 0.046, 0.006),                          # trachea half-width
        rib=trait(6, 0.40, 0.47, 0.04),                             # rib thickness / rib period
        clav=trait(7, 0.042, 0.05, 0.006),                         # clavicle half-thickness
        bone=trait(8, 1.0, 1.0, 0.08) - (0.05 if m else 0.085) * past(35),  # density (osteopenia)
        knob=max(trait(9, 0.0, 0.005, 0.012) + 0.016 * past(25), 0.0),    # aortic arch unfolding
        rim=float(np.clip(0.9 * past(48) + 0.35 * s * z[10], 0, 1)),       # calcified arch rim
        cart=float(np.clip(0.33 * past(25) + 0.25 * s * z[11], 0, 1.3)),  # costal cartilage calcium
        cart_central=(u[0] < 0.85) != m,                            # central in women, marginal in men
        dome=trait(12, 0.22, 0.22, 0.035) - 0.02 * past(30),        # diaphragm flattens with age
        kyph=float(np.clip(0.25 * past(45) + 0.12 * s * z[13], 0, 1)),
        lines=max(0.2 + 0.2 * past(30) + 0.15 * s * z[14], 0.0),  # interstitial markings
        breast=(u[1] < (0.1 if m else 0.85)) * (0.3 if m else float(np.clip(0.5 + 0.1 * s * z[15], 0.25, 0.8))),
        breast_amp=(0.04 if m else 0.09) * float(np.clip(1 + 0.3 * s * z[16], 0.3, 2.0)),
        breast_y=0.12 * s * z[17],
        tissue=float(np.exp(0.1 * s * z[18])),                     # habitus: soft-tissue thickness
        cc=0.35 + 0.04 * z[19],                                     # costochondral junction (rib fraction)
        tex=ind.integers(0, 2**31, size=3),                         # seeds of vessel/texture/calcium patterns
    )


def _texture(seed: int, width: float, band: float) -> np.ndarray:
    """A periodic 128x128 noise texture (unit variance) of blobs about `width` texels across;
    `band` > 0 also removes the coarse variation (a band-pass: line-like texture)."""
    f = np.fft.fftfreq(128)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * width
    spec = np.exp(-np.square(r)) * (1 - np.exp(-np.square(r / band)) if band else 1)
    noise = np.fft.ifft2(np.fft.fft2(np.random.default_rng(seed).standard_normal((128, 128))) * spec).real
    return (noise / noise.std()).astype(np.float32)


def _lookup(tex: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Bilinear lookup of a periodic 128x128 texture at fractional texel coordinates (i across, j down)."""
    i0, j0 = np.floor(i), np.floor(j)
    fi, fj = i - i0, j - j0
    i0, j0 = i0.astype(np.int32) & 127, (j0.astype(np.int32) & 127) * 128
    i1, j1 = (i0 + 1) & 127, (j0 + 128) & 16383
    t = tex.ravel()
    return (t[j0 + i0] * (1 - fi) + t[j0 + i1] * fi) * (1 - fj) + (t[j1 + i0] * (1 - fi) + t[j1 + i1] * fi) * fj


def _glyphs(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A block of text-like marks: random 5x3 'characters' in rows, as burnt-in annotations look."""
    chars = (rng.random((rows, cols, 5, 3)) < 0.55) & (rng.random((rows, cols, 1, 1)) < 0.85)
    pad = np.zeros((rows, cols, 7, 4), bool)
    pad[:, :, 1:6, :3] = chars
    return pad.transpose(0, 2, 1, 3).reshape(rows * 7, cols * 4)


def render_scan(rng: np.random.Generator, sex: str, age: int, difficulty: float, finding: str,
                height: int, width: int, anatomy_seed: int | Sequence[int] | None = None) -> np.ndarray:
    """One PA chest X-ray phantom, (height, width) uint16, bright = attenuating.

    The individual's anatomy is drawn from `np.random.default_rng(anatomy_seed)` when given (the
    same seed is the same person at any age), else from `rng`; everything else of the scan
    (exposure, positioning, inspiration, markers, noise, bit depth) comes from `rng`.
    """
    if sex not in ("F", "M"):
        raise ValueError(f"sex must be 'F' or 'M', got {sex!r}")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be in [0, 1], got {difficulty}")
    if height < 32 or width < 32:
        raise ValueError(f"scan size must be at least 32x32, got {height}x{width}")
    findings = _parse_findings(finding)
    a = _anatomy(rng if anatomy_seed is None else np.random.default_rng(anatomy_seed), sex, age, difficulty)
    nz = 0.3 + 1.4 * difficulty               # nuisance scale
    g, v = np.clip(rng.standard_normal(12), -2.5, 2.5).tolist(), rng.random(16).tolist()
    f32 = np.float32
    tw, lh, kyph, T0 = a["tw"], a["lh"], a["kyph"], a["tissue"]

    # --- scan geometry: grid pixel -> body frame (zoom, rotation, shift). The anatomy is smooth, so it
    # is drawn on a grid of at most ~320 px a side and upsampled; noise and marks are added at full size.
    step = max(1.0, min(height, width) / 320)
    gh, gw = round(height / step), round(width / step)
    upp = 2.75 * (1 + 0.04 * nz * g[0]) / min(gh, gw)               # body units per grid pixel
    rot = np.deg2rad(1.6 * nz * g[1])
    xi = ((np.arange(gw, dtype=f32) - (gw - 1) / 2) * upp)[None, :]
    yi = ((np.arange(gh, dtype=f32) - (gh - 1) / 2) * upp)[:, None]
    c, sn = f32(np.cos(rot)), f32(np.sin(rot))
    x = c * xi - sn * yi + f32(0.035 * nz * g[2])
    y = sn * xi + c * yi + f32(0.92 + 0.05 * nz * g[3])
    e = max(0.015, 1.5 * upp)                                       # edge softness: ~1.5 px at least
    lh = lh * (1 + 0.03 * nz * g[4])                                 # inspiration depth
    sx = 0.015 * nz * g[5]                                           # patient rotation about the long axis
    dx = x - f32(sx)
    ax = np.abs(dx)
    right = dx < 0                                                   # patient's right = image left
    lh_side = np.where(right, f32(lh - 0.06), f32(lh))               # right hemidiaphragm higher

    # --- soft tissue: neck, shoulders, chest, abdomen with a flat-topped thickness profile ---
    sh = np.clip((y + 0.4) / 0.45, 0, 1)
    bw = 0.45 + (1.32 * tw - 0.45) * sh * (2 - sh) - (0.14 * tw) * np.clip((y - 0.05) / 0.4, 0, 1)
    xa = np.abs(x)
    T = T0 * _ramp(bw - xa, 3 * e) * (0.7 + 0.3 * np.sqrt(np.clip(1 - np.square(xa / bw), 0, 1)))  # chest wall seen edge-on
    T *= 1 + 0.12 * _ramp(y - lh - 0.1, 0.3)                        # abdomen
    arm = _ramp(xa - bw - 0.08 * np.clip(y - 0.2, 0, 1), e) * _ramp(1.85 * tw - xa, e) * _ramp(y + 0.15, 0.2)
    A = np.maximum(T, 0.8 * T0 * arm)                                # arms beside the chest, axillae between
    bone = 0.09 * a["bone"]
    A += (2.5 * bone) * _ramp(1 - (np.square(xa - 1.45 * tw) + np.square(y + 0.02)) / 0.035, 0.3)  # humeral heads

    # --- mediastinum: upper band, heart, aortic knob ---
    ha = (a["ctr"] + (0.14 + 0.06 * v[0] if "Cardiomegaly" in findings else 0.0)) * tw
    hx, hy = x - f32(sx + 0.3 * ha), y - f32(lh - 0.4)               # long axis tilted down to the left
    heart = _ramp(1 - np.square((0.9 * hx - 0.44 * hy) / ha) - np.square((0.44 * hx + 0.9 * hy) / (0.72 * ha)), 3 * e / ha)
    band = _ramp(a["mw"] * (1 + 0.25 * np.clip(y / lh, 0, 1)) - ax, e) * _ramp(lh - y, e)
    kr = 0.08 + a["knob"]
    kx, ky = sx + a["mw"] + 0.5 * a["knob"] - 0.01, 0.52 - 0.6 * a["knob"]
    kd = np.sqrt(np.square(x - f32(kx)) + np.square(y - f32(ky))) * (1 / kr)
    medi = np.maximum(np.maximum(band, heart), _ramp(1 - kd, 2 * e / kr))
    rim = _ramp(0.06 - np.abs(kd - 0.9), 0.05) * _ramp(ky - y, e) * _ramp(x - kx + 0.3 * kr, e)
    A += (3 * bone * a["rim"]) * rim                                 # calcium in the arch wall

    # --- lungs: apex dome, lateral rib-cage wall (conical in women), diaphragm domes ---
    L = tw * (a["cone"] + (1 - a["cone"]) * np.sqrt(np.clip((y + 0.05) / (0.6 * lh), 0, 1)))
    top = 0.35 * np.square((ax - 0.45 * tw) / (0.35 * tw))
    dia = lh_side - a["dome"] * (1 - np.square((ax - 0.45 * tw) / (0.6 * tw)))
    lung = _ramp(L - ax, e) * _ramp(y - top, 2 * e) * _ramp(dia - y, e) * (1 - medi)
    u = ax / L
    air = lung * (0.66 + 0.12 * (1 - np.square(u)))
    if "Effusion" in findings:                                       # fluid blunting one costophrenic angle
        level = lh_side - 0.2 - 0.3 * v[1] - 0.15 * np.square(u)     # meniscus climbing laterally
        air *= 1 - (0.85 * (right if v[2] < 0.5 else ~right)) * _ramp(y - level, 0.05)
    A -= air * T
    A -= (0.25 * T0) * _ramp(a["trw"] - ax, e) * _ramp(0.55 - y, 0.05)               # trachea
    A -= (0.25 * (v[3] < 0.7)) * _bump(np.square((dx - 0.45 * tw) / 0.2) + np.square((y - lh - 0.12) / 0.09))

    # --- ribs, clavicles, spine; density falls with age ---
    ribzone = _ramp(u - 0.12, 0.06) * _ramp(1.05 - u, 0.03) * (1 - 0.8 * _ramp(y - dia, 0.15))
    post = 10 * np.clip((y + 0.06 * kyph + 0.1 * u - (0.45 + 0.1 * kyph) * np.square(u) + 0.11) / (1.96 * tw), 0, None) ** 0.85
    q = np.abs(post - np.rint(post)) * (2 / a["rib"])              # 0 on a rib's centre line, 1 at its edge
    A += bone * ribzone * (_ramp(1 - q, 0.3) + 0.5 * _ramp(0.15 - np.abs(q - 0.85), 0.1))
    cc = a["cc"]
    front = np.where(u > cc, 0.5 * (1 - u), 0.5 * (1 - cc) - 1.2 * np.square(cc - u))
    ant = 10 * np.clip((y - front + 0.184 * tw) / (2.39 * tw), 0, None) ** 0.85   # anterior ribs + cartilages
    aq = np.abs(ant - np.rint(ant)) * (2.5 / a["rib"])
    A += (0.45 * bone) * _ramp(1 - aq, 0.4) * _ramp(u - cc, 0.02) * _ramp(1.02 - u, 0.03) * _ramp(lh + 0.2 - y, 0.15)
    patch = np.random.default_rng(a["tex"][2]).random(4096) < 0.55
    piece = (np.rint(ant).astype(np.int32) * 97 + (u * 20).astype(np.int32) + right * 2048) & 4095
    profile = _ramp(0.35 - aq, 0.2) if a["cart_central"] else _ramp(0.16 - np.abs(aq - 0.8), 0.12)
    A += (3 * bone * a["cart"]) * profile * patch[piece] * _ramp(cc - u, 0.02) * _ramp(u - 0.08, 0.03) \
        * (np.abs(ant - 3.5) < 3)                                    # cartilages of ribs 1-6, over the lungs
    ycl = 0.26 - 0.1 * kyph - 0.22 * ax / tw + 0.06 * np.sin(np.pi * ax / tw)   # clavicles
    A += (1.4 * bone) * _ramp(1 - np.abs(y - ycl) * (1 / a["clav"]), 0.5) * _ramp(ax - 0.06, e) * _ramp(1.2 * tw - ax, 0.05)
    vph = (y + 0.5) * (1 / (0.11 * (1 - 0.08 * kyph)))              # vertebrae, lower with kyphosis
    spine = _ramp(0.12 - ax, e) * (0.6 + 0.4 * _ramp(0.38 - np.abs(vph - np.rint(vph)), 0.1)) \
        + 0.5 * _bump(np.square((ax - 0.08) / 0.025) + np.square((vph - np.floor(vph) - 0.45) / 0.2))
    A += (0.5 * bone) * spine * (1 - 0.6 * _ramp(y - lh + 0.3, 0.3))

    # --- lung markings: hila, vessels fanning out from them, interstitial lines with age ---
    hil_x = dx - np.where(right, f32(-0.3 * tw), f32(0.33 * tw))
    hil_y = y - np.where(right, f32(0.8), f32(0.76))
    rr = np.sqrt(np.square(hil_x) + np.square(hil_y))
    ang = np.arctan2(hil_y, hil_x) * f32(64 / np.pi)                  # 128 texels around each hilum
    vessels = _lookup(_texture(a["tex"][0], 1.5, 0.0), ang, 12 * np.sqrt(rr))   # radial streaks
    vessels = np.clip(vessels - 0.6, 0, None) * np.clip(1.3 - rr, 0, None) * _ramp(rr - 0.25, 0.3) \
        + 0.5 * _bump(np.square(rr) * (1 / 0.03))                   # hilar vessels
    inter = np.abs(_lookup(_texture(a["tex"][1], 3.0, 0.7), x * 40, y * 40))   # reticular lines
    A += lung * ((0.18 * T0) * vessels + (0.07 * a["lines"]) * inter)

    # --- breast shadows over the lower zones: fading upwards, a sharp lower border ---
    if a["breast"] > 0:
        by, bs = lh - 0.45 + a["breast_y"], a["breast"]
        dyb = (y - by) * np.where(y < by, f32(1 / (1.1 * bs)), f32(1 / (0.45 * bs)))
        A += (a["breast_amp"] * T0) * np.sqrt(np.clip(1 - np.square((ax - 0.62 * tw) / (0.75 * bs)) - np.square(dyb), 0, 1))

    # --- findings over the anatomy ---
    for i, name in enumerate(findings):
        if name in ("Mass", "Nodule"):
            r = 0.14 + 0.12 * v[4 + i] if name == "Mass" else 0.045 + 0.035 * v[4 + i]
            mx = sx + (0.35 + 0.4 * v[6 + i]) * tw * (1 if v[8 + i] < 0.5 else -1)
            A += (0.35 * T0) * _bump((np.square(x - f32(mx)) + np.square(y - f32(0.4 + 0.8 * v[10 + i]))) / r ** 2)

    # --- detector: exposure/contrast, quantum noise, bit depth; collimation and burnt-in marks ---
    kv = 1.4 * (1 + 0.15 * nz * g[6])                                # contrast (kVp, processing curve)
    img = ((1 - np.exp(-np.clip(A, 0, None) * kv)) * (1 / (1 - np.exp(-1.3 * kv)))) ** (1.8 * (1 + 0.1 * nz * g[8]))
    img *= 1 + 0.08 * nz * g[7]
    if (gh, gw) != (height, width):
        img = ndi.zoom(img, (height / gh, width / gw), order=1, mode="nearest", grid_mode=True)
    img += rng.standard_normal(img.shape, dtype=f32) * (0.006 * (1 + nz * v[12])) * np.sqrt(np.clip(img, 0.02, None))
    full = 2 ** int(rng.integers(12, 17)) - 1                        # detector bit depth used
    out = np.clip(img * (full * (0.75 + 0.2 * v[13])) + 0.02 * nz * full * v[14], 0, full)
    if v[15] < 0.15 + 0.4 * difficulty:                              # collimator: unexposed (white) edge
        side, n = int(rng.integers(0, 4)), int(rng.uniform(0.02, 0.08) * min(height, width)) + 1
        out[[np.s_[:n, :], np.s_[-n:, :], np.s_[:, :n], np.s_[:, -n:]][side]] = 0.9 * full
    cell = max(1, min(height, width) // 140)
    for corner in np.flatnonzero(rng.random(4) < 0.25 + 0.4 * difficulty):   # burnt-in markers and text
        mark = np.kron(_glyphs(rng, int(rng.integers(1, 4)), int(rng.integers(2, 9))), np.ones((cell, cell), bool))
        r0 = 4 * cell if corner < 2 else height - mark.shape[0] - 4 * cell
        c0 = 4 * cell if corner % 2 == 0 else width - mark.shape[1] - 4 * cell
        if r0 >= 0 and c0 >= 0:
            out[r0:r0 + mark.shape[0], c0:c0 + mark.shape[1]][mark] = full
    return out.astype(np.uint16)


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # fixed settings; Pillow writes no timestamps
    return buf.getvalue()


def _write_patient(images: Path, pid: int, seed: int, difficulty: float, abnormal_fraction: float,
                   scans_per_patient: tuple[int, int], min_side: int, max_side: int) -> list[list]:
    """Write one patient's scans into `images`; their Data_Entry.csv rows. Every patient and scan draws from
    its own seeded generator, so patients can be written in any order, by any process."""
    lo, hi = scans_per_patient
    prng = np.random.default_rng([seed, 0, pid])
    sex = "F" if prng.random() < 0.5 else "M"
    age = int(prng.integers(AGE_RANGE[0], AGE_RANGE[1] - 1))
    rows = []
    for fu in range(int(prng.integers(lo, hi + 1))):
        srng = np.random.default_rng([seed, 1, pid, fu])
        if fu:
            age = min(age + int(srng.choice(3, p=[0.2, 0.55, 0.25])), AGE_RANGE[1])
        labels = "No Finding"
        if srng.random() < abnormal_fraction:
            labels = "|".join(sorted(srng.choice(FINDINGS, size=1 + (srng.random() < 0.2), replace=False)))
        w = int(srng.integers(min_side, max_side + 1))
        h = int(np.clip(round(w * srng.uniform(0.85, 1.2)), min_side, max_side))
        scan = render_scan(srng, sex, age, difficulty, labels, h, w, anatomy_seed=[seed, 2, pid])
        name = f"{pid:08d}_{fu:03d}.png"
        tmp = images / f".{name}.part"
        tmp.write_bytes(_png_bytes(scan))
        os.replace(tmp, images / name)                          # never a half-written PNG under its name
        rows.append([name, labels, fu, pid, age, sex, "PA"])
    return rows


def write_xray_sample(root: Path, n_patients: int, seed: int, difficulty: float, abnormal_fraction: float,
                      scans_per_patient: tuple[int, int], min_side: int, max_side: int, workers: int = 1) -> int:
    """Write `root/images/*.png` (16-bit) and `root/Data_Entry.csv` as NIH ChestX-ray14 lays them out;
    return the number of scans. Same arguments -> same bytes, whatever `workers` (processes). Scans of an
    earlier, larger sample that this one does not list are removed."""
    lo, hi = scans_per_patient
    if n_patients < 1 or not 1 <= lo <= hi or not 32 <= min_side <= max_side or not 0 <= abnormal_fraction <= 1:
        raise ValueError(f"bad X-ray sample settings: n_patients={n_patients}, scans_per_patient={scans_per_patient}, "
                         f"min_side={min_side}, max_side={max_side}, abnormal_fraction={abnormal_fraction}")
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    write = partial(_write_patient, images, seed=seed, difficulty=difficulty, abnormal_fraction=abnormal_fraction,
                    scans_per_patient=scans_per_patient, min_side=min_side, max_side=max_side)
    pids = range(1, n_patients + 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            per_patient = list(pool.map(write, pids, chunksize=16))
    else:
        per_patient = [write(pid) for pid in pids]
    rows = [row for patient in per_patient for row in patient]
    listed = {r[0] for r in rows}
    for stale in [*images.glob("????????_???.png"), *images.glob(".*.part")]:
        if stale.name not in listed:
            stale.unlink()
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([CSV_COLUMNS, *rows])
    atomic_write_text(Path(root) / "Data_Entry.csv", text.getvalue())
    return len(rows)
