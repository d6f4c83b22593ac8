import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scipy.stats import hypergeom

from biomedsynth.evidence import (ALPHA, assess, copying_statistic, design_effect, excess, excess_p,
                                  false_positive_rate,
                                  feature_net_space, mann_whitney_z, membership_auc, nearest, pixel_pca, prdc,
                                  training_neighbours)
from biomedsynth.gan import score

SIDE = 32


def scans(rng, patients, per_patient=2):
    """Float (N, 1, SIDE, SIDE) images in [0, 1]: per patient three bright blobs at random places, each of the
    patient's images with the blobs slightly moved and pixel noise. Returns (images, patient ids)."""
    yy, xx = (np.mgrid[:SIDE, :SIDE] + 0.5) / SIDE
    images, groups = [], []
    for p in range(patients):
        centres, widths = rng.uniform(0.2, 0.8, (3, 2)), rng.uniform(0.08, 0.2, 3)
        for _ in range(per_patient):
            c = centres + rng.normal(0, 0.02, centres.shape)
            img = sum(np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w ** 2)) for (cx, cy), w in zip(c, widths))
            images.append(np.clip(0.6 * img + rng.normal(0, 0.05, img.shape), 0, 1))
            groups.append(p)
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32), np.array(groups)


@pytest.fixture(scope="module")
def study():
    """Training scans of 150 patients, held-out scans of 150 others (ids 1000 on), and their pixel-PCA space."""
    rng = np.random.default_rng(0)
    train, groups = scans(rng, 150)
    heldout, heldout_groups = scans(rng, 150)
    return train, groups, heldout, heldout_groups + 1000, pixel_pca(train, 16, 32, seed=0)


def assess_on(study, synthetic):
    train, groups, heldout, heldout_groups, space = study
    return assess(space(train), groups, space(heldout), space(synthetic), heldout_groups=heldout_groups, seed=0)


def evidence_of(study, synthetic):
    return assess_on(study, synthetic).metrics


def test_nearest_equals_brute_force_and_skips_own_group():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(40, 5)), rng.normal(size=(300, 5))
    qg, rg = rng.integers(0, 30, 40), rng.integers(0, 30, 300)
    full = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1))
    d, i = nearest(q, r, 3, chunk=7)
    np.testing.assert_allclose(d, np.sort(full, 1)[:, :3], atol=1e-9)
    assert (i == np.argsort(full, 1)[:, :3]).all()
    full[qg[:, None] == rg[None]] = np.inf
    d, i = nearest(q, r, 2, qg, rg, chunk=7)
    assert (i == np.argsort(full, 1)[:, :2]).all() and (qg[:, None] != rg[i]).all()
    ids = np.arange(300)  # self-matches left out: each row's nearest other row
    assert (nearest(r, r, 1, ids, ids)[1][:, 0] != ids).all()
    d, i = nearest(q[:2], r[:1], 2)  # too few reference rows
    assert np.isinf(d[:, 1]).all() and (i[:, 1] == -1).all()


def test_prdc_by_hand_against_itself_and_of_one_repeated_image():
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [1.6], [20.0], [21.0]])
    # k=1 radii: real 1, 1, 1, 8; fake 1.1, 1.1, 1, 1. precision: 0.5 and 1.6 lie in a real ball, 20 and 21 do
    # not; density: 0.5 is inside 2 balls (of 0 and 1), 1.6 inside 2 (of 1 and 2) -> 4 / (1 * 4); recall: 0, 1
    # and 2 lie in the balls of 0.5 or 1.6, 10 in none; coverage: the balls of 0, 1 and 2 hold a fake sample
    assert prdc(real, fake, k=1) == {"precision": 0.5, "recall": 0.75, "density": 1.0, "coverage": 0.75}
    x = np.random.default_rng(2).normal(size=(300, 16))
    assert prdc(x, x, k=5) == pytest.approx({"precision": 1, "recall": 1, "density": 1, "coverage": 1}, abs=0.02)
    one = prdc(x, np.repeat(x[:1] + 0.01, 300, 0), k=5)
    assert one["coverage"] < 0.05 and one["recall"] == 0
    with pytest.raises(ValueError, match="more than 5 samples"):
        prdc(x, x[:5])


def test_copying_statistic_by_hand():
    # cell 0: synthetic 1, 2 vs held-out 3, 4: no pair with synthetic farther, U = 0
    z0 = (0 - 2) / np.sqrt(2 * 2 * 5 / 12)
    assert mann_whitney_z([1, 2], [3, 4]) == pytest.approx(z0)
    # cell 1: synthetic 5, 6 vs held-out 1..4: every pair, U = 8 of 8
    z1 = (8 - 4) / np.sqrt(2 * 4 * 7 / 12)
    cells_h, dist_h = [0, 0, 1, 1, 1, 1, 2], [3, 4, 1, 2, 3, 4, 9]
    cells_s, dist_s = [0, 0, 1, 1, 2], [1, 2, 5, 6, 9]  # cell 2 has 1 synthetic image: left out at min 2
    got = copying_statistic(cells_h, dist_h, cells_s, dist_s, n_cells=3, min_synthetic=2)
    assert got["c_t"] == pytest.approx((2 / 7 * z0 + 4 / 7 * z1) / (6 / 7))
    assert (got["c_t_cells"], got["c_t_cells_used"], got["c_t_heldout_mass_used"]) == (3, 2, pytest.approx(6 / 7))
    assert copying_statistic(cells_h, dist_h, cells_s, dist_s, n_cells=3, min_synthetic=3)["c_t"] is None


def test_an_excess_is_fishers_exact_one_sided_test_with_no_margin():
    # 3 of 10 vs 0 of 10: P(X >= 3) for X hypergeometric (20 images, 3 near copies, 10 drawn as synthetic)
    assert excess_p(3, 10, 0, 10) == pytest.approx(hypergeom.sf(2, 20, 3, 10))
    assert excess_p(0, 10, 3, 10) == 1.0 and excess_p(0, 50, 0, 50) == 1.0  # one-sided; nothing to test
    # 2-4% near copies among 1000 images against none held out: the old rule (5 points and 3 standard errors) let
    # them pass; the exact test flags them
    assert excess(0.02, 1000, 0.0, 1000) and excess(0.04, 1000, 0.0, 1000)
    assert not excess(0.1, 10, 0.0, 10)  # 1 of 10 vs 0 of 10: p = 0.5
    assert excess(0.12, 100, 0.01, 100) and not excess(0.04, 100, 0.01, 100)
    # held-out scans in patients: counts and sizes enter divided by the design effect
    assert excess_p(6, 40, 4, 40, 1.0, 2.0) == excess_p(6, 40, 2, 20)


def test_design_effect_by_hand():
    # 10 patients of 2 scans, 3 with both scans flagged: share 0.3; the cluster-robust variance 10/9 * 8.4 / 20**2
    # over the binomial 0.21 / 20: 2 (each patient's pair counts once) times 10/9 (few clusters)
    flags = np.repeat([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], 2)
    assert design_effect(flags, np.repeat(np.arange(10), 2)) == pytest.approx(2 * 10 / 9)
    assert design_effect(flags, np.arange(20)) == pytest.approx(20 / 19)  # one scan per patient: ~1
    assert design_effect(flags) == 1.0 and design_effect(np.zeros(6), np.repeat([0, 1], 3)) == 1.0


def test_the_exact_test_keeps_its_level_on_sets_drawn_alike():
    """Both shares drawn from one rate: the test flags at most ALPHA of such pairs (Fisher's is conservative)."""
    rng = np.random.default_rng(11)
    for rate, n in ((0.05, 500), (0.01, 400), (0.2, 60)):
        counts = rng.binomial(n, rate, (2000, 2))
        flagged = np.mean([excess_p(a, n, b, n) < ALPHA for a, b in counts])
        assert flagged <= ALPHA, (rate, n, flagged)


def test_authenticity_radius_belongs_to_the_nearest_training_image():
    # 1-D training points and patients: 0 and 0.1 (patient a), 1 (b), 100 (c), 130 (d)
    train, groups = np.array([[0.0], [0.1], [1.0], [100.0], [130.0]]), np.array(["a", "a", "b", "c", "d"])
    nb = training_neighbours(np.array([[95.0], [0.6], [-0.5], [60.0]]), train, groups)
    # radii: 100 -> 130 at 30; 1 -> 0.1 at 0.9; 0 -> 1 at 1 (its own patient's 0.1 does not count)
    assert nb.index.tolist() == [3, 2, 0, 3] and nb.train_radius.tolist() == pytest.approx([30, 0.9, 1, 30])
    # 95 lies 5 from 100: not authentic. The radius of training image 0 (the query's own index, 1) would
    # call it authentic. 60 lies 40 from 100, farther than 30: authentic.
    assert nb.authentic.tolist() == [False, False, False, True]
    # NN ratio: distance to the nearest over the nearest of another patient than that one's
    assert nb.ratio.tolist() == pytest.approx([5 / 35, 0.4 / 0.5, 0.5 / 1.5, 40 / 59])


def test_training_images_with_slight_noise_are_copying(study):
    train = study[0]
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(6)) * 0.01
    m = evidence_of(study, (train + noise).clamp(0, 1))
    # ~20 synthetic and held-out images per cell, all synthetic closer: Z ~ -sqrt(1.5 * 20) in every cell
    assert m["copying"] and m["c_t"] < -4 and m["c_t_cells_used"] == m["c_t_cells"] == 15
    assert m["authentic"] < 0.05 < 0.3 < m["authentic_heldout"]
    assert m["near_copy_share"] > 0.9 and m["dcr_share_below_q01"] > 0.9


def test_heldout_images_of_the_same_distribution_are_not_copying(study):
    fresh, _ = scans(np.random.default_rng(3), 150)
    m = evidence_of(study, fresh)
    assert not m["copying"] and abs(m["c_t"]) < 3 and abs(m["authentic"] - m["authentic_heldout"]) < 0.1
    assert m["prdc"]["coverage"] > 0.8 and abs(m["prdc"]["coverage"] - m["prdc_heldout"]["coverage"]) < 0.1


def test_a_blurred_average_of_many_images_is_not_a_copy(study):
    train, rng = study[0], np.random.default_rng(7)
    means = torch.stack([train[rng.choice(len(train), 50, replace=False)].mean(0) for _ in range(300)])
    blurred = F.avg_pool2d(F.pad(means, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    m = evidence_of(study, blurred)
    # closer to the training set than held-out images are (C_T and authenticity alone would call it copying),
    # but to its middle, not to any one patient
    assert m["c_t"] < -3 and m["authentic"] < 0.1 < m["authentic_heldout"]
    assert not m["copying"] and m["near_copy_share"] == 0 and m["nn_ratio_median"] > 0.8
    assert m["prdc"]["recall"] < 0.05


def test_membership_auc_is_near_half_for_fresh_images_and_near_one_for_copies(study):
    """GAN-Leaks' full black-box attack: fresh scans of other patients leak nothing (AUC ~0.5, its interval holding
    0.5); training scans with slight noise expose every member (AUC ~1)."""
    fresh, _ = scans(np.random.default_rng(3), 150)
    m = evidence_of(study, fresh)["membership"]
    assert abs(m["value"] - 0.5) < 0.06 and m["low"] < 0.5 < m["high"] and m["high"] - m["low"] < 0.2
    assert (m["members"], m["nonmembers"]) == (300, 300) and m["interval"].startswith("percentile bootstrap")
    train = study[0]
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(6)) * 0.01
    m = evidence_of(study, (train + noise).clamp(0, 1))["membership"]
    assert m["value"] > 0.99 and m["low"] > 0.97


def test_membership_auc_by_hand_and_its_interval_resamples_patients():
    # 1-D: synthetic images at 0 and 10; members at 0.1, 9.8 (distances 0.1, 0.2), non-members at 5, 0.3, 4
    # (distances 5, 0.3, 4): every member is closer than every non-member
    synthetic = np.array([[0.0], [10.0]])
    members, nonmembers = np.array([[0.1], [9.8]]), np.array([[5.0], [0.3], [4.0]])
    m = membership_auc(members, ["a", "b"], nonmembers, ["c", "d", "e"], synthetic, n_boot=200)
    assert m["value"] == 1.0 and (m["members"], m["nonmembers"]) == (2, 3)
    # with non-member 0.3 at 0.05 instead, it beats both members: 4 of 6 pairs right
    m = membership_auc(members, ["a", "b"], np.array([[5.0], [0.05], [4.0]]), ["c", "d", "e"], synthetic, n_boot=200)
    assert m["value"] == pytest.approx(4 / 6)
    assert m["interval"].startswith("cluster t")  # 2 and 3 patients: too few for a percentile bootstrap


def test_false_positive_rate_of_the_verdict_on_halves_of_held_out_images(study):
    """Held-out images judged against held-out images: the verdict should flag about ALPHA of the splits or fewer,
    even where a fifth of the held-out patients' scans are near copies of training scans (images that sit across
    the split), which makes the halves' near-copy shares differ by chance."""
    train, groups, heldout, heldout_groups, space = study
    found = {"pixels": assess_on(study, heldout)}
    clean = false_positive_rate(found, heldout_groups)
    assert clean["splits"] == 200 and clean["rate"] <= ALPHA and clean["of_heldout"] == 300
    assert sum(clean["half_images"]) == 300  # whole patients (2 scans each) on either side
    noise = torch.randn(train.shape, generator=torch.Generator().manual_seed(8)) * 0.01
    mixed = heldout.clone()
    copied = np.isin(heldout_groups, heldout_groups[::10])  # 30 of 150 patients: both their scans
    mixed[copied] = (train[: int(copied.sum())] + noise[: int(copied.sum())]).clamp(0, 1)
    f = assess(space(train), groups, space(mixed), space(heldout), heldout_groups=heldout_groups, seed=0)
    assert f.metrics["near_copy_share_heldout"] > 0.15
    rate = false_positive_rate({"pixels": f}, heldout_groups)["rate"]
    print(f"verdict's false-positive rate on halves of 300 held-out images: {clean['rate']:.3f} clean, "
          f"{rate:.3f} with 20% near copies")
    assert rate <= 2 * ALPHA


def test_pixel_pca_keeps_distances_in_the_data_subspace_and_caps_dims():
    rng = np.random.default_rng(4)
    basis = rng.normal(size=(2, 3, 8, 8))
    coef = rng.normal(size=(40, 2))
    images = torch.tensor(0.5 + 0.05 * np.einsum("nk,kchw->nchw", coef, basis), dtype=torch.float32)
    space = pixel_pca(images, 8, dims=5, seed=0)
    feats, pixels = space(images), images.flatten(1).numpy()
    assert feats.shape == (40, 5) and space.dims == 5
    pair = lambda x: np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))  # noqa: E731
    np.testing.assert_allclose(pair(feats), pair(pixels), atol=1e-4)
    assert pixel_pca(images[:3], 4, dims=64).dims == 3  # at most as many axes as images


def test_feature_net_space_is_the_saved_nets_features(tmp_path):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, 16, 16, 1), dtype=np.uint8)
    net = score.train_feature_net(images, ["a", "b"] * 16, epochs=1, batch_size=16, width=4, input_size=16)
    score.save_feature_net(net, tmp_path / "net.pt")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    np.testing.assert_allclose(feature_net_space(tmp_path / "net.pt")(x), score.extract_features(net, images),
                               atol=1e-5)
