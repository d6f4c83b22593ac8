"""The committed results of the default run (`make repro` on the phantom sample) are a usable benchmark:
trained on real images, every classifier beats chance and none is perfect, so a synthetic stand-in has
room to lose accuracy and the drop means something. A phantom that became trivial, or a pipeline that
broke a classifier, fails here."""
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_committed_default_results_are_above_chance_and_below_perfect():
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["profile"] == "default", \
        "metrics/ are the default run's: commit them from a default `make repro`"
    summary = json.loads((ROOT / "metrics" / "summary.json").read_text())
    tasks = {t: models for t, models in summary.items() if t != "claims"}
    assert set(tasks) == {"histology", "xray_sex", "xray_age"}
    for task, models in tasks.items():
        assert set(models) == {"knn", "svm", "rf", "vgg16"}, task
        for model, r in models.items():
            assert 0.5 < r["real"]["value"] < 1.0, (task, model, r["real"])
            assert 0 <= r["synthetic"]["low"] <= r["synthetic"]["value"] <= r["synthetic"]["high"] <= 1
        best = max(models.values(), key=lambda r: r["real"]["value"])
        assert best["real"]["low"] > 0.5, (task, best)  # the best model's whole 95% interval above chance
