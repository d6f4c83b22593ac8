"""Report: Table 3 and the claim from known metrics; a self-contained HTML and a Markdown whose figures exist."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from biomedsynth.report import STUDY_TABLE3, _growth_epochs, _sample_pairs, summarise, write_report
from biomedsynth.store import ImageSet, ImageSetWriter

TASKS = ("histology", "xray_sex", "xray_age")
HOLDS = {"vgg16": (0.90, 0.88), "knn": (0.80, 0.72), "svm": (0.80, 0.70), "rf": (0.80, 0.76)}  # deep 2.2%, LBP 10%
FAILS = {**HOLDS, "vgg16": (0.90, 0.72)}  # deep 20%
REAL_VALUE = {"A": 40, "B": 200}  # real images are flat grey by label; synthetic ones 10 brighter
GANS = ("pggan-xg-uncond", "dcgan-xg-cond")


def interval(v):
    return {"value": v, "low": v - 0.05, "high": v + 0.05}


def write_metrics(root, accuracies):
    for task in TASKS:
        for model, (real, syn) in accuracies.items():
            side = {"accuracy": interval(real), "balanced_accuracy": interval(real), "auc": interval(real),
                    "confusion": [[9, 1], [2, 8]]}
            drop = (real - syn) / real
            m = {"real": side, "synthetic": {**side, "accuracy": interval(syn)}, "seeds": {}, "test_images": 20,
                 "drop": {k: interval(drop) for k in ("accuracy", "balanced_accuracy", "auc")}}
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{model}.json").write_text(json.dumps(m))


def test_summarise_table_and_claim_holds(tmp_path):
    write_metrics(tmp_path, HOLDS)
    s = summarise(tmp_path)
    assert set(s) == {*TASKS, "claims"} and set(s["xray_age"]) == set(HOLDS)
    assert s["histology"]["knn"]["real"] == {"value": 0.8, "low": 0.75, "high": 0.85}
    assert s["xray_sex"]["rf"]["synthetic"]["value"] == 0.76
    assert s["xray_sex"]["rf"]["drop"]["value"] == 0.05
    c = s["claims"]
    assert c["deep_drop_mean"] == pytest.approx(0.0222, abs=1e-4)
    assert c["lbp_drop_mean"] == pytest.approx((0.1 + 0.125 + 0.05) / 3, abs=1e-4)
    assert c["deep_drop_below_lbp"] is True
    study = [STUDY_TABLE3[t]["vgg16"][2] for t in TASKS]
    assert c["study_deep_drop_mean"] == pytest.approx(np.mean(study), abs=1e-4)
    assert c["study_lbp_drop_mean"] == pytest.approx(0.8207 / 9, abs=1e-4)  # SPEC 6: (7.45 + 5.56 + ... + 12.50)% / 9


def test_summarise_claim_fails_and_models_present(tmp_path):
    write_metrics(tmp_path, FAILS)
    c = summarise(tmp_path)["claims"]
    assert c["deep_drop_mean"] == pytest.approx(0.2, abs=1e-4) and c["deep_drop_below_lbp"] is False
    only_lbp = summarise(tmp_path, models=("knn", "rf"))
    assert set(only_lbp["histology"]) == {"knn", "rf"}
    assert only_lbp["claims"]["deep_drop_mean"] is None and only_lbp["claims"]["deep_drop_below_lbp"] is None
    assert only_lbp["claims"]["lbp_drop_mean"] == pytest.approx(0.075, abs=1e-4)


def test_missing_model_file_is_named(tmp_path):
    write_metrics(tmp_path, HOLDS)
    (tmp_path / "xray_age" / "svm.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"xray_age/svm\.json"):
        summarise(tmp_path)


def test_growth_epochs_last_epoch_per_side():
    rows = [{"epoch": e, "side": s} for e, s in enumerate((4, 4, 8, 8, 8, 16), 1)]
    assert _growth_epochs(rows) == [2, 5, 6]
    assert _growth_epochs([{"epoch": 1, "swd": 0.1}]) == []


def write_images(path, labels, side, offset=0):
    with ImageSetWriter(path, (side, side, 1)) as w:
        for i, lb in enumerate(labels):
            w.add(np.full((side, side, 1), REAL_VALUE[lb] + offset, np.uint8), image_id=f"i{i}", label=lb)


def test_sample_pairs_match_labels_and_cover_them(tmp_path):
    write_images(tmp_path / "real", ["A"] * 6 + ["B"] * 3, 16)
    write_images(tmp_path / "syn", ["A"] * 5 + ["B"] * 5, 8, offset=10)
    real, syn, labels = _sample_pairs(ImageSet(tmp_path / "real"), ImageSet(tmp_path / "syn"), 8, seed=0)
    assert real.shape == syn.shape == (8, 8, 8, 1) and sorted(set(labels)) == ["A", "B"]
    assert [int(r.mean()) for r in real] == [REAL_VALUE[lb] for lb in labels]
    assert [int(s.mean()) for s in syn] == [REAL_VALUE[lb] + 10 for lb in labels]
    again = _sample_pairs(ImageSet(tmp_path / "real"), ImageSet(tmp_path / "syn"), 8, seed=0)
    assert labels == again[2] and np.array_equal(real, again[0])


@pytest.fixture
def tree(tmp_path):
    m, models, groups, synthetic = (tmp_path / d for d in ("metrics", "models", "groups", "synthetic"))
    write_metrics(m, HOLDS)
    (m / "tasks.json").write_text(json.dumps({t: {k: {"images": 10, "side": 8} for k in ("real", "synthetic", "test")}
                                              for t in TASKS}))
    write_images(groups / "xg" / "train", ["A", "B"] * 4, 16)
    for name in GANS:
        write_images(synthetic / name, ["A", "B"] * 3, 8, offset=10)
        (m / "gan" / "scores").mkdir(parents=True, exist_ok=True)
        (m / "gan" / f"{name}.json").write_text(json.dumps({"swd_best": 0.1, "kid_best": 0.02}))
        (m / "gan" / "scores" / f"{name}.csv").write_text("epoch,swd,kid\n1,0.3,0.2\n2,0.2,0.1\n3,0.25,0.05\n")
        (m / "synthesize" / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (m / "synthesize" / f"{name}.json").write_text(json.dumps({
            "checkpoint_epochs": {"A": 2, "B": 3}, "hash_screen": True, "rejection_rate": 0.125,
            "real_rejection_rate": 0.0, "copy_check": {"share_closer": 0.01, "threshold": 3.0}}))
        Image.new("L", (20, 10), 128).save(m / "synthesize" / f"{name}-closest.png")
        for model in ("A", "B"):
            sides = (4, 4, 8) if name.startswith("pggan") else (None,) * 3
            rows = [{"epoch": e, "swd": 0.1, **({"side": s} if s else {})} for e, s in enumerate(sides, 1)]
            (models / name / model / "grids").mkdir(parents=True)
            (models / name / model / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            for e in range(1, 4):
                Image.new("L", (40, 20), 60 * e).save(models / name / model / "grids" / f"{e:03d}.png")
    return m, models, groups, synthetic


def test_write_report(tree, tmp_path):
    out = tmp_path / "out"
    write_report(*tree, list(GANS), out)
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == len(re.findall(r"<img\b", page)) == 7  # samples + scores + closest each, growth for PGGAN
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page and "<link" not in page and "<script" not in page
    assert "0.96 → 0.93 (3.12%)" in page and "0.83 → 0.72 (13.25%)" in page  # the study's numbers
    assert "0.880 [0.830, 0.930]" in page and "holds here" in page and "does not hold" not in page
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7 and all(not link.startswith("/") and (out / link).is_file() for link in links)
    assert "figures/pggan-xg-uncond-growth.png" in links and "figures/dcgan-xg-cond-growth.png" not in links
    assert "0.96 → 0.93 (3.12%)" in md
    growth = np.asarray(Image.open(out / "figures" / "pggan-xg-uncond-growth.png"))
    assert growth.shape == (20 + 6 + 20, 40) and growth[0, 0] == 120 and growth[-1, 0] == 180  # epochs 2 and 3
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.md"]  # no temp files left


def test_write_report_needs_every_closest_figure(tree, tmp_path):
    (tree[0] / "synthesize" / "dcgan-xg-cond-closest.png").unlink()
    with pytest.raises(FileNotFoundError, match="dcgan-xg-cond-closest.png"):
        write_report(*tree, list(GANS), tmp_path / "out")
