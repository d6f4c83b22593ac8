import math

import numpy as np
import pytest

from biomedsynth.classify.lbp import (histograms, lbp_features, lbp_features_of_set, read_features, to_gray,
                                      write_features)
from biomedsynth.store import ImageSetWriter


def brute_uniform_histogram(gray: np.ndarray, R: int) -> np.ndarray:
    """Uniform LBP from its definition: P = 8R points on a circle of radius R, each sampled bilinearly from
    the pixels around it (0 outside the image; coordinates rounded to 1e-5 so points on the pixel grid are
    read exactly), bit = sample >= centre; a circle with <= 2 bit changes gets the number of set bits,
    any other gets P + 1."""
    P, (H, W) = 8 * R, gray.shape
    img = gray.astype(np.float64)

    def pixel(r, c):
        return img[r, c] if 0 <= r < H and 0 <= c < W else 0.0

    hist = np.zeros(P + 2)
    for r in range(H):
        for c in range(W):
            bits = []
            for k in range(P):
                y = r + np.round(-R * math.sin(2 * math.pi * k / P), 5)
                x = c + np.round(R * math.cos(2 * math.pi * k / P), 5)
                r0, c0 = math.floor(y), math.floor(x)
                dr, dc = y - r0, x - c0
                top = (1 - dc) * pixel(r0, c0) + dc * pixel(r0, c0 + 1)
                bottom = (1 - dc) * pixel(r0 + 1, c0) + dc * pixel(r0 + 1, c0 + 1)
                bits.append((1 - dr) * top + dr * bottom >= img[r, c])
            changes = sum(bits[k] != bits[k - 1] for k in range(P))
            hist[sum(bits) if changes <= 2 else P + 1] += 1
    return hist / (H * W)


def test_hand_computed_histograms():
    # one bright pixel on black: it alone sees darker neighbours everywhere (code 0); every other pixel
    # sees neighbours >= itself on the whole circle (code P), at R = 1 and R = 2 alike
    dot = np.zeros((1, 7, 7, 1), np.uint8)
    dot[0, 3, 3] = 200
    f = lbp_features(dot, radii=(1, 2))
    want1, want2 = np.zeros(10), np.zeros(18)
    want1[[0, 8]] = [1 / 49, 48 / 49]
    want2[[0, 16]] = [1 / 49, 48 / 49]
    np.testing.assert_allclose(f["r1"][0], want1, atol=1e-7)
    np.testing.assert_allclose(f["r2"][0], want2, atol=1e-7)
    # a flat image at R = 1: 25 inner pixels code 8; the 20 edge pixels lose the 3 points outside (code 5);
    # the 4 corners lose 5 (code 3) -- points outside the image read as 0
    flat = np.full((1, 7, 7, 1), 100, np.uint8)
    want = np.zeros(10)
    want[[3, 5, 8]] = [4 / 49, 20 / 49, 25 / 49]
    np.testing.assert_allclose(lbp_features(flat, radii=(1,))["r1"][0], want, atol=1e-7)


def test_matches_brute_force_definition():
    rng = np.random.default_rng(0)
    images = np.concatenate([rng.integers(0, 4, (2, 9, 9, 1)), rng.integers(0, 256, (1, 9, 9, 1))]).astype(np.uint8)
    got = histograms(images, range(3), (1, 2))
    for i in range(3):
        want = np.concatenate([brute_uniform_histogram(images[i, ..., 0], R) for R in (1, 2)])
        np.testing.assert_allclose(got[i], want, atol=1e-6)


def test_variants_and_gray_conversion():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    assert to_gray(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], np.uint8)).tolist() == [54, 182, 18, 255]
    f = lbp_features(rgb)
    assert list(f) == ["r2", "r3", "r4", "concat"]
    assert [f[k].shape for k in f] == [(3, 18), (3, 26), (3, 34), (3, 78)] and f["concat"].dtype == np.float32
    np.testing.assert_array_equal(f["concat"], np.hstack([f["r2"], f["r3"], f["r4"]]))
    for k in ("r2", "r3", "r4"):
        np.testing.assert_allclose(f[k].sum(1), 1, atol=1e-6)
    gray = lbp_features(to_gray(rgb)[..., None])  # RGB is LBP of its luminance image
    assert all(np.array_equal(f[k], gray[k]) for k in f)


def _write_set(path, images):
    with ImageSetWriter(path, images.shape[1:]) as w:
        for i, im in enumerate(images):
            w.add(im, image_id=f"t{i:03d}")


def test_two_workers_match_one_and_files_round_trip(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (130, 12, 12, 3), dtype=np.uint8)  # 3 chunks of <= 64
    _write_set(tmp_path / "set", images)
    one = lbp_features(images, workers=1)
    for two in (lbp_features_of_set(tmp_path / "set", workers=2), lbp_features(images, workers=2)):
        assert all(np.array_equal(one[k], two[k]) for k in one)
    summary = write_features(tmp_path / "set", tmp_path / "lbp", workers=1)
    assert summary == {"images": 130, "radii": [2, 3, 4], "dims": {"r2": 18, "r3": 26, "r4": 34, "concat": 78}}
    first = (tmp_path / "lbp" / "features.npz").read_bytes()
    write_features(tmp_path / "set", tmp_path / "lbp", workers=2)  # replaces the folder, same bytes
    assert (tmp_path / "lbp" / "features.npz").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lbp", "set"]  # no temporary folder left
    ids, feats = read_features(tmp_path / "lbp")
    assert ids.tolist() == [f"t{i:03d}" for i in range(130)] and list(feats) == list(one)
    assert all(np.array_equal(one[k], feats[k]) for k in one)


def test_bad_input_is_refused(tmp_path):
    ok = np.zeros((2, 9, 9, 1), np.uint8)
    for radii in ((0, 2), (2.5,), (True,), (), (2, 2)):
        with pytest.raises(ValueError, match="radii"):
            lbp_features(ok, radii=radii)
    with pytest.raises(ValueError, match="channels"):
        lbp_features(np.zeros((2, 9, 9, 2), np.uint8))
    with pytest.raises(ValueError, match="too small for LBP radius 4"):
        lbp_features(np.zeros((2, 8, 30, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        lbp_features(np.zeros((2, 9, 9, 1), np.float32), radii=(2,))
    with pytest.raises(ValueError, match="workers"):
        lbp_features(ok, radii=(2,), workers=0)
    with pytest.raises(FileNotFoundError, match="features.npz"):
        read_features(tmp_path)
    assert lbp_features(ok[:0])["concat"].shape == (0, 78)
