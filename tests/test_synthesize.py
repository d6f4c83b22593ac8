import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from biomedsynth.evidence import feature_net_space
from biomedsynth.gan import feature_net as FN
from biomedsynth.gan import score
from biomedsynth.params import gan_stage_table
from biomedsynth.store import ImageSet, ImageSetWriter, write_json
from biomedsynth.synthesize import (average_hash, calibrate_hash_threshold, check_sets, feature_space_reliability,
                                    nearest_hamming, synthesize)

SIDE = 32
THRESHOLD = 45
LABELS = {"F_18-27": 5, "M_18-27": 3, "F_28-38": 4}  # label -> training images


def xray_like(rng, n, side=SIDE):
    """A bright torso with two dark lungs, jittered in place and size, plus noise: a global body shape."""
    yy, xx = (np.mgrid[:side, :side] + 0.5) / side
    out = np.empty((n, side, side, 1), np.uint8)
    for k in range(n):
        j = rng.normal(0, 0.02, 6)
        img = np.where(((xx - 0.5) / (0.42 + j[0])) ** 2 + ((yy - 0.6) / (0.55 + j[1])) ** 2 < 1, 200.0, 20.0)
        for cx in (0.3 + j[2], 0.7 + j[3]):
            img[((xx - cx) / (0.13 + j[4])) ** 2 + ((yy - 0.45) / (0.25 + j[5])) ** 2 < 1] = 60
        out[k, ..., 0] = np.clip(img + rng.normal(0, 12, img.shape), 0, 255)
    return out


def scramble(images, rng, block=8):
    """Shuffle each image's block x block tiles: the same pixels, no body shape."""
    n, h, w, c = images.shape
    g = h // block
    tiles = images.reshape(n, g, block, g, block, c).swapaxes(2, 3).reshape(n, g * g, block, block, c)
    tiles = np.stack([t[rng.permutation(g * g)] for t in tiles])
    return tiles.reshape(n, g, g, block, block, c).swapaxes(2, 3).reshape(images.shape)


def write_set(path, images, labels, rng):
    with ImageSetWriter(path, images.shape[1:]) as w:
        for i, (img, lab) in enumerate(zip(images, labels)):
            w.add(img, image_id=f"img{i}", patient_id=str(i // 2), label=lab, sex=lab[0],
                  age=int(rng.integers(18, 39)), age_bin=lab[2:], source=f"raw/{i}.png")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny X-ray-like study group: train with LABELS' counts (x4), test from the same distribution, and
    the feature space of a small FeatureNet trained on it (saved and loaded as the GAN stage's)."""
    root, rng = tmp_path_factory.mktemp("real"), np.random.default_rng(100)
    train_labels = [lab for lab, n in LABELS.items() for _ in range(4 * n)]
    train = xray_like(rng, len(train_labels))
    write_set(root / "train", train, train_labels, rng)
    val, val_labels = xray_like(rng, 200), [list(LABELS)[i % 3] for i in range(200)]
    write_set(root / "val", val, val_labels, rng)
    write_set(root / "test", xray_like(rng, 200), [list(LABELS)[i % 3] for i in range(200)], rng)
    net = score.train_feature_net(train, train_labels, epochs=2, batch_size=16, width=8, input_size=32)
    score.save_feature_net(net, root / "feature_net.pt")
    # its metrics as the feature_net stage measures them, on held-out images (xray_like draws ignore the label)
    accuracy = FN.heldout_accuracy(net, val, pd.DataFrame({"label": val_labels}), [sorted(LABELS)])
    write_json(root / "feature_net.json", {"modality": "xray", **FN.chance_summary("xray", accuracy)})
    return root, train, train_labels, feature_net_space(root / "feature_net.pt")


def fresh(label, n, rng):
    return xray_like(rng, n)


def run(real, tmp_path, sample, name="syn", **kw):
    root = real[0]
    args = dict(resolution=SIDE, hash_screen=True, hash_threshold=THRESHOLD, hash_quantile=0.99, hash_size=16,
                max_tries_factor=4.0, batch_size=8, feature_space=real[3], evidence_images=100, evidence_side=16,
                pca_dims=16, prdc_k=5, cells=50, seed=0, figure_path=tmp_path / f"{name}.png",
                feature_net_metrics=json.loads((root / "feature_net.json").read_text()))
    return synthesize(sample, root / "train", kw.pop("val", root / "val"), kw.pop("test", root / "test"), tmp_path / name,
                      **{**args, **kw})


def test_average_hash_hand_computed_and_batched_memmap(tmp_path):
    img = np.array([[0, 20, 10, 30],
                    [20, 0, 30, 10],
                    [100, 120, 40, 40],
                    [120, 100, 40, 40]], np.uint8)
    # 2x2 cell means 10, 20, 110, 40; their mean 45: only the lower-left cell is above it
    assert average_hash(img[None, ..., None], hash_size=2).tolist() == [[False, False, True, False]]
    # channel mean (img + 255 - img + img) / 3 is increasing in img: the same bits
    rgb = np.stack([img, 255 - img, img], -1)[None]
    assert average_hash(rgb, hash_size=2).tolist() == [[False, False, True, False]]
    many = xray_like(np.random.default_rng(1), 5)
    np.save(tmp_path / "a.npy", many)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert np.array_equal(average_hash(mapped, batch_size=2), average_hash(many))
    assert average_hash(many).shape == (5, 256)


def test_nearest_hamming_equals_brute_force():
    rng = np.random.default_rng(2)
    ref, query = rng.random((300, 64)) > 0.5, rng.random((50, 64)) > 0.5
    query[:3] = ref[[7, 150, 299]]
    brute = (query[:, None] != ref[None]).sum(-1).min(1)
    got = nearest_hamming(query, ref, chunk=7)
    assert got.tolist() == brute.tolist() and got[:3].tolist() == [0, 0, 0]


def test_screen_keeps_body_shapes_and_rejects_scrambled(real, tmp_path):
    rng = np.random.default_rng(3)
    train_hash = average_hash(real[1])
    keep, scrambled = xray_like(rng, 20), scramble(xray_like(rng, 20), rng)
    assert (nearest_hamming(average_hash(keep), train_hash) <= THRESHOLD).all()
    assert (nearest_hamming(average_hash(scrambled), train_hash) > THRESHOLD).all()

    def half_scrambled(label, n, rng):  # even draws intact, odd draws scrambled
        x = xray_like(rng, n)
        x[1::2] = scramble(x[1::2], rng)
        return x

    m = run(real, tmp_path, half_scrambled)
    assert m["rejected"] == sum(v["drawn"] // 2 for v in m["per_label"].values())
    assert m["images"] == len(real[2]) and m["drawn"] - m["rejected"] >= m["images"]
    assert 0.4 < m["rejection_rate"] < 0.6 and m["real_rejection_rate"] == 0.0
    out = ImageSet(tmp_path / "syn")
    assert (nearest_hamming(average_hash(next(out.batches(batch_size=1000))), train_hash) <= THRESHOLD).all()


def test_matches_label_counts_and_copies_label_constant_columns(real, tmp_path):
    def small(label, n, rng):  # the GAN runs at half the real side
        return xray_like(rng, n, SIDE // 2)

    m = run(real, tmp_path, small, resolution=SIDE // 2, hash_screen=False, batch_size=3)
    out = ImageSet(tmp_path / "syn")
    assert out.shape == (SIDE // 2, SIDE // 2, 1)
    want = pd.Series(real[2]).value_counts().sort_index()
    assert out.meta["label"].value_counts().sort_index().to_dict() == want.to_dict()
    assert {k: v["images"] for k, v in m["per_label"].items()} == want.to_dict()
    assert m["rejected"] == 0 and m["drawn"] == len(out) == m["images"]
    assert out.meta["image_id"].tolist() == [f"syn-{i:06d}" for i in range(len(out))]
    assert set(out.meta.columns) == {"image_id", "label", "source", "sex", "age_bin", "draw", "near_copy"}  # age varies
    assert (out.meta["source"] == "synthetic").all()
    assert (out.meta["sex"] == out.meta["label"].str[0]).all()
    assert (out.meta["age_bin"] == out.meta["label"].str[2:]).all()


def test_each_draw_is_a_whole_copy_with_fresh_latents(real, tmp_path):
    seen = []

    def recorded(label, n, rng):
        batch = xray_like(rng, n)
        seen.append(batch)
        return batch

    m = run(real, tmp_path, recorded, hash_screen=False, draws=3)
    out = ImageSet(tmp_path / "syn")
    want = pd.Series(real[2]).value_counts().sort_index().to_dict()
    assert m["draws"] == 3 and m["images"] == len(out) == 3 * len(real[1])
    for draw in range(3):
        assert out.meta[out.meta["draw"] == draw]["label"].value_counts().sort_index().to_dict() == want
    assert {k: v["images"] for k, v in m["per_label"].items()} == {k: 3 * v for k, v in want.items()}
    images = np.stack([out[i] for i in range(len(out))])
    assert len(np.unique(images.reshape(len(out), -1), axis=0)) == len(out)  # no image repeats across draws


def test_cap_names_the_label_when_nothing_passes(real, tmp_path):
    def noise(label, n, rng):
        return rng.integers(0, 256, (n, SIDE, SIDE, 1), dtype=np.uint8)

    with pytest.raises(ValueError, match=r"label 'F_18-27' got 0 of 20 images after 60 drawn.*hash_threshold=45"):
        run(real, tmp_path, noise, max_tries_factor=3.0)
    assert not (tmp_path / "syn").exists()


def test_rejects_a_sampler_of_the_wrong_shape(real, tmp_path):
    with pytest.raises(ValueError, match=r"sampler gave uint8 \(8, 16, 16, 1\) for label 'F_18-27'"):
        run(real, tmp_path, lambda label, n, rng: xray_like(rng, n, SIDE // 2))


def test_evidence_flags_copies_not_fresh_images(real, tmp_path):
    _, train, labels, _ = real
    by_label = {lab: train[np.array(labels) == lab] for lab in LABELS}

    def copies(label, n, rng):
        return by_label[label][rng.integers(0, len(by_label[label]), n)]

    c = run(real, tmp_path, copies, name="copies")
    f = run(real, tmp_path, fresh, name="fresh")
    assert c["evidence"]["images"] == {"synthetic": len(labels), "heldout": len(labels), "train": len(labels)}
    assert c["evidence"]["copying"] and c["evidence"]["near_duplicates"] == len(labels)
    for space in ("pixels", "features"):
        e = c["evidence"][space]
        assert e["copying"] and e["c_t"] < -3 and e["authentic"] == 0 and e["dcr_median"] < 1e-3
        assert e["authentic_heldout"] > 0.3 and e["dcr_share_below_q01"] == 1.0
    assert not f["evidence"]["copying"] and f["evidence"]["near_duplicates"] <= 2
    for space in ("pixels", "features"):
        e = f["evidence"][space]
        assert not e["copying"] and e["c_t"] > -3
        assert abs(e["authentic"] - e["authentic_heldout"]) < 0.25 and e["dcr_share_below_q05"] <= 0.15
        assert e["prdc"]["coverage"] > 0.5 and set(e["prdc_per_label"]) == set(LABELS)
    assert (tmp_path / "copies.png").read_bytes()[:4] == b"\x89PNG"
    # membership inference: the copies hold about 1 - 1/e of the training images (drawn with replacement), which
    # sit at distance 0 from the set; fresh images favour no one
    auc = {kind: {space: r["evidence"][space]["membership"] for space in ("pixels", "features", "hash")}
           for kind, r in (("copies", c), ("fresh", f))}
    print("membership AUC:", {k: {s: round(m["value"], 3) for s, m in v.items()} for k, v in auc.items()})
    for space in ("pixels", "features"):
        assert auc["copies"][space]["value"] > 0.75 and auc["copies"][space]["low"] > 0.6
        assert abs(auc["fresh"][space]["value"] - 0.5) < 0.15 and auc["fresh"][space]["low"] < 0.5
    # the verdict's false-positive rate on halves of the held-out sample, beside the verdict
    for r in (c, f):
        fpr = r["evidence"]["false_positive_rate"]
        assert fpr["splits"] == 200 and fpr["rate"] <= 0.02 and fpr["of_heldout"] == len(labels)


def test_the_features_space_is_marked_unreliable_when_its_net_is_not_better_than_chance(real, tmp_path):
    """The fixture's net learnt labels its images do not carry (xray_like ignores them): its metrics flag it, and
    synthesize's evidence marks the features space unreliable with the net's warning; the other spaces stand. A net
    clearly above chance leaves the space reliable; metrics from before the test are a one-line error."""
    net = json.loads((real[0] / "feature_net.json").read_text())
    assert net["better_than_chance"]["overall"] is False and len(net["warnings"]) == 1
    assert net["warnings"][0].startswith("the label head's held-out accuracy")
    r = run(real, tmp_path, fresh, name="mark")
    assert r["evidence"]["features"]["reliable"] is False
    assert r["evidence"]["features"]["unreliable_because"] == net["warnings"]
    assert "reliable" not in r["evidence"]["pixels"] and "reliable" not in r["evidence"]["hash"]
    separable = FN.chance_summary("xray", {"sex": {"accuracy": 0.8, "correct": 160, "images": 200, "chance": 0.5}})
    assert feature_space_reliability({"modality": "xray", **separable}) == {"reliable": True}
    with pytest.raises(ValueError, match="hold no better_than_chance test.*feature_net stage again"):
        feature_space_reliability({"modality": "xray", "accuracy": {"sex": 0.8}, "chance": {"sex": 0.5}})


def test_every_image_is_checked_for_near_copies_not_a_sample(real, tmp_path):
    """The evidence measures a sample (here 10 images); the near-copy mark covers each of the set's images: a
    sampler that returns a training image for every fourth draw has exactly those marked."""
    _, train, labels, _ = real
    by_label = {lab: train[np.array(labels) == lab] for lab in LABELS}
    rng_fresh = np.random.default_rng(5)

    def some_copies(label, n, rng):
        out = xray_like(rng_fresh, n)
        out[::4] = by_label[label][rng.integers(0, len(by_label[label]), len(out[::4]))]
        return out

    r = run(real, tmp_path, some_copies, name="some", evidence_images=10, batch_size=4)
    meta = ImageSet(tmp_path / "some").meta
    planted = np.zeros(len(meta), bool)
    planted[::4] = True  # labels in turn, each in batches of 4 that start with a copy (its count: a multiple of 4)
    marked = meta["near_copy"].to_numpy().astype(bool)
    assert r["evidence"]["images"]["synthetic"] == 10
    assert marked[planted].all() and marked[~planted].mean() < 0.1  # a fresh image can sit by a training one
    assert r["evidence"]["screen"] == {"images": len(meta), "near_copies": int(marked.sum()),
                                       "spaces": ["pixels", "features", "hash"]}
    assert sum(v["near_copies"] for v in r["per_label"].values()) == marked.sum()


def test_calibrated_hash_threshold_by_hand():
    train = np.array([[0, 0, 0, 0], [1, 1, 1, 1]], bool)
    heldout = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0]], bool)
    # nearest distances 0, 1, 2, 1, 2, 2 -> sorted 0 1 1 2 2 2; numpy's 'higher' rounds the position q * 5 up
    assert [calibrate_hash_threshold(heldout, train, q) for q in (0.1, 0.2, 0.3, 0.5, 0.99)] == [1, 1, 1, 2, 2]
    assert calibrate_hash_threshold(heldout[:2], train, 0.5) == 1


def test_stage_calibrates_the_hash_threshold_on_val_unless_params_set_it(real, tmp_path):
    root = real[0]
    d_val, d_test = (np.sort(nearest_hamming(average_hash(next(ImageSet(root / side).batches(batch_size=1000))),
                                             average_hash(real[1]))) for side in ("val", "test"))
    m = run(real, tmp_path, fresh, hash_threshold=None, hash_quantile=0.9)
    assert m["hash_threshold"] == d_val[int(np.ceil(0.9 * (len(d_val) - 1)))]
    assert m["hash_threshold_source"] == "calibrated on val" and m["hash_quantile"] == 0.9
    assert m["real_rejection_rate"] == np.mean(d_test > m["hash_threshold"]) > 0  # judged on the test side
    fixed = run(real, tmp_path, fresh, name="fixed")
    assert (fixed["hash_threshold"], fixed["hash_threshold_source"]) == (THRESHOLD, "params")
    assert fixed["hash_quantile"] is None


def test_same_seed_same_output(real, tmp_path):
    files = lambda d: {p.name: p.read_bytes() for p in sorted(d.iterdir())}  # noqa: E731
    a, b = run(real, tmp_path, fresh, name="a"), run(real, tmp_path, fresh, name="b")
    run(real, tmp_path, fresh, name="c", seed=1)
    assert a == b and files(tmp_path / "a") == files(tmp_path / "b") and json.loads(json.dumps(a)) == a
    assert files(tmp_path / "a")["shard-00000.npy"] != files(tmp_path / "c")["shard-00000.npy"]


def test_the_test_side_never_shapes_the_synthetic_set(real, tmp_path):
    """Other test images (here: scrambled val images, far from every training hash) leave the synthetic set byte-identical
    and the calibrated threshold unchanged; only the evidence that judges the set reads them. (The threshold was
    once calibrated on the test side, so test images decided which synthetic images were kept.)"""
    root = real[0]
    val = ImageSet(root / "val")
    keep = [i for i in range(len(val)) if i % 5]
    other_test = tmp_path / "other_test"
    write_set(other_test, scramble(np.stack([val[i] for i in keep]), np.random.default_rng(1)), val.meta["label"].to_numpy()[keep].tolist(),
              np.random.default_rng(0))
    def half_scrambled(label, n, rng):  # the screen keeps the shaped half: which images survive follows the threshold
        images = xray_like(rng, n)
        return np.concatenate([images[:n // 2], scramble(images[n // 2:], rng)])

    a = run(real, tmp_path, half_scrambled, name="a", hash_threshold=None, hash_quantile=0.9)
    b = run(real, tmp_path, half_scrambled, name="b", hash_threshold=None, hash_quantile=0.9, test=other_test)
    assert a["hash_threshold"] == b["hash_threshold"] and a["rejected"] == b["rejected"] > 0
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert a["real_rejection_rate"] != b["real_rejection_rate"] or a["evidence"] != b["evidence"]


def test_check_sets_refuses_before_a_single_image_is_drawn(real, tmp_path):
    """What the evidence once refused after the whole set was drawn (PRDC's k against the sample sizes, held-out
    images of one patient) check_sets refuses from labels and ids alone, and synthesize refuses it before it writes."""
    root = real[0]
    test = ImageSet(root / "test")
    one_patient = tmp_path / "one_patient"
    with ImageSetWriter(one_patient, test.shape) as w:
        for i in range(len(test)):
            w.add(test[i], image_id=f"t{i}", patient_id="p0", label=test.meta["label"][i])
    knobs = dict(hash_threshold=THRESHOLD, hash_quantile=0.99, hash_size=16, max_tries_factor=4.0, draws=1,
                 evidence_images=100, prdc_k=5, seed=0)
    sets = [ImageSet(root / name) for name in ("train", "val", "test")]
    check_sets(*sets, **knobs)  # the fixture's sets pass
    for change, error in ((dict(prdc_k=48), r"compares 48 images per set \(synthesize.evidence.images, the training "
                                            r"and .* sizes\), too few for PRDC with k=48"),
                          (dict(test=one_patient), "come from 1 patient or slide; its false-positive rate needs 2")):
        test_set = ImageSet(change.get("test", root / "test"))
        with pytest.raises(ValueError, match=error):
            check_sets(*sets[:2], test_set, **{**knobs, **{k: v for k, v in change.items() if k != "test"}})
        with pytest.raises(ValueError, match=error):
            run(real, tmp_path, fresh, name="refused", **change)
        assert not (tmp_path / "refused").exists()
    check_sets(*sets, **{**knobs, "prdc_k": 47})  # 48 images per set serve k = 47


@pytest.mark.e2e
def test_a_checkpoint_the_gan_did_not_keep_stops_dvc_repro_before_it_clears_the_synthetic_set(tmp_path):
    """Reproduced first: with synthesize depending on check_params alone, synthesize.checkpoint=epoch_5 on a 2-epoch
    GAN made DVC clear data/synthetic/<name>, then `synthesize` refused. Now check_synthesize stops `dvc repro`
    first, in one line, and the drawn set stays."""
    import yaml
    from test_benchmark import dvc_project
    from test_gan_train import CLI, ROOT as PROJECT, smoke_project, tiny_group

    root = smoke_project(tmp_path / "project")
    tiny_group(root / "data/studygroups/x_norm/test", n=32, seed=2)
    name = "pggan-x_norm-cond"
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    one = {name: gan_stage_table()[name]}
    checked = {"cmd": f"biomedsynth check-synthesize {name}"}  # the one GAN stage this project runs
    stages = {"check_params": stages["check_params"], "check_synthesize": {**stages["check_synthesize"], **checked},
              "check_gan": {**stages["check_gan"], "cmd": f"biomedsynth check-gan {name}",
                            "deps": [d for d in stages["check_gan"]["deps"] if "feature_net/histology" not in d]},
              "train_gan": {**stages["train_gan"], "foreach": one}, "synthesize": {**stages["synthesize"], "foreach": one}}
    env = dvc_project(root, stages)

    def repro(*knobs):
        if knobs:
            subprocess.run(CLI + ["set", *knobs], cwd=root, env=env, check=True, capture_output=True)
        return subprocess.run(["dvc", "repro", f"synthesize@{name}"], cwd=root, env=env, capture_output=True, text=True)

    first = repro()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    synthetic = root / "data/synthetic" / name
    drawn = {p.name: p.read_bytes() for p in synthetic.iterdir()}
    assert "meta.csv" in drawn
    refused = repro("synthesize.checkpoint=epoch_5")
    assert refused.returncode != 0 and f"Running stage 'synthesize@" not in refused.stdout
    assert f"biomedsynth: synthesize@{name}: checkpoint = 'epoch_5': models/gan/{name}/conditional keeps the " \
           "generators of epochs " in refused.stderr, refused.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in synthetic.iterdir()} == drawn


def test_the_hash_screen_applies_where_params_say():
    """The policy in one function (it sat in the CLI): the study's choice screens DCGAN X-rays only."""
    from biomedsynth.synthesize import hash_screened

    assert [hash_screened("dcgan_xray", a, m) for a, m in (("dcgan", "xray"), ("pggan", "xray"), ("dcgan", "histology"))] \
        == [True, False, False]
    assert hash_screened("all", "sg2ada", "histology") and not hash_screened("none", "dcgan", "xray")
