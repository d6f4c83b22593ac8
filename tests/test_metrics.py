import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from biomedsynth.classify.metrics import (arm_samples, binary_metrics, cluster_weights, degenerate, drops, interval,
                                          interval_rule, joint_cluster_weights, over_replicates, replicate_picks,
                                          weighted_metrics)


def test_binary_metrics_by_hand():
    y = [0, 0, 0, 1, 1]
    pred = [0, 1, 0, 1, 0]
    score = [0.1, 0.6, 0.3, 0.6, 0.2]
    m = binary_metrics(y, pred, score)
    assert m["confusion"] == [[2, 1], [1, 1]]  # [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # positive 0.6 beats 0.1, 0.3 and ties 0.6 (1/2); positive 0.2 beats 0.1 only: (2.5 + 1) / 6
    assert m["auc"] == pytest.approx(3.5 / 6)


def test_weighted_metrics_equal_the_metrics_of_the_repeated_images():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    score = np.round(rng.normal(y, 1.0), 1)  # rounding makes ties
    pred = (score > 0.5).astype(int)
    w = rng.integers(0, 4, (5, len(y))).astype(float)
    w[:, [0, -1]] += 1  # both classes weigh something
    got = weighted_metrics(y, pred, score, w)
    for r, row in enumerate(w.astype(int)):
        idx = np.repeat(np.arange(len(y)), row)
        assert got["auc"][r] == pytest.approx(roc_auc_score(y[idx], score[idx]))
        assert got["accuracy"][r] == pytest.approx(np.mean(pred[idx] == y[idx]))
        assert got["balanced_accuracy"][r] == pytest.approx(binary_metrics(y[idx], pred[idx], score[idx])
                                                            ["balanced_accuracy"])


def test_cluster_weights_draw_whole_clusters_within_their_class_stratum():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    groups = np.array(["a", "a", "b", "c", "c", "d", "e", "e"])  # e holds both classes: its own stratum
    w = cluster_weights(y, groups, n_boot=200, seed=3)
    assert w.shape == (201, 8) and (w[0] == 1).all()
    assert (w[1:, 0] == w[1:, 1]).all() and (w[1:, 3] == w[1:, 4]).all() and (w[1:, 6] == w[1:, 7]).all()
    per_cluster = {g: w[1:, list(groups).index(g)] for g in "abcde"}
    assert (per_cluster["a"] + per_cluster["b"] == 2).all()  # 2 clusters holding only class 0
    assert (per_cluster["c"] + per_cluster["d"] == 2).all()
    assert (per_cluster["e"] == 1).all()  # alone in its stratum: always drawn once
    assert np.array_equal(w, cluster_weights(y, groups, n_boot=200, seed=3))


def test_k_copies_of_every_image_give_the_same_interval_as_one():
    """Copies of a patient's images carry no new information: the cluster bootstrap's interval is unchanged
    (an image bootstrap would shrink it by about sqrt(k))."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    pred = np.where(rng.random(80) < 0.75, y, 1 - y)
    score = pred + rng.random(80)
    groups = np.arange(80).astype(str)
    once = arm_samples(y, [(pred, score)], cluster_weights(y, groups, 1000, seed=0))
    k = 5
    copies = arm_samples(np.tile(y, k), [(np.tile(pred, k), np.tile(score, k))],
                         cluster_weights(np.tile(y, k), np.tile(groups, k), 1000, seed=0))
    for m in once:
        assert interval(copies[m]) == pytest.approx(interval(once[m]))
    # the same copies resampled as independent images: the interval the old bootstrap gave, ~sqrt(k) narrower
    image_wise = arm_samples(np.tile(y, k), [(np.tile(pred, k), np.tile(score, k))],
                             cluster_weights(np.tile(y, k), np.arange(80 * k).astype(str), 1000, seed=0))
    width = lambda d: d["high"] - d["low"]  # noqa: E731
    assert width(interval(image_wise["accuracy"])) < 0.6 * width(interval(once["accuracy"]))


def test_joint_weights_give_a_shared_patient_the_same_weight_in_every_set():
    a = (np.array([0, 1, 1, 0]), np.array(["p1", "p2", "p3", "p4"]))
    b = (np.array([1, 0, 0]), np.array(["p2", "p5", "p1"]))
    w = joint_cluster_weights({"a": a, "b": b}, n_boot=100, seed=0)
    assert np.array_equal(w["a"][:, 1], w["b"][:, 0]) and np.array_equal(w["a"][:, 0], w["b"][:, 2])
    assert np.array_equal(w["a"], joint_cluster_weights({"a": a, "b": b}, n_boot=100, seed=0)["a"])


def _seed(rng, y, accuracy):
    pred = np.where(rng.random(len(y)) < accuracy, y, 1 - y)
    return [(pred, pred + rng.random(len(y)))]


def test_a_duplicated_replicate_gives_the_interval_of_one():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    weights = cluster_weights(y, np.arange(80).astype(str), 500, seed=0)
    one = arm_samples(y, _seed(rng, y, 0.75), weights)
    twice = over_replicates([one, one], replicate_picks(2, 500))
    for m in one:
        np.testing.assert_allclose(twice[m], one[m])
    alone = over_replicates([one], replicate_picks(1, 500))
    for m in one:
        np.testing.assert_array_equal(alone[m], one[m])


def test_replicates_that_disagree_widen_the_interval_to_cover_both():
    """Two replicates, one near 0.95 and one near 0.65: the first alone claims a narrow interval around 0.95;
    resampling the replicates gives their mean and an interval spanning both."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    weights = cluster_weights(y, np.arange(200).astype(str), 1000, seed=0)
    good, bad = (arm_samples(y, _seed(rng, y, a), weights)["accuracy"] for a in (0.95, 0.65))
    both = interval(over_replicates([{"accuracy": good}, {"accuracy": bad}], replicate_picks(2, 1000))["accuracy"])
    alone = interval(good)
    assert both["value"] == pytest.approx((good[0] + bad[0]) / 2)
    assert alone["low"] > bad[0] + 0.2  # what the first replicate alone says: the other is far outside
    assert both["low"] <= bad[0] + 0.02 and both["high"] >= good[0] - 0.02
    assert both["high"] - both["low"] > 3 * (alone["high"] - alone["low"])


def test_replicate_picks_row_0_is_every_replicate_and_rows_are_shared():
    picks = replicate_picks(3, 50, seed=2)
    assert picks.shape == (51, 3) and list(picks[0]) == [0, 1, 2] and set(np.unique(picks[1:])) == {0, 1, 2}
    assert np.array_equal(picks, replicate_picks(3, 50, seed=2))


def _clustered_test_set(rng, clusters_per_class: int, images: int, accuracy: float, spread: float):
    """A test set of `clusters_per_class` slides per class, `images` tiles each, and a model whose accuracy
    varies from slide to slide (Beta around `accuracy`): tiles of one slide succeed or fail together."""
    k = 2 * clusters_per_class
    a = accuracy * (1 / spread - 1)
    per_cluster = rng.beta(a, a * (1 - accuracy) / accuracy, k)
    groups = np.repeat(np.arange(k), images).astype(str)
    y = np.repeat(np.arange(k) % 2, images)
    pred = np.where(rng.random(k * images) < np.repeat(per_cluster, images), y, 1 - y)
    return y, groups, pred


@pytest.mark.parametrize("statistic", ["accuracy", "paired drop"])
def test_with_6_slides_per_class_the_t_interval_keeps_its_coverage(statistic):
    """Test sets of 6 slides per class (as the default histology test set's 6 tumour slides): nominal 95%
    intervals must cover the true value at least 90% of the time. The percentile bootstrap does not (it treats
    the 6 slides as the population and uses normal tails); the cluster t interval does."""
    rng = np.random.default_rng(0)
    sims, covered = 300, {"percentile": 0, "cluster t": 0}
    for _ in range(sims):
        y, groups, pred = _clustered_test_set(rng, 6, 20, 0.8, 0.15)
        weights = cluster_weights(y, groups, 400, seed=int(rng.integers(1 << 30)))
        samples = arm_samples(y, [(pred, pred + 0.0)], weights)["accuracy"]
        truth = 0.8
        if statistic == "paired drop":  # a second model wrong on a random 10% of tiles more, paired
            worse = np.where(rng.random(len(y)) < 0.1, 1 - y, pred)
            samples = samples - arm_samples(y, [(worse, worse + 0.0)], weights)["accuracy"]
            truth = 0.1 * 0.8  # the right predictions among those 10%
        rule = interval_rule(y, groups)
        assert rule["method"] == "cluster t" and rule["df"] == 10
        for name, r in (("percentile", None), ("cluster t", rule)):
            ci = interval(samples, rule=r)
            covered[name] += ci["low"] <= truth <= ci["high"]
    assert covered["cluster t"] / sims >= 0.90
    assert covered["percentile"] < covered["cluster t"]


def test_enough_clusters_keep_the_percentile_interval():
    y = np.repeat([0, 1], 50)
    assert interval_rule(y, np.arange(100).astype(str)) == {"method": "percentile", "fewest_clusters": 50}
    rule = interval_rule(y, (np.arange(100) // 10).astype(str))  # 5 clusters per class
    assert rule == {"method": "cluster t", "fewest_clusters": 5, "df": 8, "inflation": pytest.approx(np.sqrt(5 / 4))}


def test_cluster_interval_covers_the_true_accuracy_of_correlated_patients():
    """Patients with 4 scans that a model gets right or wrong together: the cluster interval keeps ~95%
    coverage where the image-wise one would not."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    groups = (np.arange(400) // 4).astype(str)  # 4 scans per patient, one class per patient
    covered = {"cluster": 0, "image": 0}
    for k in range(150):
        patient_ok = rng.random(100) < 0.8
        pred = np.where(np.repeat(patient_ok, 4), y, 1 - y)
        for kind, g in (("cluster", groups), ("image", np.arange(400).astype(str))):
            ci = interval(arm_samples(y, [(pred, pred + rng.random(400))], cluster_weights(y, g, 400, k))["accuracy"])
            covered[kind] += ci["low"] <= 0.8 <= ci["high"]
    assert 0.88 <= covered["cluster"] / 150 <= 0.99
    assert covered["image"] / 150 < 0.8


def test_paired_drops_and_chance_normalisation():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 150)
    groups = np.arange(300).astype(str)
    hard = rng.random(len(y)) < 0.15  # both models miss the hard images; the synthetic one a few more
    real_ok, synth_ok = ~hard, ~hard & (rng.random(len(y)) > 0.05)
    pred_r, pred_s = np.where(real_ok, y, 1 - y), np.where(synth_ok, y, 1 - y)
    w = cluster_weights(y, groups, 1000, seed=0)
    real = arm_samples(y, [(pred_r, pred_r + 0.5 * rng.random(len(y)))], w)
    synth = arm_samples(y, [(pred_s, pred_s + 0.5 * rng.random(len(y)))], w)
    d = drops(real, synth)
    acc_r, acc_s = real_ok.mean(), synth_ok.mean()
    assert interval(d["relative"]["accuracy"])["value"] == pytest.approx((acc_r - acc_s) / acc_r)
    assert interval(d["chance_normalised"]["accuracy"])["value"] == pytest.approx((acc_r - acc_s) / (acc_r - 0.5))
    paired = interval(d["relative"]["accuracy"])
    assert paired["low"] > 0  # the paired interval sees the drop
    # unpaired: each model on its own independent resamples
    a = arm_samples(y, [(pred_r, pred_r + 0.0)], cluster_weights(y, groups, 1000, seed=10))["accuracy"]
    b = arm_samples(y, [(pred_s, pred_s + 0.0)], cluster_weights(y, groups, 1000, seed=11))["accuracy"]
    low, high = np.percentile((a[1:] - b[1:]) / a[1:], [2.5, 97.5])
    assert paired["high"] - paired["low"] < 0.5 * (high - low)


def test_a_constant_predictor_is_degenerate_and_a_good_one_is_not():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 50)
    groups = np.arange(100).astype(str)
    w = cluster_weights(y, groups, 500, seed=0)
    constant = (np.ones(100, int), rng.random(100))
    acc = interval(arm_samples(y, [constant], w)["accuracy"])
    assert acc["value"] == 0.5
    assert degenerate([constant], acc) == ["predicts one class for 100% of test images",
                                           "accuracy interval contains chance (0.5)"]
    good = (np.where(rng.random(100) < 0.9, y, 1 - y), rng.random(100))
    assert degenerate([good], interval(arm_samples(y, [good], w)["accuracy"])) == []
    # a model right on 96% of images that still calls 96% of them class 1 would be caught by the share rule
    skewed = (np.r_[np.zeros(4, int), np.ones(96, int)], rng.random(100))
    assert "predicts one class for 96% of test images" in degenerate([skewed], {"low": 0.6, "high": 0.7})


def test_single_class_test_set_is_refused():
    with pytest.raises(ValueError, match="only class 1"):
        binary_metrics([1, 1, 1], [1, 0, 1], [0.9, 0.2, 0.7])
    with pytest.raises(ValueError, match="only class 0"):
        weighted_metrics([0, 0], [0, 1], [0.1, 0.8], np.ones((1, 2)))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="y_pred must have shape"):
        binary_metrics([0, 1], [0], [0.1, 0.9])
    with pytest.raises(ValueError, match="y_true must hold only 0/1"):
        binary_metrics([0, 2], [0, 1], [0.1, 0.9])
    with pytest.raises(ValueError, match="non-finite"):
        binary_metrics([0, 1], [0, 1], [0.1, np.nan])




def test_an_undefined_interval_flags_nothing_and_does_not_crash():
    """Found on the privacy fixture: a test class of one slide gives a t interval with None bounds, which the
    chance check compared with 0.5 (TypeError). Undefined tells neither way; the one-class rule still applies."""
    undefined = {"value": 0.7, "low": None, "high": None}
    rng = np.random.default_rng(3)
    assert degenerate([(np.r_[np.zeros(30, int), np.ones(70, int)], rng.random(100))], undefined) == []
    constant = (np.ones(100, int), rng.random(100))
    assert degenerate([constant], undefined) == ["predicts one class for 100% of test images"]
