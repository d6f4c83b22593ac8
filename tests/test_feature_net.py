"""The feature_net stage: one net per modality, trained on the groups' training sides, tested on their validation sides."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from biomedsynth.gan import feature_net as FN
from biomedsynth.gan import score
from biomedsynth.store import ImageSet, ImageSetWriter

SIDE = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def chest(sex: str, age: int, rng) -> np.ndarray:
    """A disc on dark, dimmer with age; women's with two small dark 'breast shadows' low in it; plus noise
    and a small random shift."""
    yy, xx = np.mgrid[:SIDE, :SIDE] - SIDE / 2 - rng.integers(-2, 3, 2)[:, None, None]
    img = 30 + (200 - 2.2 * age) * ((xx / 11) ** 2 + (yy / 10) ** 2 < 1)
    if sex == "F":
        img[((yy - 5) ** 2 + (np.abs(xx) - 5) ** 2) < 9] = 30
    return np.clip(img + rng.normal(0, 12, (SIDE, SIDE)), 0, 255).astype(np.uint8)[..., None]


def tile(tissue: str, rng) -> np.ndarray:
    """Pink ground with dots: many small dark ones (normal) or fewer large pale ones (tumour)."""
    img = np.empty((SIDE, SIDE, 3))
    img[:] = (230, 170, 200)
    n, r, colour = (40, 1.2, (60, 40, 120)) if tissue == "normal" else (10, 3.0, (150, 110, 190))
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for cy, cx in rng.uniform(0, SIDE, (n, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2] = colour
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write_xray(root: Path, seed: int = 0):
    """x_norm and x_norm_l share half their scans (as the real groups do); val patients are other patients."""
    rng = np.random.default_rng(seed)
    for side, patients in (("train", range(0, 120)), ("val", range(1000, 1060))):
        scans = [(f"p{p}", "FM"[p % 2], int(rng.integers(18, 78))) for p in patients]
        for group, part in (("x_norm", scans[: 3 * len(scans) // 4]), ("x_norm_l", scans[len(scans) // 4:])):
            with ImageSetWriter(root / group / side, (SIDE, SIDE, 1)) as w:
                for pid, sex, age in part:
                    w.add(chest(sex, age, np.random.default_rng(int(pid[1:]))), image_id=pid, patient_id=pid,
                          sex=sex, age=age, label=f"{sex}_x")


def write_histology(root: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    for group, tissue in (("h_norm", "normal"), ("h_tumor", "tumor")):
        for side, n in (("train", 80), ("val", 40)):
            with ImageSetWriter(root / group / side, (SIDE, SIDE, 3)) as w:
                for i in range(n):
                    w.add(tile(tissue, rng), image_id=f"{group}-{side}-{i}", patient_id=f"{tissue}-{side}",
                          label=tissue)


@pytest.mark.parametrize("modality, epochs", [("xray", 60), ("histology", 40)])
def test_each_modality_net_separates_its_labels_on_held_out_images(tmp_path, modality, epochs):
    (write_xray if modality == "xray" else write_histology)(tmp_path / "groups")
    out, metrics = tmp_path / "net.pt", tmp_path / "net.json"
    summary = FN.build_feature_net(modality, tmp_path / "groups", SIDE, epochs, 0, out, metrics)
    assert json.loads(metrics.read_text()) == summary
    if modality == "xray":
        assert summary["images"] == {"train": 120, "heldout": 60}  # shared scans counted once
        assert set(summary["accuracy"]) == {"sex", "age"}
        assert summary["accuracy"]["sex"] > 0.85 and summary["chance"]["sex"] == 0.5
    else:
        assert summary["images"] == {"train": 160, "heldout": 80}
        assert summary["accuracy"]["tissue"] > 0.9 and summary["chance"]["tissue"] == 0.5
    assert all(summary["accuracy"][k] > summary["chance"][k] + 0.1 for k in summary["accuracy"])
    check = summary["better_than_chance"]
    assert check["overall"] and all(check["heads"].values()) and summary["warnings"] == []
    assert all(check["interval"][k]["low"] > summary["chance"][k] for k in summary["accuracy"])
    net = score.load_feature_net(out)
    assert net.info["resolution"] == SIDE and net.info["modality"] == modality
    assert list(net.info["heads"]) == list(summary["accuracy"])
    assert summary["fingerprint"] == FN.fingerprint(out)


def write_noise_xray(root: Path, seed: int = 0):
    """Noise images whose sex and age are drawn independently of them: nothing a net can learn."""
    rng = np.random.default_rng(seed)
    for side, n in (("train", 160), ("val", 120)):
        for group in ("x_norm", "x_norm_l"):
            with ImageSetWriter(root / group / side, (SIDE, SIDE, 1)) as w:
                for i in range(n):
                    sex, age = "FM"[int(rng.integers(2))], int(rng.integers(18, 78))
                    w.add(rng.integers(0, 256, (SIDE, SIDE, 1), dtype=np.uint8), image_id=f"{group}-{side}-{i}",
                          patient_id=f"{group}-{side}-{i}", sex=sex, age=age, label=f"{sex}_x")


def test_a_net_of_label_independent_noise_is_flagged_as_no_better_than_chance(tmp_path):
    """Every head is at chance on held-out noise: each is flagged, the net overall, and a warning line per head says
    in numbers why and that the evidence in its space is unreliable."""
    write_noise_xray(tmp_path / "groups")
    summary = FN.build_feature_net("xray", tmp_path / "groups", SIDE, 8, 0, tmp_path / "net.pt", tmp_path / "m.json")
    check = summary["better_than_chance"]
    assert check["heads"] == {"sex": False, "age": False} and check["overall"] is False
    assert check["alpha"] == FN.CHANCE_ALPHA and "binomial" in check["test"]
    assert summary["correct"]["sex"] == round(summary["accuracy"]["sex"] * 240)  # both groups' val sides: 240 images
    assert len(summary["warnings"]) == 2
    sex = next(w for w in summary["warnings"] if w.startswith("the sex head"))
    assert f"{summary['accuracy']['sex']:.3f} ({summary['correct']['sex']} of 240 right" in sex
    assert f"is not above chance {summary['chance']['sex']:.3f}" in sex and "needs p < 0.05" in sex
    assert sex.endswith("KID, PRDC coverage and C_T for X-rays are computed in its space and are unreliable")
    assert json.loads((tmp_path / "m.json").read_text())["better_than_chance"]["overall"] is False


def test_chance_test_known_answers():
    """Exact binomial tails by hand: 60 of 100 beats chance 0.5 (P(X >= 60) = 0.028), 58 of 100 does not (0.067);
    the default run's X-ray age head, 66 of 327 against chance 0.1865, does not (p 0.26) although 0.202 > 0.187."""
    from math import comb

    def tail(k, n, p):
        return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

    for k, n, chance, better in ((60, 100, 0.5, True), (58, 100, 0.5, False), (66, 327, 0.1865, False),
                                 (236, 327, 0.5076, True)):
        t = FN.chance_test(k, n, chance)
        assert t["better_than_chance"] is better and t["p_value"] == pytest.approx(tail(k, n, chance), abs=1e-4)
        assert (t["low"] > chance) is better and t["low"] <= k / n <= t["high"]  # the interval agrees with the test
    with pytest.raises(ValueError, match="not a count"):
        FN.chance_test(5, 3, 0.5)


def test_the_same_data_and_seed_give_the_same_file(tmp_path):
    """So a rerun changes no DVC hash, and the GAN stages (whose options hold the fingerprint) keep their runs."""
    write_histology(tmp_path / "groups")
    prints = [FN.build_feature_net("histology", tmp_path / "groups", SIDE, 1, 0, tmp_path / name, tmp_path / "m.json")
              ["fingerprint"] for name in ("a.pt", "b.pt")]
    assert prints[0] == prints[1] == FN.fingerprint(tmp_path / "b.pt")


def test_read_resized_gives_what_the_scorer_feeds_the_net(tmp_path):
    write_xray(tmp_path)
    refs, _ = FN.pooled([ImageSet(tmp_path / "x_norm" / "train")])
    small = FN.read_resized(refs[:8], 16, tmp_path / "a.npy")   # below the net's input side: kept at 16
    large = FN.read_resized(refs[:8], 128, tmp_path / "b.npy")  # above: resized to 64
    assert small.shape == (8, 16, 16, 1) and large.shape == (8, FN.INPUT_SIZE, FN.INPUT_SIZE, 1)
    x = torch.nn.functional.interpolate(score.as_model_images(np.stack([s[i] for s, i in refs[:8]])), size=16,
                                        mode="area")
    np.testing.assert_allclose(score.as_model_images(small).numpy(), x.numpy(), atol=1 / 127.5)


def test_xray_augmentation_shifts_but_never_mirrors_and_tiles_take_every_orientation():
    img = torch.full((1, 1, SIDE, SIDE), -1.0)
    img[..., :, :8] = 1.0  # a bright left edge (the heart side, say)
    rng = np.random.default_rng(0)
    shifted = FN.augmentation("xray")(img.repeat(64, 1, 1, 1), rng)
    assert shifted.shape == (64, 1, SIDE, SIDE)
    assert (shifted[..., :, :4].mean((1, 2, 3)) > 0.9).all() and (shifted[..., :, -4:].mean((1, 2, 3)) < -0.9).all()
    assert len({tuple(s[0, 0].tolist()) for s in shifted}) > 1  # moved
    corner = torch.full((1, 3, SIDE, SIDE), -1.0)
    corner[..., :4, :2] = 1.0  # an asymmetric mark: each of the 8 orientations puts it elsewhere
    seen = {tuple(torch.nonzero(t[0] > 0).min(0).values.tolist() + torch.nonzero(t[0] > 0).max(0).values.tolist())
            for t in FN.dihedral(corner.repeat(64, 1, 1, 1), rng)}
    assert len(seen) == 8
