"""Table 3 and the verdict from planted classifier results: a claim that holds, one that fails, one the data
cannot decide, and degenerate cells that are shown but left out."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from biomedsynth.classify.benchmark import evaluate
from biomedsynth.store import write_json
from biomedsynth.table3 import STUDY_TABLE3, flat, summarise, write_table3
from test_tracking import _git_repo

TASKS = ("histology", "xray_sex", "xray_age")
MODELS = ("knn", "svm", "rf", "vgg16")
STAGES = {"histology": ["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond"], "xray_sex": ["pggan-x_norm-cond"],
          "xray_age": ["pggan-x_norm-cond"]}


def _stages(arch: str | None = None) -> dict[str, list[str]]:
    """Per task, the GAN stages behind its own synthetic set (STAGES), or those of a compared `arch`."""
    return STAGES if arch is None else {"histology": [f"{arch}-h_norm-uncond", f"{arch}-h_tumor-uncond"],
                                        "xray_sex": [f"{arch}-x_norm-cond"], "xray_age": [f"{arch}-x_norm-cond"]}


def _model(rng, y, accuracy, patients):
    """Predictions right for a random `accuracy` share of patients (all scans of a patient alike)."""
    ok = rng.random(patients.max() + 1) < accuracy
    pred = np.where(ok[patients], y, 1 - y)
    return pred, np.clip(pred * 0.6 + 0.4 * rng.random(len(y)), 0, 1), {}


def plant(root: Path, accuracies: dict, patients: int = 200, scans: int = 2, seed: int = 0,
          constant: tuple = (), not_learnt: tuple = (), copying: tuple = (), replicates: int = 1,
          replicated: dict | None = None, precision: dict | None = None, compared: dict | None = None) -> None:
    """metrics/<task>/<model>.json + predictions/<task>/<model>.csv as the classify stage writes them, for planted accuracies
    {model: (real, synthetic)} in each of `replicates` replicates; `replicated` {model: [(real, synthetic), ...]}
    plants those models' replicates one by one instead; `constant` names (task, model) cells whose synthetic
    model predicts class 1; metrics/gan/<stage>.json with learnt false for the stages in `not_learnt`;
    metrics/synthesize/<stage>.json with the memorisation test's copying flag set for the stages in `copying`;
    `precision` {task: precision} written into that task's VGG16 cell; `compared` {arch: {model: synthetic accuracy}}
    plants a compared generator's arm (synthetic-<arch>) in every replicate, or with "same" the own synthetic arm's
    very predictions."""
    rng = np.random.default_rng(seed)
    for stage in {s for arch in [None, *(compared or {})] for stages in _stages(arch).values() for s in stages}:
        write_json(root / "gan" / f"{stage}.json", {"learnt": stage not in not_learnt, "still_improving": False})
        write_json(root / "synthesize" / f"{stage}.json", {"evidence": {"copying": stage in copying}})
    for t, task in enumerate(TASKS):
        ids = np.repeat(np.arange(patients), scans)
        y = (ids % 2).astype(int)
        test = pd.DataFrame({"y": y, "group": [f"{task[:1]}{i}" for i in ids]})
        for model, planted in accuracies.items():
            runs = {}
            for r, (real, synth) in enumerate((replicated or {}).get(model, [planted] * replicates)):
                draw = "" if r == 0 else f"_d{r}"
                runs |= {("real", r): _model(rng, y, real, ids), (f"synthetic{draw}", r): _model(rng, y, synth, ids),
                         (f"real_synthetic{draw}", r): _model(rng, y, real, ids)}
                if (task, model) in constant:
                    runs[(f"synthetic{draw}", r)] = (np.ones(len(y), int), rng.random(len(y)), {})
                for arch, theirs in (compared or {}).items():
                    runs[(f"synthetic-{arch}{draw}", r)] = (runs[(f"synthetic{draw}", r)] if theirs == "same"
                                                            else _model(rng, y, theirs[model], ids))
            result, predictions = evaluate(runs, test, task, 300)
            result["provenance"] = {"data": "abc.dir", "sources": {"xray": {"format": "nih"}}}
            if model == "vgg16":
                result["precision"] = (precision or {}).get(task, "fp32")
            (root / "predictions" / task).mkdir(parents=True, exist_ok=True)
            write_json(root / task / f"{model}.json", result)
            predictions.to_csv(root / "predictions" / task / f"{model}.csv", index=False)


HOLDS = {"vgg16": (0.90, 0.89), "knn": (0.85, 0.70), "svm": (0.85, 0.68), "rf": (0.85, 0.72)}
FAILS = {"vgg16": (0.90, 0.62), "knn": (0.85, 0.84), "svm": (0.85, 0.83), "rf": (0.85, 0.84)}


def test_a_planted_claim_holds(tmp_path):
    plant(tmp_path, HOLDS)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    c = s["claims"]
    assert c["verdict"] == "holds" and c["chance_normalised"]["cells_used"] == 12 and c["cells_left_out"] == {}
    assert c["chance_normalised"]["difference"]["low"] > 0
    assert "holds here" in c["sentence"] and "12 cells" in c["sentence"] and "3 tasks" in c["sentence"]
    cell = s["xray_sex"]["knn"]
    assert cell["real"]["low"] <= cell["real"]["value"] <= cell["real"]["high"]
    r, y = cell["real"]["value"], cell["synthetic"]["value"]
    assert cell["drop"]["value"] == pytest.approx((r - y) / r, abs=1e-4)
    assert cell["drop_chance_normalised"]["value"] == pytest.approx((r - y) / (r - 0.5), abs=1e-4)
    assert cell["study"] == dict(zip(("real", "synthetic", "drop"), STUDY_TABLE3["xray_sex"]["knn"]))


def test_tasks_weigh_alike_and_each_task_has_its_contrast(tmp_path):
    """The verdict is the mean of the tasks' (mean LBP drop - VGG16 drop), not the mean over cells: a task that
    lost two LBP cells to a GAN weighs as much as the others."""
    plant(tmp_path, HOLDS)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    v = s["claims"]["chance_normalised"]
    drop = lambda t, m: s[t][m]["drop_chance_normalised"]["value"]  # noqa: E731
    for task in TASKS:
        expected = np.mean([drop(task, m) for m in ("knn", "svm", "rf")]) - drop(task, "vgg16")
        t = v["per_task"][task]
        assert t["contrast"]["value"] == pytest.approx(expected, abs=2e-4)
        assert t["contrast"]["low"] < t["contrast"]["value"] < t["contrast"]["high"]
    assert v["difference"]["value"] == pytest.approx(np.mean([v["per_task"][t]["contrast"]["value"] for t in TASKS]),
                                                     abs=2e-4)
    assert v["tasks_used"] == 3


def test_every_synthetic_lbp_arm_at_chance_is_the_cost_and_the_claim_holds(tmp_path):
    """LBP models trained on synthetic images that call every real image one class lose all their margin over
    chance: that is the cost the study measures, so those cells stay in (flagged) and the claim holds. The old
    rule left them out and had nothing left to compare: it survives only as the sensitivity line."""
    constant = tuple((t, m) for t in TASKS for m in ("knn", "svm", "rf"))
    plant(tmp_path, {"vgg16": (0.90, 0.85), "knn": (0.85, 0.80), "svm": (0.85, 0.80), "rf": (0.85, 0.80)},
          constant=constant)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    c = s["claims"]
    assert s["xray_age"]["svm"]["degenerate"] and s["xray_age"]["svm"]["synthetic"]["value"] == 0.5
    assert s["xray_age"]["svm"]["degenerate_reasons"]["synthetic"][0] == "predicts one class for 100% of test images"
    assert c["cells_left_out"] == {} and c["chance_normalised"]["cells_used"] == 12
    assert c["verdict"] == "holds" and c["chance_normalised"]["difference"]["low"] > 0.5
    sens = c["sensitivity"]
    assert sorted(sens["cells_also_left_out"]) == sorted(f"{t}/{m}" for t, m in constant)
    assert sens["verdict"] == "inconclusive" and sens["cells_used"] == 3 and sens["difference"] is None


def test_a_real_arm_that_cannot_learn_leaves_its_cell_out(tmp_path):
    plant(tmp_path, {**HOLDS, "svm": (0.50, 0.50)}, constant=(("xray_sex", "svm"),))
    c = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)["claims"]
    assert sorted(c["cells_left_out"]) == [f"{t}/svm" for t in sorted(TASKS)]
    assert c["cells_left_out"]["histology/svm"].startswith("real arm: ")
    assert c["chance_normalised"]["cells_used"] == 9 and c["chance_normalised"]["per_task"]["xray_age"]["lbp_cells"] == 2


def test_replicates_that_disagree_widen_the_cells_and_the_verdict(tmp_path):
    """VGG16 trained on synthetic draw 0 scores 0.89 and on draw 1 (seed 1) 0.62 (as the default run's histology
    cell swung between 0.94 and 0.63): Table 3 and the verdict see both replicates, not the first."""
    plant(tmp_path / "agree", HOLDS, replicates=2)
    plant(tmp_path / "differ", HOLDS, replicates=2, replicated={"vgg16": [(0.90, 0.89), (0.90, 0.62)]})
    agree, differ = (summarise(tmp_path / d, tmp_path / d / "predictions", STAGES, n_boot=300) for d in ("agree", "differ"))
    for task in TASKS:
        c1, c2 = agree[task]["vgg16"]["synthetic"], differ[task]["vgg16"]["synthetic"]
        assert c2["value"] < c1["value"] - 0.1 and c2["high"] - c2["low"] > 2 * (c1["high"] - c1["low"])
        assert differ[task]["vgg16"]["replicate_std"]["synthetic"] > 0.1
    d1, d2 = (s["claims"]["chance_normalised"]["difference"] for s in (agree, differ))
    assert d2["value"] < d1["value"] and d2["high"] - d2["low"] > d1["high"] - d1["low"]
    assert differ["claims"]["replicates"] == 2 and differ["claims"]["replicate_variance"] == "measured"


def test_one_replicate_reports_its_variance_as_not_measured(tmp_path):
    plant(tmp_path, HOLDS)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    assert s["claims"]["replicates"] == 1
    assert s["claims"]["replicate_variance"] == "seed and draw variance not measured (1 replicate)"
    assert "seed and draw variance not measured" in s["claims"]["sentence"]
    assert s["histology"]["vgg16"]["replicate_std"] == {"real": None, "synthetic": None, "real_synthetic": None}


def test_the_order_of_the_rows_cannot_change_which_runs_count(tmp_path):
    plant(tmp_path, HOLDS, replicates=3, replicated={"vgg16": [(0.9, 0.89), (0.9, 0.62), (0.9, 0.8)]}, patients=60)
    before = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=200)
    for task in TASKS:
        for model in MODELS:
            path = tmp_path / "predictions" / task / f"{model}.csv"
            pd.read_csv(path).sample(frac=1, random_state=1).to_csv(path, index=False)
    assert summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=200) == before


def test_cells_of_different_precision_are_refused(tmp_path):
    plant(tmp_path, HOLDS, patients=20, precision={"xray_age": "bf16"})
    with pytest.raises(ValueError, match="VGG16 cells trained in different precisions .*xray_age/vgg16 bf16"):
        summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100)
    plant(tmp_path, HOLDS, patients=20)
    assert summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100)["claims"]["precision"] == {"vgg16": "fp32"}


def test_few_slides_get_a_t_interval_and_say_so(tmp_path):
    plant(tmp_path, HOLDS, patients=12, scans=10)  # 6 clusters per class
    c = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)["claims"]
    assert c["chance_normalised"]["interval"].startswith("cluster t interval, df 10 (the smallest one-class stratum holds 6 clusters")
    assert "cluster t interval" in c["sentence"]


def test_a_planted_claim_fails(tmp_path):
    plant(tmp_path, FAILS)
    c = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)["claims"]
    assert c["verdict"] == "fails" and c["chance_normalised"]["difference"]["high"] < 0
    assert c["relative"]["verdict"] == "fails"


def test_equal_drops_on_small_test_sets_are_inconclusive(tmp_path):
    same = {m: (0.80, 0.74) for m in MODELS}
    plant(tmp_path, same, patients=30)
    c = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)["claims"]
    assert c["verdict"] == "inconclusive"
    d = c["chance_normalised"]["difference"]
    assert d["low"] < 0 < d["high"]


def test_no_usable_deep_cell_is_inconclusive(tmp_path):
    plant(tmp_path, {**HOLDS, "vgg16": (0.52, 0.50)}, patients=40)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    assert all(s[t]["vgg16"]["degenerate"] for t in TASKS)
    v = s["claims"]["chance_normalised"]
    assert s["claims"]["verdict"] == "inconclusive" and v["reason"] == "no task has a usable deep and LBP cell"
    assert v["per_task"]["histology"]["reason"] == "no usable deep cell"


def test_flat_file_and_forest_rows(tmp_path):
    plant(tmp_path, HOLDS, patients=60)
    write_table3(tmp_path, tmp_path / "predictions", STAGES, tmp_path / "summary.json", tmp_path / "table3.json", 200, tmp_path / "forest.csv")
    f = json.loads((tmp_path / "table3.json").read_text())
    assert all(isinstance(v, (int, float)) for v in f.values())  # every cell in the verdict: numbers only
    assert {"histology.vgg16.real", "histology.vgg16.synthetic", "histology.vgg16.real_synthetic",
            "histology.vgg16.drop", "histology.vgg16.drop_chance_normalised", "histology.vgg16.is_degenerate",
            "histology.vgg16.in_verdict", "histology.contrast", "verdict", "cells_used", "replicates"} <= set(f)
    assert sum(v for k, v in f.items() if k.endswith(".in_verdict")) == f["cells_used"] == 12
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert f == flat(summary)
    forest = pd.read_csv(tmp_path / "forest.csv")
    assert list(forest["kind"]) == (["cell"] * 4 + ["task"]) * 3 + ["verdict"]
    assert forest.iloc[-1]["value"] == summary["claims"]["chance_normalised"]["difference"]["value"]
    assert forest.iloc[0]["row"] == "histology vgg16"
    assert forest.iloc[0]["study"] == pytest.approx((0.96 - 0.93) / (0.96 - 0.5), abs=1e-4)
    assert (forest["low"] <= forest["value"]).all() and (forest["value"] <= forest["high"]).all()
def test_missing_predictions_are_named(tmp_path):
    plant(tmp_path, HOLDS, patients=20)
    (tmp_path / "predictions" / "xray_age" / "rf.csv").unlink()
    with pytest.raises(FileNotFoundError, match="predictions/xray_age/rf.csv is missing"):
        summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100)


def test_results_name_their_data_and_cells_of_other_data_are_refused(tmp_path, monkeypatch):
    plant(tmp_path, HOLDS, patients=20)
    head = _git_repo(tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100)
    # the data of every cell, and one commit: HEAD where table3 runs, the one commit a DVC output of the run records
    assert s["provenance"] == {"data": "abc.dir", "sources": {"xray": {"format": "nih"}}, "commit": head}
    stale = json.loads((tmp_path / "xray_age" / "rf.json").read_text())
    stale["provenance"]["data"] = "phantom.dir"  # a cell left over from another dataset
    write_json(tmp_path / "xray_age" / "rf.json", stale)
    with pytest.raises(ValueError, match="xray_age/rf came from other data than histology/knn"):
        summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100)


def test_cells_built_on_a_copying_set_are_shown_and_left_out(tmp_path):
    """A set the memorisation test flags holds training images, not synthetic ones: its cells are no answer."""
    plant(tmp_path, FAILS)
    before = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)["claims"]
    assert before["cells_left_out"] == {} and before["chance_normalised"]["cells_used"] == 12
    plant(tmp_path, FAILS, copying=("pggan-x_norm-cond",))
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    assert s["xray_age"]["knn"]["gan"]["copying"] == ["pggan-x_norm-cond"] and s["histology"]["knn"]["gan"]["copying"] == []
    left = s["claims"]["cells_left_out"]
    assert sorted(left) == sorted(f"{t}/{m}" for t in ("xray_sex", "xray_age") for m in MODELS)
    assert left["xray_sex/svm"] == "synthetic set copies training images: pggan-x_norm-cond"
    assert s["claims"]["chance_normalised"]["cells_used"] == 4 and s["claims"]["chance_normalised"]["tasks_used"] == 1
    assert "8 left out as measuring nothing" in s["claims"]["sentence"]


def test_cells_whose_gan_learnt_nothing_are_shown_and_left_out(tmp_path):
    """A GAN that draws noise makes its synthetic arm's drop a measure of noise: visible, never in the verdict."""
    plant(tmp_path, FAILS, not_learnt=("dcgan-h_tumor-uncond",))
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    assert s["histology"]["vgg16"]["gan"]["not_learnt"] == ["dcgan-h_tumor-uncond"]
    assert s["xray_sex"]["vgg16"]["gan"] == {"stages": ["pggan-x_norm-cond"], "learnt": True,
                                             "still_improving": False, "not_learnt": [], "copying": []}
    left = s["claims"]["cells_left_out"]
    assert sorted(left) == [f"histology/{m}" for m in sorted(MODELS)]
    assert left["histology/rf"] == "GAN learnt nothing: dcgan-h_tumor-uncond"
    assert s["claims"]["chance_normalised"]["cells_used"] == 8
    f = flat(s)  # table3.json says which cells are out and why, beside their degenerate flag
    assert f["histology.rf.in_verdict"] == 0 and f["xray_sex.rf.in_verdict"] == 1
    assert f["histology.rf.left_out_because"] == "GAN learnt nothing: dcgan-h_tumor-uncond"
    assert "xray_sex.rf.left_out_because" not in f


BETTER = {"vgg16": 0.89, "knn": 0.84, "svm": 0.83, "rf": 0.84}  # synthetic accuracies that lose ~nothing
COSTLY = {"vgg16": (0.90, 0.65), "knn": (0.85, 0.63), "svm": (0.85, 0.64), "rf": (0.85, 0.62)}  # both families lose


def test_a_generator_that_costs_less_holds_for_both_families_and_moves_nothing_of_table3(tmp_path):
    """The own sets cost both families much; a compared generator that costs both ~nothing holds for VGG16 (own
    drop - its drop above 0) and for the LBP models; Table 3 itself is the same without it."""
    plant(tmp_path, COSTLY, compared={"diffusion": BETTER})
    alone = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300)
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300, compared={"diffusion": _stages("diffusion")})
    assert "generators" not in alone and {k: v for k, v in s.items() if k != "generators"} == alone
    g = s["generators"]["diffusion"]
    assert g["own"] == {"histology": "dcgan", "xray_sex": "pggan", "xray_age": "pggan"}
    assert g["deep"]["verdict"] == "holds" and g["deep"]["difference"]["low"] > 0.3 and g["deep"]["tasks_used"] == 3
    assert g["lbp"]["verdict"] == "holds" and g["lbp"]["cells_used"] == 9
    cell = g["xray_age"]["vgg16"]
    assert cell["synthetic"]["value"] > s["xray_age"]["vgg16"]["synthetic"]["value"]
    assert cell["real"] == s["xray_age"]["vgg16"]["real"]  # one real arm, one test set
    assert cell["own_drop_minus_this"]["value"] == pytest.approx(
        s["xray_age"]["vgg16"]["drop_chance_normalised"]["value"] - cell["drop_chance_normalised"]["value"], abs=2e-4)
    assert g["claim"]["cells_used"] == 12 and g["claim"]["cells_left_out"] == {}  # its own Table 3's claim
    assert "diffusion against each task's own generator (histology dcgan, xray_sex pggan, xray_age pggan)" in g["sentence"]
    f = flat(s)
    assert f["compare.diffusion.deep.verdict"] == 1 and f["compare.diffusion.lbp.low"] > 0
    assert f["compare.diffusion.xray_age.vgg16.synthetic"] == cell["synthetic"]["value"]
    assert f["compare.diffusion.claim.verdict"] in (1, 0, -1)
    assert not [k for k in f if k.startswith("compare.") and k.count(".") < 3]  # the review page's cells have two


def test_a_generator_that_costs_more_fails(tmp_path):
    plant(tmp_path, HOLDS, compared={"sg2ada": {"vgg16": 0.60, "knn": 0.55, "svm": 0.56, "rf": 0.55}})
    g = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300,
                  compared={"sg2ada": _stages("sg2ada")})["generators"]["sg2ada"]
    assert g["deep"]["verdict"] == g["lbp"]["verdict"] == "fails" and g["deep"]["difference"]["high"] < 0


def test_the_same_predictions_under_another_name_differ_by_exactly_nothing(tmp_path):
    """A compared arm with the own arm's very predictions: every paired difference is 0 in every resample, so the
    answer is inconclusive, never a verdict drawn from resampling noise."""
    plant(tmp_path, HOLDS, replicates=2, compared={"twin": "same"})
    g = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300,
                  compared={"twin": _stages("twin")})["generators"]["twin"]
    for family in ("deep", "lbp"):
        assert g[family]["verdict"] == "inconclusive"
        assert g[family]["difference"] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_a_compared_generator_that_learnt_nothing_leaves_its_cells_out_of_the_comparison_only(tmp_path):
    plant(tmp_path, COSTLY, compared={"diffusion": BETTER}, not_learnt=("diffusion-x_norm-cond",))
    s = summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=300, compared={"diffusion": _stages("diffusion")})
    g = s["generators"]["diffusion"]
    assert s["claims"]["cells_left_out"] == {}  # Table 3's own cells all measure
    assert sorted(g["cells_left_out"]) == sorted(f"{t}/{m}" for t in ("xray_sex", "xray_age") for m in MODELS)
    assert g["cells_left_out"]["xray_age/rf"] == "GAN learnt nothing: diffusion-x_norm-cond"
    assert g["claim"]["cells_left_out"] == g["cells_left_out"]
    assert g["deep"]["tasks_used"] == 1 and g["deep"]["per_task"]["xray_sex"]["reason"] == "no usable cell"


def test_a_compared_generator_without_its_arm_is_named(tmp_path):
    plant(tmp_path, HOLDS, patients=20)
    with pytest.raises(ValueError, match="histology/knn.json has no synthetic-diffusion arm .tasks.compare lists "
                                         "diffusion.; rerun the tasks and classify stages"):
        summarise(tmp_path, tmp_path / "predictions", STAGES, n_boot=100, compared={"diffusion": _stages("diffusion")})
