"""The classify stage's function end to end on a tiny task: what it writes and that the saved models are the
ones that were scored."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import torch

from biomedsynth.classify.benchmark import classify
from biomedsynth.classify.lbp import read_features, write_features
from biomedsynth.params import load_params
from biomedsynth.store import ImageSetWriter

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])  # child processes


def _texture(rng, label: int, side: int = 16) -> np.ndarray:
    """Class 0 stripes, class 1 a 2 px checkerboard, with noise: an easy problem for rotation-invariant LBP."""
    r, c = np.indices((side, side))
    img = (r % 3 == 0) if label == 0 else ((r // 2 + c // 2) % 2 == 0)
    return np.clip(200 * img + rng.normal(0, 25, img.shape) + 20, 0, 255).astype(np.uint8)[..., None]


def _task(tasks: Path, features: Path, rng, sets=("real", "synthetic", "test")) -> tuple[Path, Path]:
    """The named sets, 24 balanced images each; real and test grouped by 12 patients, synthetic images their own."""
    for name in sets:
        with ImageSetWriter(tasks / name, (16, 16, 1)) as w:
            for i in range(24):
                group = f"{name}:{i}" if name.startswith("synthetic") else f"p{i % 12}"
                w.add(_texture(rng, i % 2), image_id=f"{name}{i}", y=i % 2, group=group)
        write_features(tasks / name, features / name, radii=[1, 2])
    return tasks, features


@pytest.fixture
def cfg():
    c = load_params(ROOT / "params.yaml").classify
    return c.model_copy(update={"replicates": 2, "bootstrap": 200, "cv_folds": 2, "knn": {"n_neighbors": [1, 3]},
                                "rf": {"n_estimators": [20], "max_depth": [None, 4]}})


@pytest.mark.parametrize("model", ["knn", "rf"])
def test_lbp_model_is_saved_and_reproduces_the_scored_predictions(tmp_path, cfg, model):
    sets = ("real", "synthetic", "synthetic_d1", "synthetic_d2", "real_synthetic", "real_synthetic_d1", "test")
    tasks, feats = _task(tmp_path / "tasks", tmp_path / "features", np.random.default_rng(0), sets)
    out = tmp_path / "models"
    (out / "stale").mkdir(parents=True)  # left by an earlier run: must not survive
    r = classify("t", model, cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)
    # replicate r: the real set, synthetic draw r and real + draw r, each with seed r; draw 2 is not needed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["real-seed0.joblib", "synthetic-seed0.joblib", "real_synthetic-seed0.joblib",
         "real-seed1.joblib", "synthetic_d1-seed1.joblib", "real_synthetic_d1-seed1.joblib"])
    assert json.loads((tmp_path / "m.json").read_text())["real"]["accuracy"]["value"] == r["real"]["accuracy"]["value"]
    assert r["real"]["cv_grouped"]
    assert r["replicates"] == 2 and len(r["synthetic"]["replicate_accuracies"]) == 2
    assert r["synthetic"]["replicate_std"] is not None and "replicate_variance" not in r
    assert r["bootstrap"]["unit"] == "patient" and r["interval"]["method"] == "cluster t"  # 6 patients per class
    assert r["test_clusters"] == {"0": 6, "1": 6}  # p0..p11: even ids hold class 0
    assert not r["real"]["degenerate"] and set(r["drop"]) == {"relative", "chance_normalised"}
    p = pd.read_csv(tmp_path / "predictions.csv")
    assert len(p) == 24 * 6 and set(p["arm"]) == {"real", "synthetic", "real_synthetic"}
    assert sorted(set(zip(p["set"], p["replicate"]))) == sorted(
        [("real", 0), ("real", 1), ("synthetic", 0), ("synthetic_d1", 1), ("real_synthetic", 0),
         ("real_synthetic_d1", 1)])
    saved = joblib.load(out / "real-seed0.joblib")
    assert saved["lbp_variant"] == r["real"]["best_variant"]
    _, test = read_features(feats / "test")
    scored = pd.read_csv(tmp_path / "plots" / "confusion" / "real.csv")["predicted"].to_numpy()
    np.testing.assert_array_equal(saved["estimator"].predict(test[saved["lbp_variant"]]), scored)
    assert r["real"]["accuracy"]["value"] > 0.9  # an easy problem: a broken pipeline would sit near 0.5


def test_a_compared_generator_trains_its_draw_per_replicate_and_gets_its_paired_drop(tmp_path, cfg):
    """tasks.compare's arm synthetic-<arch>: replicate r trains on its draw r beside the own arms, its drop is paired
    with the real arm over the same resamples, and its plots and predictions are written like the own arms'."""
    sets = ("real", "synthetic", "synthetic_d1", "real_synthetic", "real_synthetic_d1", "synthetic-diffusion",
            "synthetic-diffusion_d1", "test")
    tasks, feats = _task(tmp_path / "tasks", tmp_path / "features", np.random.default_rng(0), sets)
    out = tmp_path / "models"
    r = classify("t", "knn", cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)
    assert {"synthetic-diffusion-seed0.joblib", "synthetic-diffusion_d1-seed1.joblib"} <= {p.name for p in out.iterdir()}
    theirs = r["synthetic-diffusion"]
    assert len(theirs["replicate_accuracies"]) == 2 and not theirs["degenerate"]
    lost = r["real"]["accuracy"]["value"] - theirs["accuracy"]["value"]
    assert r["synthetic-diffusion_drop"]["chance_normalised"]["accuracy"]["value"] == pytest.approx(
        lost / (r["real"]["accuracy"]["value"] - 0.5), abs=1e-6)
    assert (tmp_path / "plots" / "roc" / "synthetic-diffusion.csv").is_file()
    p = pd.read_csv(tmp_path / "predictions.csv")
    assert set(p["arm"]) == {"real", "synthetic", "real_synthetic", "synthetic-diffusion"}
    (tasks / "synthetic-diffusion_d1").rename(tasks / "elsewhere")  # one draw of the compared generator for two replicates
    with pytest.raises(ValueError, match="holds 1 synthetic-diffusion draw"):
        classify("t", "knn", cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)


def test_vgg16_checkpoints_are_the_models_output(tmp_path, cfg, monkeypatch):
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    tasks, feats = _task(tmp_path / "tasks", tmp_path / "features", np.random.default_rng(1))
    cfg = cfg.model_copy(update={"replicates": 1, "vgg16": cfg.vgg16.model_copy(
        update={"input_side": 32, "epochs": 1, "batch_size": 8, "val_fraction": 0.25, "real_synthetic": False})})
    out = tmp_path / "models"
    r = classify("t", "vgg16", cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["real-seed0.pt", "synthetic-seed0.pt"]
    ck = torch.load(out / "real-seed0.pt", weights_only=False)
    assert ck["channels"] == 1 and ck["input_size"] == 32 and r["real"]["best_epoch"] == 1
    assert r["precision"] == "fp32" and r["replicate_variance"] == "seed and draw variance not measured (1 replicate)"
    assert r["synthetic"]["replicate_std"] is None


def test_more_replicates_than_draws_is_refused_before_anything_is_removed(tmp_path, cfg):
    tasks, feats = _task(tmp_path / "tasks", tmp_path / "features", np.random.default_rng(1),
                         ("real", "synthetic", "real_synthetic", "test"))
    out = tmp_path / "models"
    (out / "kept").mkdir(parents=True)
    with pytest.raises(ValueError, match="classify.replicates is 2 but .* holds 1 synthetic draw"):
        classify("t", "knn", cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)
    assert (out / "kept").is_dir()


@pytest.mark.parametrize("real_synthetic", [False, True])
def test_vgg16_trains_the_real_synthetic_arm_only_when_params_say_so(tmp_path, cfg, monkeypatch, real_synthetic):
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    sets = ("real", "synthetic", "real_synthetic", "test")
    tasks, feats = _task(tmp_path / "tasks", tmp_path / "features", np.random.default_rng(1), sets)
    cfg = cfg.model_copy(update={"replicates": 1, "vgg16": cfg.vgg16.model_copy(
        update={"input_side": 32, "epochs": 1, "batch_size": 8, "val_fraction": 0.25,
                "real_synthetic": real_synthetic})})
    out = tmp_path / "models"
    r = classify("t", "vgg16", cfg, tasks, feats, out, tmp_path / "m.json", tmp_path / "plots",
                 tmp_path / "predictions.csv", log=lambda _: None)
    trained = ["real-seed0.pt", "synthetic-seed0.pt"] + (["real_synthetic-seed0.pt"] if real_synthetic else [])
    assert sorted(p.name for p in out.iterdir()) == sorted(trained)
    assert ("real_synthetic" in r) == real_synthetic and ("real_synthetic_drop" in r) == real_synthetic
    assert set(pd.read_csv(tmp_path / "predictions.csv")["arm"]) == set(sets[:2 + real_synthetic])
    if not real_synthetic:  # the cell says why the arm is missing; dvc.yaml's plots of the arm exist, without rows
        assert r["not_trained"] == {"real_synthetic": "not trained: classify.vgg16.real_synthetic is false"}
        assert (tmp_path / "plots" / "confusion" / "real_synthetic.csv").read_text() == "actual,predicted\n"
        assert (tmp_path / "plots" / "roc" / "real_synthetic.csv").read_text() == "fpr,tpr\n"


@pytest.mark.e2e
def test_launch_two_cpu_processes_train_vgg16_with_rank_0_writing(tmp_path):
    """`launch.nproc_per_node: 2`: the classify command starts 2 gloo ranks through torchrun; they share VGG16's
    batches; rank 0 alone validates, writes the checkpoints and the metrics, and logs."""
    _task(tmp_path / "data/tasks/xray_sex", tmp_path / "data/features/xray_sex", np.random.default_rng(2))
    cli = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    subprocess.run(cli + ["profile", "smoke"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(cli + ["set", "launch.nproc_per_node=2", "classify.replicates=1", "classify.vgg16.real_synthetic=false"],
                   cwd=tmp_path, check=True, capture_output=True)
    env = {**os.environ, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
           "BIOMEDSYNTH_DEVICE": "cpu"}
    run = subprocess.run([*cli, "classify", "xray_sex", "vgg16"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("2 processes: torchrun --standalone --nproc-per-node 2 --module biomedsynth") == 1
    assert run.stdout.count("vgg16 epoch 1/1") == 2  # real and synthetic, logged by rank 0 only
    assert run.stdout.count("classify@xray_sex-vgg16:") == 1
    out = tmp_path / "models/classify/xray_sex/vgg16"
    assert sorted(p.name for p in out.iterdir()) == ["real-seed0.pt", "synthetic-seed0.pt"]
    r = json.loads((tmp_path / "metrics/xray_sex/vgg16.json").read_text())
    assert r["test_images"] == 24 and 0 <= r["real"]["accuracy"]["value"] <= 1



def _one_slide_tumour_task(tasks: Path, features: Path, rng) -> None:
    """A two-replicate task in which every tumour image of the real arm's sets comes from one slide (as a
    cohort with few tumour slides gives): LBP CV then cannot group by slide and uses cv_folds as they are."""
    _task(tasks, features, rng, ("synthetic", "synthetic_d1", "test"))
    for name in ("real", "real_synthetic", "real_synthetic_d1"):
        with ImageSetWriter(tasks / name, (16, 16, 1)) as w:
            for i in range(24):
                w.add(_texture(rng, i % 2), image_id=f"{name}{i}", y=i % 2, group="slide_t" if i % 2 else f"p{i}")
        write_features(tasks / name, features / name, radii=[1, 2])


def test_check_cell_refuses_what_classify_would_and_passes_what_it_trains(tmp_path, cfg):
    """check_classify's function, against known answers: each refusal names the set and replicate."""
    from biomedsynth.classify.benchmark import check_cell

    tasks, feats = _task(tmp_path / "tasks", tmp_path / "feats", np.random.default_rng(0),
                         ("real", "synthetic", "synthetic_d1", "real_synthetic", "real_synthetic_d1", "test"))
    for model in ("knn", "vgg16"):
        check_cell(tasks, model, cfg)
    few_ids = cfg.model_copy(update={"vgg16": cfg.vgg16.model_copy(update={"val_fraction": 0.05})})
    with pytest.raises(ValueError, match=r"tasks/real \(replicate 0\): groups: 12 distinct ids, a validation "
                                         r"fraction of 0.05 splits by id into 20 parts"):
        check_cell(tasks, "vgg16", few_ids)
    check_cell(tasks, "knn", few_ids)  # the LBP models have no validation split
    with pytest.raises(ValueError, match="classify.replicates is 3 but .* holds 2 synthetic draw"):
        check_cell(tasks, "rf", cfg.model_copy(update={"replicates": 3}))
    _one_slide_tumour_task(tmp_path / "one", tmp_path / "one_feats", np.random.default_rng(1))
    check_cell(tmp_path / "one", "knn", cfg)
    with pytest.raises(ValueError, match=r"one/real \(replicate 0\): class 0 has 12 training samples, fewer than "
                                         r"folds=13"):
        check_cell(tmp_path / "one", "knn", cfg.model_copy(update={"cv_folds": 13}))


def test_classify_waits_for_check_classify_under_dvc():
    """dvc.yaml: every classify stage depends on check_classify's output, which reads the classify params and the
    task sets, so a knob the data cannot serve stops `dvc repro` before DVC clears a trained classifier."""
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "data/checked/classify.txt" in stages["classify"]["deps"]
    check = stages["check_classify"]
    assert check["outs"] == ["data/checked/classify.txt"] and "classify" in check["params"]
    assert {"data/tasks", "src/biomedsynth/classify"} <= set(check["deps"])


def dvc_project(root: Path, stages: dict) -> dict:
    """A git + DVC project at `root` running `stages` (dvc.yaml's, trimmed by the caller) with the source files they
    depend on; the environment its commands run in (this checkout's code, MLflow off)."""
    import yaml

    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    for stage in stages.values():
        for dep in stage.get("deps", stage.get("do", {}).get("deps", [])):
            if dep.startswith("src/"):
                subprocess.run(["cp", "-r", "--parents", dep, str(root)], cwd=ROOT, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": PYTHONPATH, "BIOMEDSYNTH_MLFLOW": "0"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True)
    return env


@pytest.mark.e2e
def test_a_knob_the_task_sets_cannot_serve_stops_dvc_repro_before_it_clears_the_classifier(tmp_path):
    """Reproduced first: with classify depending on check_params alone, cv_folds=13 on a task whose tumour images
    come from one slide made DVC clear models/classify/histology/knn, then `classify` refused. Now check_classify
    stops `dvc repro` first, in one line, and the trained models stay."""
    import yaml

    root = tmp_path / "project"
    for task in ("histology", "xray_sex", "xray_age"):  # check_classify reads every task
        _one_slide_tumour_task(root / "data/tasks" / task, root / "data/features" / task, np.random.default_rng(2))
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    cli = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]
    subprocess.run(cli + ["profile", "smoke"], cwd=root, check=True, capture_output=True)
    subprocess.run(cli + ["set", "export.sets=table3"], cwd=root, check=True, capture_output=True)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = {"check_params": stages["check_params"], "check_classify": stages["check_classify"],
              "classify": {**stages["classify"], "matrix": {"task": ["histology"], "model": ["knn"]}},
              "train_gan": stages["train_gan"]}  # check-params reads its set names; `dvc repro classify` skips it
    env = dvc_project(root, stages)

    def repro(*knobs):
        if knobs:
            subprocess.run(cli + ["set", *knobs], cwd=root, env=env, check=True, capture_output=True)
        return subprocess.run(["dvc", "repro", "classify"], cwd=root, env=env, capture_output=True, text=True)

    first = repro()
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    models = root / "models/classify/histology/knn"
    trained = {p.name: p.read_bytes() for p in models.iterdir()}
    assert sorted(trained) == sorted(["real-seed0.joblib", "real-seed1.joblib", "synthetic-seed0.joblib",
                                      "synthetic_d1-seed1.joblib", "real_synthetic-seed0.joblib",
                                      "real_synthetic_d1-seed1.joblib"])
    refused = repro("classify.cv_folds=13")
    assert refused.returncode != 0 and "Running stage 'classify@" not in refused.stdout
    assert "biomedsynth: classify@histology-knn: data/tasks/histology/real (replicate 0): class 0 has 12 training " \
           "samples, fewer than folds=13\n" in refused.stderr, refused.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in models.iterdir()} == trained


def test_mlflow_gets_the_plots_this_stage_wrote_and_no_stale_file_beside_them(tmp_path, cfg):
    """Found on the default run: classify logged its whole plots folder to MLflow, where an older layout's
    predictions.csv (with slide ids) still sat. Now it logs the confusion and ROC files it wrote, one by one."""
    class Tracker:
        def __init__(self):
            self.files = []

        def log_metrics(self, *_a, **_k):
            pass

        def log_artifact(self, path, artifact_path=None, real_images=False):
            self.files.append((f"{artifact_path}/{Path(path).name}", real_images))

        def log_artifacts(self, folder, artifact_path=None, real_images=False):
            self.files += [(p.name, real_images) for p in Path(folder).iterdir()]

    tasks, feats = _task(tmp_path / "tasks", tmp_path / "feats", np.random.default_rng(5),
                         ("real", "synthetic", "synthetic_d1", "real_synthetic", "real_synthetic_d1", "test"))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "predictions.csv").write_text("set,arm,replicate,image,group\nreal,real,0,0,slide_007\n")
    tracker = Tracker()
    classify("t", "knn", cfg, tasks, feats, tmp_path / "models", tmp_path / "m.json", tmp_path / "plots",
             tmp_path / "predictions.csv", tracker, log=lambda _: None)
    plots = sorted(name for name, real in tracker.files if not real)
    assert plots == sorted(f"plots/{kind}/{arm}.csv" for kind in ("confusion", "roc")
                           for arm in ("real", "synthetic", "real_synthetic"))
    assert all(real for name, real in tracker.files if name.endswith(".joblib"))  # models: tracking.real_images


@pytest.mark.e2e
def test_two_nodes_of_one_process_train_vgg16_as_one_node_of_two(tmp_path):
    """`launch.nnodes: 2` for real, VGG16's DistributedDataParallel: two clones of a project (two machines) of one
    process each meet at node 0's rdzv_endpoint on the loopback address; node 0's metrics and predictions are those
    of one node of two processes."""
    import socket

    import yaml

    sets = ("real", "synthetic", "synthetic_d1", "real_synthetic", "real_synthetic_d1", "test")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": PYTHONPATH, "BIOMEDSYNTH_MLFLOW": "0", "OMP_NUM_THREADS": "1", "BIOMEDSYNTH_DEVICE": "cpu"}
    cli = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]
    with socket.socket() as s:  # a free port for node 0's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launches = {"one-node": ["launch.nproc_per_node=2"],
                **{f"node{rank}": ["launch.nnodes=2", f"launch.node_rank={rank}", f"launch.rdzv_endpoint=127.0.0.1:{port}"]
                   for rank in (0, 1)}}
    procs = {}
    for name, launch in launches.items():
        root = tmp_path / name
        _task(root / "data/tasks/histology", root / "data/features/histology", np.random.default_rng(5), sets)
        shutil.copy(ROOT / "params.yaml", root / "params.yaml")
        for args in (["profile", "smoke"], ["set", "classify.vgg16.epochs=2", "classify.replicates=1",
                                            "classify.vgg16.real_synthetic=false", *launch]):
            subprocess.run(cli + args, cwd=root, check=True, capture_output=True)
        if name == "one-node":
            run = subprocess.run(cli + ["classify", "histology", "vgg16"], cwd=root, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-2000:]
        else:
            procs[name] = subprocess.Popen(cli + ["classify", "histology", "vgg16"], cwd=root, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert "2 processes: torchrun --nnodes 2 --node-rank" in out
    one, node0 = tmp_path / "one-node", tmp_path / "node0"
    for path in ("data/predictions/histology/vgg16.csv",):
        assert (one / path).read_bytes() == (node0 / path).read_bytes()
    a, b = (json.loads((root / "metrics/histology/vgg16.json").read_text()) for root in (one, node0))
    assert {k: a[k] for k in ("real", "synthetic", "drop")} == {k: b[k] for k in ("real", "synthetic", "drop")}
    assert yaml.safe_load((node0 / "params.yaml").read_text())["launch"]["nnodes"] == 2
    assert not (tmp_path / "node1/metrics/histology/vgg16.json").exists()  # node 1 trains, node 0 writes
