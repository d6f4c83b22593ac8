"""The committed results of the default run (`make repro` on the phantom sample) can decide the study's question:
trained on real images every classifier beats chance and none is perfect, so a synthetic stand-in has room to
lose accuracy; every real-arm interval (a bootstrap over replicates, then test patients / slides) is at most
+-0.08 wide; the histology test set spans at least 6 slides of each class; LBP sees 64 px images; Table 3 names its data.
A phantom that became trivial, a pipeline that broke a classifier, or a default too small to decide fails here."""
import json
from pathlib import Path

import yaml

from biomedsynth.provenance import data_hash
from biomedsynth.report import generators_markdown, readme_with_block, readme_with_table3

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"histology", "xray_sex", "xray_age"}


def _summary() -> dict:
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["profile"] == "default", \
        "metrics/ are the default run's: commit them from a default `make repro`"
    return json.loads((ROOT / "metrics" / "summary.json").read_text())


def test_committed_default_results_are_above_chance_and_below_perfect():
    summary = _summary()
    tasks = {t: models for t, models in summary.items() if t in TASKS}
    assert set(tasks) == TASKS
    for task, models in tasks.items():
        assert set(models) == {"knn", "svm", "rf", "vgg16"}, task
        for model, r in models.items():
            assert 0.5 < r["real"]["value"] < 1.0, (task, model, r["real"])
            for arm in ("synthetic", "real_synthetic"):
                if arm not in r:  # an arm params leave out says so
                    assert r["not_trained"][arm].startswith("not trained: "), (task, model, arm)
                    continue
                assert 0 <= r[arm]["low"] <= r[arm]["value"] <= r[arm]["high"] <= 1, (task, model, arm)
        best = max(models.values(), key=lambda r: r["real"]["value"])
        assert best["real"]["low"] > 0.5, (task, best)  # the best model's whole 95% interval above chance


def test_committed_default_run_can_decide():
    summary = _summary()
    for task in TASKS:
        for model, r in summary[task].items():
            real = r["real"]
            # +-0.08: histology's 6 tumour slides get a cluster t interval, and the replicates' spread widens it
            # (histology VGG16's real arm scored 0.855, 0.955 and 0.928 in its three replicates: +-0.072)
            assert max(real["value"] - real["low"], real["high"] - real["value"]) <= 0.08, (task, model, real)
    tasks = json.loads((ROOT / "metrics" / "tasks.json").read_text())
    assert tasks.pop("provenance")["data"] == data_hash(ROOT / "data.dvc")  # the task sets are of the committed data
    assert min(tasks["histology"]["test"]["clusters_per_class"].values()) >= 6, tasks["histology"]["test"]
    assert all(sets["test"]["side"] >= 64 for sets in tasks.values())  # LBP's radius 4 fits inside the image
    claims = summary["claims"]
    assert claims["verdict"] in ("holds", "fails", "inconclusive") and claims["sentence"]
    assert summary["provenance"]["data"] == data_hash(ROOT / "data.dvc")  # Table 3 is of the committed data


def test_the_readme_says_what_the_committed_metrics_say():
    """The README's Table 3 and verdict are written from metrics/summary.json (`biomedsynth readme`): a README
    that states other numbers than the committed metrics fails here."""
    readme = (ROOT / "README.md").read_text()
    assert readme_with_table3(readme, _summary()) == readme, \
        "README.md's Table 3 block differs from metrics/summary.json: run `biomedsynth readme`"


def test_the_readme_says_what_the_kept_generators_experiment_says():
    """The README's generators block is written from the experiment kept in docs/results/generators (its summary.json,
    its stages' GAN and synthesize metrics, run.json), and that experiment compared the diffusion model on each task."""
    kept = ROOT / "docs" / "results" / "generators"
    readme = (ROOT / "README.md").read_text()
    assert readme_with_block(readme, "generators", generators_markdown(kept)) == readme, \
        "README.md's generators block differs from docs/results/generators: run `biomedsynth readme`"
    generators = json.loads((kept / "summary.json").read_text())["generators"]
    assert set(generators) == {"diffusion"} and TASKS <= set(generators["diffusion"])  # its cells, per task


def test_the_default_run_measures_seed_and_draw_variance():
    claims = _summary()["claims"]
    assert claims["replicates"] >= 3 and claims["replicate_variance"] == "measured"
    assert claims["precision"] == {"vgg16": "fp32"}
