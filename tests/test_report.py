"""Report: Table 3 and the claim from known metrics; a self-contained HTML and a Markdown whose figures exist."""
import html
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from biomedsynth.gan.feature_net import chance_summary
from biomedsynth.report import (_growth_epochs, _sample_pairs, _synthetic_accuracies, generators_markdown, readme_markers,
                                run_warnings, table3_markdown, write_report)
from biomedsynth.store import ImageSet, ImageSetWriter
from biomedsynth.synthesize import feature_space_reliability
from biomedsynth.cli import app
from biomedsynth.report import README_END, README_START
from biomedsynth.table3 import write_table3
from typer.testing import CliRunner
from test_table3 import BETTER, COSTLY, HOLDS, STAGES, TASKS, _stages, plant

REAL_VALUE = {"A": 40, "B": 200}  # real images are flat grey by label; synthetic ones 10 brighter
GANS = ("pggan-xg-uncond", "dcgan-xg-cond")


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


def write_gan_metrics(m, name: str, learnt: bool = True, copying: bool = False, reliability: dict | None = None):
    """metrics/gan/<name>.json and metrics/synthesize/<name>.json as train_gan and synthesize write them."""
    (m / "gan" / "scores").mkdir(parents=True, exist_ok=True)
    (m / "gan" / f"{name}.json").write_text(json.dumps({
        "swd_best": 0.1, "kid_best": 0.02, "swd_floor": 0.05, "kid_floor": 0.01, "models": 2,
        "models_learnt": 2 if learnt else 1, "learnt": learnt, "still_improving": False}))
    (m / "synthesize").mkdir(parents=True, exist_ok=True)
    space = {"prdc": {"precision": 0.7, "coverage": 0.05}, "prdc_heldout": {"precision": 0.9, "coverage": 0.8},
             "c_t": -4.2, "authentic": 0.1, "authentic_heldout": 0.6,
             "membership": {"value": 0.93, "low": 0.88, "high": None}}
    (m / "synthesize" / f"{name}.json").write_text(json.dumps({
        "checkpoint_epochs": {"A": 2, "B": 3}, "hash_screen": True, "rejection_rate": 0.125,
        "hash_threshold": 31, "hash_threshold_source": "calibrated", "real_rejection_rate": 0.0,
        "evidence": {"pixels": space, "copying": copying, "features": {**space, **(reliability or {"reliable": True})},
                     "near_duplicates": 3, "images": {"synthetic": 6}}}))


@pytest.fixture
def tree(tmp_path):
    m, models, groups, synthetic, evidence = (tmp_path / d for d in ("metrics", "models", "groups", "synthetic",
                                                                       "evidence"))
    plant(m, HOLDS, patients=60)
    (m / "ingest").mkdir()
    (m / "ingest" / "histology.json").write_text(json.dumps(
        {"split_unit": "tile", "warnings": ["split by tile: slides may leak between train and test"]}))
    write_table3(m, m / "predictions", STAGES, m / "summary.json", m / "table3.json", 200)
    # the X-ray net of the real cohort: both heads below chance on 327 held-out images
    net = chance_summary("xray", {"sex": {"accuracy": 0.5076, "correct": 166, "images": 327, "chance": 0.527},
                                  "age": {"accuracy": 0.2722, "correct": 89, "images": 327, "chance": 0.345}})
    (m / "feature_net").mkdir()
    (m / "feature_net" / "xray.json").write_text(json.dumps({"modality": "xray", **net}))
    (m / "tasks.json").write_text(json.dumps({t: {k: {"images": 10, "side": 8} for k in ("real", "synthetic", "test")}
                                              for t in TASKS}))
    write_images(groups / "xg" / "train", ["A", "B"] * 4, 16)
    for name in GANS:
        write_images(synthetic / name, ["A", "B"] * 3, 8, offset=10)
        # synthesize's mark: the dcgan set was drawn against the net above, the pggan one before it
        write_gan_metrics(m, name, learnt=not name.startswith("dcgan"), copying=name.startswith("pggan"),
                          reliability=feature_space_reliability({"modality": "xray", **net})
                          if name.startswith("dcgan") else {"reliable": True})
        (m / "gan" / "scores" / f"{name}.csv").write_text("epoch,swd,kid\n1,0.3,0.2\n2,0.2,0.1\n3,0.25,0.05\n")
        (evidence / name).mkdir(parents=True)
        Image.new("L", (20, 10), 128).save(evidence / name / "closest.png")
        for model in ("A", "B"):
            sides = (4, 4, 8) if name.startswith("pggan") else (None,) * 3
            rows = [{"epoch": e, "swd": 0.1, "snapshot": True, **({"side": s} if s else {})} for e, s in enumerate(sides, 1)]
            (models / name / model / "grids").mkdir(parents=True)
            (models / name / model / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            for e in range(1, 4):
                Image.new("L", (40, 20), 60 * e).save(models / name / model / "grids" / f"{e:03d}.png")
    return m, models, groups, synthetic, evidence


def test_write_report(tree, tmp_path):
    out = tmp_path / "out"
    write_report(*tree, list(GANS), out)
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    # the forest plot first; then samples + scores + closest each, growth for PGGAN
    assert len(srcs) == len(re.findall(r"<img\b", page)) == 8
    assert page.index('alt="forest.png"') < page.index("<p>") and "(n=1)" not in page
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page and "<link" not in page and "<script" not in page
    assert "0.96 → 0.93 (3.12%)" in page and "0.83 → 0.72 (13.25%)" in page  # the study's numbers
    summary = json.loads((tree[0] / "summary.json").read_text())
    knn = summary["xray_sex"]["knn"]["real"]
    assert f"{knn['value']:.3f} [{knn['low']:.3f}, {knn['high']:.3f}]" in page
    assert html.escape(summary["claims"]["sentence"]) in page and "real + synthetic" in page
    assert summary["warnings"] == ["histology: split by tile: slides may leak between train and test"]
    assert "WARNING: histology: split by tile: slides may leak" in page
    # the data and the one commit summary.json records: the commit table3 ran at
    assert f"Table 3 made at commit {summary['provenance']['commit'][:10]}." in page and "commit(s)" not in page
    # the run's warnings in one list, near the top and returned for `report` to print at the end of dvc repro
    warnings = write_report(*tree, list(GANS), tmp_path / "again")
    assert "data: histology: split by tile: slides may leak between train and test" in warnings
    assert "GAN dcgan-xg-cond: 1 of 2 model(s) learnt nothing" in warnings
    assert "synthetic set pggan-xg-uncond: flagged as copying training images (the export refuses it)" in warnings
    # a feature net below chance: one line per head, its numbers and the rule, in the list and on the page
    age = [w for w in warnings if w.startswith("feature_net@xray: the age head's")]
    assert len(age) == 1 and len([w for w in warnings if w.startswith("feature_net@xray:")]) == 2
    assert age[0].startswith("feature_net@xray: the age head's held-out accuracy 0.272 (89 of 327 right; 90% "
                             "Clopper-Pearson interval [") and "is not above chance 0.345: one-sided exact binomial" in age[0]
    assert age[0].endswith("KID, PRDC coverage and C_T for X-rays are computed in its space and are unreliable")
    assert html.escape(age[0]) in page
    assert page.index(f"{len(warnings)} warning(s): ") < page.index("Data: data.dvc")
    md = (out / "report.md").read_text()
    assert "| dcgan-xg-cond | 0.1000 (0.0500) | 0.0200 (0.0100) | 1/2 NOT LEARNT |" in md
    assert ("| pggan-xg-uncond | 0.70 (0.90) | 0.05 (0.80) | -4.2 / -4.2 | 0.10 (0.60) | 3 of 6 | "
            "0.93 [0.88, n/a] / 0.93 [0.88, n/a] | COPYING | beats chance |") in md
    assert "| 3 of 6 | 0.93 [0.88, n/a] / 0.93 [0.88, n/a] | no | NOT above chance: unreliable |" in md
    assert "12.5% (31 bits, calibrated)" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 8 and links[0] == "figures/forest.png" and all(not link.startswith("/") and (out / link).is_file() for link in links)
    assert "figures/pggan-xg-uncond-growth.png" in links and "figures/dcgan-xg-cond-growth.png" not in links
    assert "0.96 → 0.93 (3.12%)" in md
    growth = np.asarray(Image.open(out / "figures" / "pggan-xg-uncond-growth.png"))
    assert growth.shape == (20 + 6 + 20, 40) and growth[0, 0] == 120 and growth[-1, 0] == 180  # epochs 2 and 3
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html", "report.md"]  # no temp files left


def test_architectures_of_one_set_side_by_side(tree, tmp_path):
    """A set trained by two architectures (dcgan-xg-cond and an sg2ada copy of it) gets one table row each and one
    figure: real images above each architecture's images of the same labels; a set trained once gets none."""
    m, models, groups, synthetic, evidence = tree
    for path in (m / "gan", m / "synthesize", models, synthetic, evidence):
        for src in path.glob("dcgan-xg-cond*"):
            dst = src.with_name(src.name.replace("dcgan", "sg2ada"))
            shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    (m / "gan" / "scores" / "sg2ada-xg-cond.csv").write_text((m / "gan" / "scores" / "dcgan-xg-cond.csv").read_text())
    write_images(synthetic / "sg2ada-xg-cond", ["B", "A"] * 3, 8, offset=20)
    out = tmp_path / "out"
    write_report(*tree, [*GANS, "sg2ada-xg-cond"], out)
    md = (out / "report.md").read_text()
    section = md.split("## Architectures side by side")[1].split("\n### ")[0]  # before the per-stage sections
    assert ("| xg-cond | dcgan | 0.1000 (0.0500) | 0.0200 (0.0100) | 1/2 NOT LEARNT | -4.2 / -4.2 | 3 of 6 | no | "
            "not benchmarked |") in section
    assert "| xg-cond | sg2ada |" in section and "xg-uncond" not in section
    grid = np.asarray(Image.open(out / "figures" / "xg-cond-architectures.png"))
    k = grid.shape[1] // (6 * 10 - 2)  # _tile enlarges a row of the sets' 6 images, 8 px and 2 px gaps, to >= 512 px
    assert grid.shape[:2] == (3 * 10 * k - 2 * k, 6 * 10 * k - 2 * k)
    rows = [grid[r * 10 * k, ::10 * k] for r in range(3)]  # the first pixel of each image, per row
    labels = [{40: "A", 200: "B"}[int(v)] for v in rows[0]]
    assert [int(v) for v in rows[1]] == [REAL_VALUE[lb] + 10 for lb in labels]  # dcgan's, then sg2ada's, same labels
    assert [int(v) for v in rows[2]] == [REAL_VALUE[lb] + 20 for lb in labels]
    summary = json.loads((m / "summary.json").read_text())
    assert _synthetic_accuracies(summary, "pggan-x_norm-cond").startswith(
        f"X-ray sex: VGG16 {summary['xray_sex']['vgg16']['synthetic']['value']:.3f}, k-NN ")
    assert _synthetic_accuracies(summary, "sg2ada-h_norm-uncond") == "not benchmarked"


def test_write_report_needs_every_closest_figure(tree, tmp_path):
    (tree[4] / "dcgan-xg-cond" / "closest.png").unlink()
    with pytest.raises(FileNotFoundError, match="dcgan-xg-cond/closest.png"):
        write_report(*tree, list(GANS), tmp_path / "out")


def test_a_compared_generator_is_shown_beside_table3_with_its_answer(tmp_path):
    """tasks.compare's generator: its answer per model family and its cells beside the own sets' in the README's block
    and the report, its accuracies where its set is shown, and its left-out cells among the run's warnings."""
    plant(tmp_path, COSTLY, patients=60, compared={"diffusion": BETTER}, not_learnt=("diffusion-h_tumor-uncond",))
    s = write_table3(tmp_path, tmp_path / "predictions", STAGES, tmp_path / "summary.json", tmp_path / "table3.json",
                     200, compared={"diffusion": _stages("diffusion")})
    g = s["generators"]["diffusion"]
    md = table3_markdown(s)
    section = md.split("## Generators compared: diffusion against each task's own")[1]
    assert g["sentence"] in section and section.index("| model family |") < section.index("| task | model |")
    deep = g["deep"]
    assert (f"| VGG16 | no usable cell | {100 * deep['per_task']['xray_sex']['difference']['value']:.1f}%"
            in section) and f"| {deep['verdict']} | {deep['cells_used']} |" in section
    knn = g["xray_age"]["knn"]
    assert (f"| X-ray age | k-NN | {knn['real']['value']:.3f} [{knn['real']['low']:.3f}, {knn['real']['high']:.3f}] | "
            f"{s['xray_age']['knn']['synthetic']['value']:.3f} [") in section
    assert "| histology | VGG16 |" in section and section.count("| no |") == 4  # histology: its GAN learnt nothing
    assert f"X-ray sex: VGG16 {g['xray_sex']['vgg16']['synthetic']['value']:.3f}" in _synthetic_accuracies(
        s, "diffusion-x_norm-cond")
    assert ("the diffusion comparison leaves out histology/rf: GAN learnt nothing: diffusion-h_tumor-uncond"
            in run_warnings(s, tmp_path, []))


def test_a_compared_generators_degenerate_arm_is_among_the_runs_warnings(tmp_path):
    """A classifier trained on a compared generator's set that calls every real image one class is warned about as the
    own set's is (the README's generators table flagged it, the run's warnings did not), once, under its generator."""
    plant(tmp_path, HOLDS, patients=60, constant=(("xray_age", "svm"),), compared={"diffusion": "same"})
    s = write_table3(tmp_path, tmp_path / "predictions", STAGES, tmp_path / "summary.json", tmp_path / "table3.json",
                     200, compared={"diffusion": _stages("diffusion")})
    warnings = run_warnings(s, tmp_path, [])
    own = ("X-ray age SVM synthetic arm degenerate: predicts one class for 100% of test images; "
           "accuracy interval contains chance (0.5)")
    assert [w for w in warnings if own in w] == [own, f"the diffusion comparison: {own}"]


def test_the_readme_block_of_a_generators_experiment_is_written_from_its_kept_metrics(tmp_path, monkeypatch):
    """`biomedsynth readme` writes the generators block from docs/results/generators (the experiment's summary.json,
    gan/ and synthesize/ of its six stages, run.json) where the README has its markers, and leaves a README without
    them as it was but for Table 3."""
    results = tmp_path / "docs" / "results" / "generators"
    plant(results, COSTLY, patients=40, compared={"diffusion": BETTER})
    write_table3(results, results / "predictions", STAGES, results / "summary.json", results / "table3.json", 200,
                 compared={"diffusion": _stages("diffusion")})
    stages = [*{s for v in STAGES.values() for s in v}, *{s for v in _stages("diffusion").values() for s in v}]
    for name in stages:
        write_gan_metrics(results, name, copying=name == "diffusion-h_norm-uncond")
    (results / "run.json").write_text(json.dumps({"command": "dvc exp run -n generators", "wall_s": 3600,
                                                  "machine": "a 2-core CPU", "params": ["tasks.compare=[diffusion]"],
                                                  "note": "It ran in two parts."}))
    md = generators_markdown(results)
    assert md.startswith("`dvc exp run -n generators` on the committed default: 60 min on a 2-core CPU "
                         "(tasks.compare=[diffusion]); Table 3 made at commit ")
    assert md.split("\n")[0].endswith(". It ran in two parts.")
    assert "## Generators compared: diffusion against each task's own" in md
    assert "| h_norm-uncond | diffusion | 0.1000 (0.0500) | 0.0200 (0.0100) | 2/2 | -4.2 / -4.2 | 3 of 6 | COPYING |" in md
    assert md.count("| x_norm-cond |") == 2 and "| h_tumor-uncond | dcgan |" in md
    start, end = readme_markers("generators")
    (tmp_path / "metrics").mkdir()
    shutil.copy(results / "summary.json", tmp_path / "metrics" / "summary.json")
    readme = f"# x\n{README_START}\nSTALE\n{README_END}\nprose\n{start}\nSTALE\n{end}\ntail\n"
    (tmp_path / "README.md").write_text(readme)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["readme"]).exit_code == 0
    written = (tmp_path / "README.md").read_text()
    assert f"{start}\n{md}{end}\ntail\n" in written and "STALE" not in written
    assert md.index("| histology: own - diffusion | X-ray sex: own - diffusion | X-ray age: own - diffusion |") > 0
    (tmp_path / "README.md").write_text(readme.replace(f"{start}\nSTALE\n{end}\n", ""))
    result = CliRunner().invoke(app, ["readme"])
    assert result.exit_code == 0 and "generators" not in result.output
