import numpy as np
import pytest
import torch
import torch.nn.functional as F

from biomedsynth.gan import score


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def textures(n, side, channels=1, seed=0):
    """Smooth random textures in roughly [-1, 1], float (N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, channels, side + 4, side + 4, generator=g), 5, stride=1)
    return (x / x.std()).clamp(-3, 3) / 3


def test_as_model_images_maps_uint8_hwc_to_float_chw():
    u8 = np.zeros((2, 4, 4, 3), np.uint8)
    u8[0, 1, 2] = (0, 255, 51)
    x = score.as_model_images(u8)
    assert x.shape == (2, 3, 4, 4) and x[0, :, 1, 2].tolist() == pytest.approx([-1.0, 1.0, -0.6])
    assert score.as_model_images(np.zeros((2, 5, 5), np.uint8)).shape == (2, 1, 5, 5)
    with pytest.raises(ValueError, match="images must be"):
        score.as_model_images(np.zeros((2, 5, 5), np.float32))


def test_laplacian_pyramid_reconstructs_and_ignores_constants():
    x = textures(2, 64, 3)
    pyr = score.laplacian_pyramid(x, 3)
    assert [p.shape[-1] for p in pyr] == [64, 32, 16]
    rebuilt = pyr[-1]
    for band in pyr[-2::-1]:
        rebuilt = band + score._up(rebuilt)
    torch.testing.assert_close(rebuilt, x)
    const = score.laplacian_pyramid(torch.full((1, 1, 32, 32), 0.7), 2)
    assert const[0].abs().max() < 1e-6 and torch.allclose(const[1], torch.full((1, 1, 16, 16), 0.7))
    with pytest.raises(ValueError, match="pyramid levels"):
        score.laplacian_pyramid(x, 6)


def test_swd_zero_for_identical_sets_and_deterministic():
    a = textures(16, 32, 3)
    per_level, mean = score.sliced_wasserstein(a, a.clone())
    assert len(per_level) == 2 and mean < 1e-6
    b = textures(16, 32, 3, seed=1)
    assert score.sliced_wasserstein(a, b) == score.sliced_wasserstein(a, b)
    assert score.sliced_wasserstein(a, b, seed=1) != score.sliced_wasserstein(a, b)


def test_swd_grows_with_brightness_shift():
    real, fake = textures(24, 64), textures(24, 64, seed=1)
    means = [score.sliced_wasserstein(real, fake + s)[1] for s in (0.0, 0.1, 0.2, 0.4)]
    assert means[0] > 0 and all(a < b for a, b in zip(means, means[1:]))
    # only the low-pass level sees a uniform shift; the band-pass levels do not move
    lv0, lv3 = score.sliced_wasserstein(real, fake)[0], score.sliced_wasserstein(real, fake + 0.4)[0]
    assert lv3[0] == pytest.approx(lv0[0], abs=1e-4) and lv3[-1] > 2 * lv0[-1]
    # the paper's per-set normalisation is blind to it
    blind = [score.sliced_wasserstein(real, fake + s, per_set_norm=True)[1] for s in (0.0, 0.4)]
    assert blind[1] == pytest.approx(blind[0], rel=1e-3)


def test_swd_accepts_stored_uint8_and_sizes_16_to_512():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (4, 16, 16, 1), np.uint8), rng.integers(0, 256, (4, 16, 16, 1), np.uint8)
    per_level, mean = score.sliced_wasserstein(a, b)
    assert len(per_level) == 1
    assert mean == score.sliced_wasserstein(score.as_model_images(a), score.as_model_images(b))[1]
    big = textures(2, 512, 3)
    assert len(score.sliced_wasserstein(big, textures(2, 512, 3, seed=1), nhoods_per_image=16)[0]) == 6
    with pytest.raises(ValueError, match="same size"):
        score.sliced_wasserstein(a, b[:3])
    with pytest.raises(ValueError, match="power-of-two"):
        score.sliced_wasserstein(textures(2, 24), textures(2, 24))


def test_kid_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
    k = lambda a, b: (a @ b / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    mean, std = score.kid(x, y, n_subsets=1, subset_size=5)
    assert mean == pytest.approx(xx + yy - 2 * xy) and std == 0.0


def test_kid_near_zero_for_one_distribution_larger_when_shifted():
    rng = np.random.default_rng(0)
    real, same, shifted = rng.normal(size=(3, 400, 16))
    same_kid, same_std = score.kid(real, same, n_subsets=20, subset_size=200)
    shift_kid, _ = score.kid(real, shifted + 0.3, n_subsets=20, subset_size=200)
    assert abs(same_kid) < 3 * same_std + 1e-3
    assert shift_kid > 0.1 and shift_kid > 20 * abs(same_kid)
    with pytest.raises(ValueError, match="same D"):
        score.kid(real, shifted[:, :8])


def stripes(n, side, seed):
    """Label 0: horizontal stripes, 1: vertical; random phase, frequency and noise. uint8 (N, H, W, 1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    t = np.arange(side)
    images = []
    for lab in labels:
        wave = np.sin(t * rng.uniform(0.3, 0.8) + rng.uniform(0, 6.3))
        img = wave[:, None] * np.ones(side) if lab == 0 else np.ones(side)[:, None] * wave
        images.append(np.clip(127.5 + 80 * img + rng.normal(0, 25, (side, side)), 0, 255))
    return np.stack(images).astype(np.uint8)[..., None], np.array(["F-18-19", "M-20-21"])[labels]


def test_feature_net_learns_labels_and_kid_separates_sets():
    images, labels = stripes(256, 32, seed=0)
    net = score.train_feature_net(images, labels, epochs=3, batch_size=32, width=8, input_size=32)
    assert net.config["n_classes"] == 2
    with torch.no_grad():
        pred = net(score.as_model_images(images)).argmax(1).numpy()
    assert (pred == (labels == "M-20-21")).mean() > 0.9
    feats = score.extract_features(net, images)
    assert feats.shape == (256, 64) and feats.dtype == np.float32
    same, _ = stripes(256, 32, seed=1)
    darker = (same.astype(np.int16) - 60).clip(0, 255).astype(np.uint8)
    kid_same = score.kid(feats, score.extract_features(net, same), n_subsets=10, subset_size=200)[0]
    kid_dark = score.kid(feats, score.extract_features(net, darker), n_subsets=10, subset_size=200)[0]
    assert kid_dark > 5 * abs(kid_same)
    # float model images of the same pixels give the same features
    np.testing.assert_allclose(score.extract_features(net, score.as_model_images(images[:8])), feats[:8], atol=1e-5)


def test_feature_net_learns_two_attributes_with_a_head_each_and_is_deterministic(tmp_path):
    images, orientation = stripes(256, 32, seed=0)
    brightness = np.where(np.arange(256) % 2, "dark", "light")
    images = np.where((brightness == "dark")[:, None, None, None], images // 2, images).astype(np.uint8)
    labels = np.stack([orientation, brightness], 1)
    net = score.train_feature_net(images, labels, epochs=3, batch_size=32, width=8, input_size=32)
    assert net.config["n_classes"] == 4  # two heads of two classes
    with torch.no_grad():
        z_orientation, z_brightness = net(score.as_model_images(images)).split([2, 2], 1)
    assert (z_orientation.argmax(1).numpy() == (orientation == "M-20-21")).mean() > 0.9
    assert (z_brightness.argmax(1).numpy() == (brightness == "light")).mean() > 0.9  # np.unique order: dark, light
    again = score.train_feature_net(images, labels, epochs=3, batch_size=32, width=8, input_size=32)
    np.testing.assert_array_equal(score.extract_features(again, images), score.extract_features(net, images))
    score.save_feature_net(net, tmp_path / "net.pt", resolution=32)
    loaded = score.load_feature_net(tmp_path / "net.pt")
    assert loaded.info == {"resolution": 32} and not loaded.training
    np.testing.assert_array_equal(score.extract_features(loaded, images), score.extract_features(net, images))
    with pytest.raises(ValueError, match="at least 2 values per label"):
        score.train_feature_net(images, np.stack([orientation, ["one"] * 256], 1), epochs=1)


def test_noise_and_blur_keep_the_colours_and_lose_the_detail():
    x = textures(64, 32, 3) * torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1) + torch.tensor([0.2, -0.3, 0.1]).view(1, 3, 1, 1)
    noise, blur = score.noise_images(x, seed=1), score.blurred(x)
    assert noise.shape == blur.shape == x.shape
    torch.testing.assert_close(noise.mean((0, 2, 3)), x.mean((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(noise.std((0, 2, 3)), x.std((0, 2, 3)), atol=0.01, rtol=0)
    torch.testing.assert_close(blur.mean((0, 2, 3)), x.mean((0, 2, 3)), atol=0.01, rtol=0)
    detail = lambda y: score.laplacian_pyramid(y, 2)[0].abs().mean()  # noqa: E731
    assert detail(blur) < 0.2 * detail(x) < detail(noise)
    torch.testing.assert_close(score.noise_images(x, seed=1), noise)  # seeded
