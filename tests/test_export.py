"""Sharing what was made: a synthetic set exported with its datasheet, Croissant metadata and checksums loads with
Hugging Face datasets and torchvision; a set that copies training images is refused unless allowed; generate draws
more images, the same for a seed and label, from the pipeline's generator or a shared one.

The project fixture runs the real train-gan and synthesize commands on a tiny X-ray group; the study groups'
counts, Table 3 and dvc.lock are written in the shape their stages write them. `check_export` is also what
.ci/smoke runs on the smoke pipeline's export.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import biomedsynth
from biomedsynth import datasheet
from biomedsynth.cli import app
from biomedsynth.export import PngWriter, label_columns, staged, verify_checksums, write_checksums
from biomedsynth.gan import score
from biomedsynth.gan.score import read_batch
from biomedsynth.params import ParamsError
from biomedsynth.params_edit import apply_profile, set_params
from biomedsynth.provenance import code_version
from biomedsynth.store import ImageSet, ImageSetWriter, write_json
from test_gan_train import net_metrics
from test_tracking import _git_repo

ROOT = Path(biomedsynth.__file__).resolve().parents[2]
NAME = "dcgan-x_norm-cond"
TILE_NAME = "dcgan-h_norm-uncond"
LABELS = ("F_18-38", "M_48-68")
PATIENT = "PATIENT-7F3A"   # a prefix no exported file may contain: real ids and source paths never leave


# ---- the check .ci/smoke runs too ----

@contextlib.contextmanager
def offline():
    """No network: any socket connection fails (the loaders must read the export from disk alone)."""
    def refuse(*args, **kwargs):
        raise OSError("network access during an offline check")
    saved = socket.socket.connect, os.environ.copy()
    socket.socket.connect = refuse
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        yield
    finally:
        socket.socket.connect = saved[0]
        os.environ.clear()
        os.environ.update(saved[1])


def check_export(folder: Path) -> dict:
    """Everything a receiver relies on: checksums agree, Hugging Face imagefolder and torchvision ImageFolder load
    every image with its label, mlcroissant validates croissant.json and joins each image to its metadata row, and
    every datasheet field is filled. Offline. Returns what it counted."""
    import datasets
    import mlcroissant as mlc
    import pandas as pd
    from torchvision.datasets import ImageFolder

    folder = Path(folder)
    assert verify_checksums(folder) == [], verify_checksums(folder)
    meta = pd.read_csv(folder / "metadata.csv", keep_default_na=False)
    sheet = json.loads((folder / "datasheet.json").read_text())
    assert datasheet.unfilled(sheet) == [] and sheet["what"]["images"] == len(meta)
    text = (folder / "datasheet.md").read_text()
    assert not datasheet.PLACEHOLDER.search(text) and not re.search(r"\b(None|nan|null)\b", text), text
    with offline(), tempfile.TemporaryDirectory() as cache:
        hf = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=cache)
        assert len(hf) == len(meta) and set(meta.columns) - {"file_name"} <= set(hf.column_names)
        assert sorted(hf["image_id"]) == sorted(meta["image_id"])
        mode = "L" if sheet["what"]["channels"] == 1 else "RGB"
        assert hf[0]["image"].mode == mode and hf[0]["image"].size == (sheet["what"]["side_px"],) * 2
        tv = ImageFolder(str(folder / "images"))
        assert len(tv) == len(meta) and tv.classes == sorted(meta["label"].unique())
        counts = pd.Series([tv.classes[y] for _, y in tv.samples]).value_counts().to_dict()
        assert counts == meta["label"].value_counts().to_dict() == sheet["what"]["labels"]
        ds = mlc.Dataset(jsonld=str(folder / "croissant.json"))
        assert not ds.metadata.ctx.issues.errors, ds.metadata.ctx.issues.report()
        records = list(ds.records("images"))
    assert len(records) == len(meta)
    by_id = meta.set_index("image_id")
    for r in records[:20]:
        row = by_id.loc[r["images/image_id"].decode()]
        assert r["images/label"].decode() == row["label"] and r["images/file_name"].decode() == row["file_name"]
    return {"images": len(meta), "labels": sheet["what"]["labels"], "memorisation": sheet["memorisation"]["verdict"],
            "croissant_warnings": len(ds.metadata.ctx.issues.warnings)}


# ---- a tiny project with a trained GAN and its synthetic set ----

def write_group(path: Path, n: int, seed: int) -> None:
    """X-ray-like 32 px images: a disc whose brightness depends on the label, with noise, two scans per patient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 10 ** 2
    with ImageSetWriter(path, (32, 32, 1)) as w:
        for i in range(n):
            label = LABELS[i % 2]
            img = np.clip(40 + (80 + 80 * (i % 2)) * disc + rng.normal(0, 12, (32, 32)), 0, 255).astype(np.uint8)
            w.add(img[..., None], image_id=f"{PATIENT}-{seed}-{i}-scan", patient_id=f"{PATIENT}-{seed}-{i // 2}",
                  label=label, sex=label[0], age=int(label[2:4]) + 3, age_bin=label[2:],
                  source=f"raw/{PATIENT}-{seed}-{i}.png")


def interval(v: float) -> dict:
    return {"value": v, "low": round(v - 0.05, 4), "high": round(v + 0.05, 4)}


def table3_cell(model_name: str | None, stages: list[str], real: float, synthetic: float,
                degenerate: bool = False) -> dict:
    """One cell of metrics/summary.json, as table3 writes it: VGG16 cells name its head; a real arm at chance has no
    chance-normalised drop."""
    normalised = (interval(round((real - synthetic) / (real - 0.5), 4)) if real > 0.5 else
                  {"value": None, "low": -1.0, "high": 4.0})
    return {**({"model_name": model_name} if model_name else {}), "real": interval(real),
            "synthetic": interval(synthetic), "real_synthetic": interval(real),
            "drop": interval(round((real - synthetic) / real, 4)), "drop_chance_normalised": normalised,
            "real_synthetic_drop": interval(0.0), "degenerate": degenerate,
            "degenerate_reasons": {"synthetic": ["predicts one class for 100% of test images"]} if degenerate else {},
            "gan": {"stages": stages, "learnt": True, "not_learnt": [], "still_improving": False},
            "replicates": 2, "study": {"real": 0.9, "synthetic": 0.88, "drop": 0.0222}}


def studygroups_metrics(root: Path, group: str = "x_norm", split_unit: str = "patient") -> dict:
    """metrics/studygroups.json's entry of `group` from the group's sets, as the studygroups stage counts them."""
    sides = {}
    for side in ("train", "val", "test"):
        meta = ImageSet(root / "data/studygroups" / group / side).meta
        sides[side] = {"images": len(meta), "requested": len(meta), "shortfall": 0,
                       "per_label": meta["label"].value_counts().sort_index().to_dict(),
                       "units": int(meta["patient_id"].nunique()), "split_unit": split_unit}
    return {group: sides}


def run_ok(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    return result


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """Small torch ops stall when two threads share a busy 2-core CPU (conftest.one_thread), for this whole module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_project(root: Path, name: str) -> Path:
    """A project folder with the outputs export and generate read: the smoke profile, the X-Norm `cond` stage `name`
    trained for 2 epochs on a 48-image X-Norm group and its synthetic set (2 draws, hash-screened), the study groups'
    counts, Table 3 and dvc.lock."""
    arch = name.split("-")[0]
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, root / f)
    apply_profile("smoke", root / "params.yaml")
    set_params([f"tasks.xray.arch={arch}", "tasks.xray.group=x_norm", "tasks.xray.setup=cond", "gan.xray.epochs_cond=2",
                "synthesize.checkpoint=best", "export.sets=table3", "export.with_generator=false",
                f"export.allow_unlearnt=[{name}]"],  # 2 epochs on 48 images: the generator has not learnt yet
               root / "params.yaml")
    groups = root / "data/studygroups/x_norm"
    for side, n, seed in (("train", 48, 0), ("val", 16, 1), ("test", 40, 2)):
        write_group(groups / side, n, seed)
    train = ImageSet(groups / "train")
    net = score.train_feature_net(read_batch(train, np.arange(len(train)), 32), train.meta["label"].to_numpy(),
                                  epochs=1)
    score.save_feature_net(net, root / "models/feature_net/xray.pt", resolution=32)
    write_json(root / "metrics/feature_net/xray.json", net_metrics(net, ImageSet(groups / "val"), "xray"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("BIOMEDSYNTH_MLFLOW", "0")
        mp.setenv("BIOMEDSYNTH_DEVICE", "cpu")
        run_ok(["train-gan", name])
        run_ok(["synthesize", name])
    write_json(root / "metrics/studygroups.json", studygroups_metrics(root))
    histology = ["dcgan-h_norm-uncond", "dcgan-h_tumor-uncond"]
    write_json(root / "metrics/summary.json", {
        "claims": {"verdict": "holds"},
        "histology": {"vgg16": table3_cell("VGG16 (512-512 head)", histology, 0.95, 0.7),
                      "knn": table3_cell(None, histology, 0.94, 0.87)},
        "xray_sex": {"vgg16": table3_cell("VGG16 (512-512 head)", [name], 0.68, 0.64),
                     "knn": table3_cell(None, [name], 0.74, 0.5, degenerate=True)},
        "xray_age": {"vgg16": table3_cell("VGG16 (512-512 head)", [name], 0.5, 0.47),
                     "knn": table3_cell(None, [name], 0.65, 0.5, degenerate=True)}})
    lock = {"schema": "2.0", "stages": {f"synthesize@{name}": {
        "cmd": "biomedsynth synthesize",
        "deps": [{"path": f"models/gan/{name}", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir"},
                 {"path": "data/studygroups/x_norm", "hash": "md5", "md5": "fedcba9876543210fedcba9876543210.dir"},
                 {"path": "src/biomedsynth/synthesize.py", "hash": "md5", "md5": "00000000000000000000000000000001"}],
        "params": {"params.yaml": {"seed": 0, "synthesize": {"checkpoint": "best", "draws": 2}}},
        "outs": [{"path": f"data/synthetic/{name}", "hash": "md5", "md5": "11111111111111111111111111111111.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    record_synthesize_metrics(root, name)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, one_thread_here):
    """build_project of a DCGAN stage."""
    return build_project(tmp_path_factory.mktemp("project"), NAME)


def write_tiles(path: Path, n: int, seed: int, label: str = "normal") -> None:
    """Histology-like 32 px RGB tiles (pink ground; many small dark dots, or for tumour fewer large pale ones), each
    its own split unit `tile_<i>`, as ingest names ready-cut tiles that came without a slide id."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    dots, radius, colour = (12, 2, (60, 40, 120)) if label == "normal" else (5, 4, (150, 110, 190))
    with ImageSetWriter(path, (32, 32, 3)) as w:
        for i in range(n):
            img = np.empty((32, 32, 3))
            img[:] = (230, 170, 200)
            for cy, cx in rng.uniform(0, 32, (dots, 2)):
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = colour
            w.add(np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8), image_id=f"{label}{seed}-{i}",
                  patient_id=f"tile_{label}{1000 * seed + i}", label=label, slide_label=label,
                  source=f"raw/{PATIENT}-{seed}-{i}.png")


@pytest.fixture(scope="module")
def tile_project(tmp_path_factory, one_thread_here):
    """A project of ready-cut tiles without slide ids, split by tile: the histology feature net as its stage builds
    it, an H-Norm DCGAN trained for 2 epochs and its synthetic set, the study groups' counts with split_unit tile,
    and Table 3 with ingest's tile-level warning (as table3 collects it from metrics/ingest)."""
    from biomedsynth.gan.feature_net import build_feature_net
    from biomedsynth.ingest.histology import TILE_LEVEL_WARNING
    from biomedsynth.table3 import data_warnings

    root = tmp_path_factory.mktemp("tiles")
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / f, root / f)
    apply_profile("smoke", root / "params.yaml")
    set_params(["tasks.histology.arch=dcgan", "gan.histology.epochs=2", "synthesize.checkpoint=best",
                f"export.allow_unlearnt=[{TILE_NAME}]"], root / "params.yaml")
    for group, label in (("h_norm", "normal"), ("h_tumor", "tumor")):
        for side, n, seed in (("train", 48, 0), ("val", 16, 1), ("test", 40, 2)):
            write_tiles(root / "data/studygroups" / group / side, n, seed, label)
    build_feature_net("histology", root / "data/studygroups", 32, 3, 0, root / "models/feature_net/histology.pt",
                      root / "metrics/feature_net/histology.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("BIOMEDSYNTH_MLFLOW", "0")
        mp.setenv("BIOMEDSYNTH_DEVICE", "cpu")
        run_ok(["train-gan", "dcgan-h_norm-uncond"])
        run_ok(["synthesize", "dcgan-h_norm-uncond"])
    write_json(root / "metrics/studygroups.json", studygroups_metrics(root, "h_norm", "tile"))
    write_json(root / "metrics/ingest/histology.json", {"split_unit": "tile", "warnings": [TILE_LEVEL_WARNING]})
    stages = [TILE_NAME, "dcgan-h_tumor-uncond"]
    write_json(root / "metrics/summary.json", {
        "claims": {"verdict": "holds", "replicate_variance": "measured"},
        "histology": {"knn": table3_cell(None, stages, 0.94, 0.87)},
        "warnings": data_warnings(root / "metrics")})
    lock = {"schema": "2.0", "stages": {f"synthesize@{TILE_NAME}": {
        "cmd": "biomedsynth synthesize dcgan h_norm uncond",
        "deps": [{"path": f"models/gan/{TILE_NAME}", "hash": "md5", "md5": "22222222222222222222222222222222.dir"},
                 {"path": "data/studygroups/h_norm", "hash": "md5", "md5": "33333333333333333333333333333333.dir"}],
        "outs": [{"path": f"data/synthetic/{TILE_NAME}", "hash": "md5", "md5": "44444444444444444444444444444444.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    record_synthesize_metrics(root, TILE_NAME)
    return root


def record_synthesize_metrics(root: Path, name: str = NAME) -> None:
    """dvc.lock records synthesize's metrics file as DVC does once the stage has run: the md5 of its bytes."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    path = f"metrics/synthesize/{name}.json"
    outs = lock["stages"][f"synthesize@{name}"]["outs"]
    outs[:] = [o for o in outs if o["path"] != path] + [
        {"path": path, "hash": "md5", "md5": hashlib.md5((root / path).read_bytes()).hexdigest()}]
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


@pytest.fixture
def at(project, monkeypatch):
    """Run in the project, on the CPU."""
    monkeypatch.chdir(project)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    return project


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- export ----

def test_an_export_loads_everywhere_and_says_what_it_is(at, tmp_path):
    out = tmp_path / "exp"
    run_ok(["export", NAME, "--out", str(out)])
    found = check_export(out)
    synth = ImageSet(at / "data/synthetic" / NAME)
    metrics = json.loads((at / f"metrics/synthesize/{NAME}.json").read_text())
    marked = synth.meta["near_copy"].to_numpy().astype(bool)
    assert len(synth) == 96 and found["images"] == 96 - marked.sum() and marked.sum() <= 2
    assert found["labels"] == synth.meta["label"][~marked].value_counts().sort_index().to_dict()
    assert found["croissant_warnings"] == 1  # datePublished, left out on purpose (croissant.metadata)
    meta = (out / "metadata.csv").read_text().splitlines()
    assert meta[0] == "file_name,image_id,label,sex,age_bin,draw"
    assert meta[1] == "images/F_18-38/syn-000000.png,syn-000000,F_18-38,F,18-38,0"
    png = Image.open(out / "images/F_18-38/syn-000000.png")
    assert png.mode == "L" and png.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(png), synth[0][..., 0])  # lossless
    mark = json.loads(png.text["synthetic"])
    assert mark["synthetic"] is True and mark["set"] == NAME
    assert mark["generator"] == f"dcgan cond, model conditional, epoch {metrics['checkpoint_epochs']['conditional']}"
    sheet = json.loads((out / "datasheet.json").read_text())
    assert sheet["memorisation"]["verdict"] == "no evidence of copying" and not sheet["memorisation"]["copying"]
    assert sheet["memorisation"]["spaces"]["pixels"]["c_t"] == metrics["evidence"]["pixels"]["c_t"]
    privacy = sheet["privacy"]["checked"]
    assert privacy["membership_inference"]["auc"]["features"]["value"] == (
        metrics["evidence"]["features"]["membership"]["value"])
    assert privacy["gate"]["verdict"] == "passed" and not privacy["gate"]["overridden"]
    assert privacy["gate"]["false_positive_rate"] == metrics["evidence"]["false_positive_rate"]
    assert privacy["near_copies_dropped"]["dropped"] == marked.sum() and sheet["privacy"]["not_checked"]
    text = (out / "datasheet.md").read_text()
    assert "## Privacy: what was checked and what was not" in text and "splits of the 40 held-out real" in text
    assert sheet["hash_screen"]["applied"] and sheet["hash_screen"]["threshold_bits"] == 200
    assert sheet["how_made"]["dvc"]["generator"] == "0123456789abcdef0123456789abcdef.dir"
    assert sheet["how_made"]["checkpoint"]["epochs"] == metrics["checkpoint_epochs"]
    assert sheet["source_data"]["sides"]["train"] == {"images": 48, "per_label": {"F_18-38": 24, "M_48-68": 24},
                                                      "patients": 24}
    assert sheet["source_data"]["split_unit"] == "patient" and "Split by patient: no patient's scans" in text
    assert "48 chest X-ray images of 24 patients" in text and "images of other patients" in text
    croissant = json.loads((out / "croissant.json").read_text())
    extra = {(v["name"], v["value"]) for v in croissant["additionalProperty"]}
    assert ("split_unit", "patient") in extra
    # the run's warnings as the report lists them, in both (here Table 3's degenerate KNN arms among them)
    from biomedsynth.report import run_warnings
    warnings = run_warnings(json.loads((at / "metrics/summary.json").read_text()), at / "metrics", [NAME])
    assert warnings and sheet["run_warnings"] == warnings
    assert all(f"- {w}" in text and ("run_warning", w) in extra for w in warnings)
    assert f"**{len(warnings)} warning(s) about the run**" in text
    # this project's feature net beats chance on held-out images, so nothing is marked unreliable
    assert json.loads((at / "metrics/feature_net/xray.json").read_text())["better_than_chance"]["overall"]
    assert sheet["memorisation"]["spaces"]["features"]["reliable"] is True and "UNRELIABLE" not in text
    assert set(sheet["utility"]) == {"xray_sex", "xray_age"}  # where the set was benchmarked, not histology
    assert sheet["utility"]["xray_sex"]["models"]["vgg16"]["synthetic"] == interval(0.64)
    assert sheet["utility"]["xray_age"]["models"]["vgg16"]["drop_chance_normalised"].startswith(
        "undefined: the real arm's accuracy is at chance")
    assert any("KNN is degenerate" in lim for lim in sheet["limits"]) and sheet["license"] == "CC-BY-4.0"
    for rel, data in files_of(out).items():  # no patient id, scan id or source path reaches any file
        assert PATIENT.encode() not in data and b"raw/" not in data, rel
    first_m = sorted((out / "images/M_48-68").iterdir())[0]
    first_m.write_bytes(b"changed")
    assert verify_checksums(out) == [f"images/M_48-68/{first_m.name}: changed"]


def test_an_export_names_the_code_by_its_version_and_no_commit(at, tmp_path, monkeypatch):
    """Exported at a git commit, the export names no commit (and no date taken from one): the same code rerun at a
    results-only commit writes the same export, so DVC's hashes of it do not change."""
    head = _git_repo(tmp_path / "repo")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "repo" / ".git"))  # `git rev-parse HEAD` in the project: `head`
    out = tmp_path / "exp"
    run_ok(["export", NAME, "--out", str(out)])
    assert re.fullmatch(r"biomedsynth \d+\.\d+\S*", code_version())  # the package and its version
    for rel, data in files_of(out).items():
        assert head.encode() not in data, rel
    for rel in ("datasheet.json", "datasheet.md", "croissant.json"):  # no 40-hex commit of any repository either
        assert not re.search(r"\b[0-9a-f]{40}\b", (out / rel).read_text()), rel
    sheet = json.loads((out / "datasheet.json").read_text())
    assert sheet["how_made"]["code"] == code_version()
    assert not {"commit", "exported_at_commit"} & set(sheet["how_made"])
    assert f"- code: {code_version()}" in (out / "datasheet.md").read_text()
    croissant = json.loads((out / "croissant.json").read_text())
    assert "datePublished" not in croissant and f"made by {code_version()}" in croissant["citeAs"]
    mark = json.loads(Image.open(next((out / "images").rglob("*.png"))).text["synthetic"])
    assert mark["code"] == code_version() and "commit" not in mark


def test_a_tile_level_split_says_so_and_claims_no_slide_independence(tile_project, tmp_path, monkeypatch):
    """A real cohort's tiles without slide ids were split by tile, yet the datasheet said "600 images of 600 slides"
    and "images of other slides", and neither it nor croissant.json named the leak. Now both say the unit is the
    tile, the datasheet claims no slide independence, and ingest's warning appears in both."""
    from biomedsynth.ingest.histology import TILE_LEVEL_WARNING

    monkeypatch.chdir(tile_project)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    out = tmp_path / "tiles"
    run_ok(["export", TILE_NAME, "--out", str(out)])
    check_export(out)
    sheet = json.loads((out / "datasheet.json").read_text())
    text = (out / "datasheet.md").read_text()
    src = sheet["source_data"]
    assert src["split_unit"] == "tile" and set(src["sides"]["train"]) == {"images", "per_label", "tiles"}
    assert "Split by tile, not by slide" in text and "tiles of one slide may sit on both sides" in text
    assert "no slide independence is claimed" in text
    assert not re.search(r"\d[\d,]* slides|other slides", text), text  # no slide count, no "other slides"
    warning = f"data: histology: {TILE_LEVEL_WARNING}"
    assert warning in sheet["run_warnings"] and f"- {warning}" in text
    assert any(lim.startswith("The real data were split by tile, not by slide") for lim in sheet["limits"])
    croissant = json.loads((out / "croissant.json").read_text())
    extra = {(v["name"], v["value"]) for v in croissant["additionalProperty"]}
    assert ("split_unit", "tile") in extra and ("run_warning", warning) in extra
    assert warning in croissant["rai:dataLimitations"] and "split by tile" in croissant["rai:dataCollection"]
    # 3 epochs on 96 tiles leave this project's feature net at chance: its space is marked unreliable everywhere
    net = json.loads((tile_project / "metrics/feature_net/histology.json").read_text())
    assert net["better_than_chance"]["overall"] is False and len(net["warnings"]) == 1
    assert f"feature_net@histology: {net['warnings'][0]}" in sheet["run_warnings"]
    assert sheet["memorisation"]["spaces"]["features"]["reliable"] is False
    assert sheet["fidelity"]["prdc"]["features"]["unreliable_because"] == net["warnings"]
    assert "| features (UNRELIABLE: its net is not better than chance): synthetic |" in text
    assert any(lim.startswith("The features space (the KID feature net trained here) is unreliable")
               and net["warnings"][0] in lim for lim in sheet["limits"])
    assert ("run_warning", f"feature_net@histology: {net['warnings'][0]}") in extra
    for rel, data in files_of(out).items():  # tile ids and source paths stay home here too
        assert b"tile_normal" not in data and PATIENT.encode() not in data and b"raw/" not in data, rel


def test_a_slide_level_split_still_says_slides():
    sides = {side: {"images": n, "requested": n, "shortfall": 0, "per_label": {"normal": n}, "units": u,
                    "split_unit": "slide"} for side, n, u in (("train", 600, 14), ("val", 150, 3), ("test", 400, 11))}
    provenance = {"sources": {"histology": {"format": "slides"}}, "data": "abc.dir"}
    src = datasheet._source("h_norm", "histology", {"h_norm": sides}, provenance)
    assert src["split_unit"] == "slide" and src["split"].startswith("split by slide: no slide's tiles sit on two")
    assert "600 lymph-node histology tile images of 14 slides" in src["description"]
    assert "150 images of other slides" in src["description"] and src["sides"]["test"]["slides"] == 11
    del sides["val"]["split_unit"]  # studygroups.json from before split units were recorded
    with pytest.raises(ValueError, match="records no single split unit for h_norm.*studygroups stage again"):
        datasheet._source("h_norm", "histology", {"h_norm": sides}, provenance)


def planted(project: Path, monkeypatch, copies) -> None:
    """The generator's sampler with `copies(label, images, rng)` run over what it draws, the training images by
    label at hand (e.g. to put training images in its place)."""
    from biomedsynth.gan import checkpoint

    real = ImageSet(project / "data/studygroups/x_norm/train")
    by_label = {lb: np.stack([real[i] for i in np.flatnonzero(real.meta["label"] == lb)]) for lb in LABELS}
    sample = checkpoint.Synthesizer.sample
    monkeypatch.setattr(checkpoint.Synthesizer, "sample",
                        lambda self, label, n, rng: copies(label, sample(self, label, n, rng), by_label[label], rng))


def half_copies(label, drawn, train_images, rng):
    """Label F_18-38 drawn as training images, M_48-68 as the GAN draws it."""
    return train_images[rng.integers(0, len(train_images), len(drawn))] if label == LABELS[0] else drawn


@pytest.fixture(scope="module")
def copying(project, tmp_path_factory):
    """The project with a planted copying set: synthesize's sampler returns training images for label F_18-38."""
    root = tmp_path_factory.mktemp("copying") / "project"
    shutil.copytree(project, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("BIOMEDSYNTH_DEVICE", "cpu")
        planted(root, mp, half_copies)
        run_ok(["synthesize", "dcgan-x_norm-cond"])
    record_synthesize_metrics(root)
    return root


@pytest.fixture
def in_copying(copying, tmp_path, monkeypatch):
    """A fresh copy of the copying project to run in, its sampler still planted."""
    root = tmp_path / "copying"
    shutil.copytree(copying, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    planted(root, monkeypatch, half_copies)
    return root


def test_a_set_made_of_training_images_is_refused_unless_allowed(in_copying):
    """The memorisation test flags the planted set; export refuses in one line naming the evidence (the membership
    AUC too) and writes nothing; --allow-flagged exports it, the datasheet records the override, and the near copies
    (every F_18-38 image) stay home even so."""
    root = in_copying
    synth = json.loads((root / f"metrics/synthesize/{NAME}.json").read_text())
    assert synth["evidence"]["copying"] and synth["evidence"]["screen"]["near_copies"] >= 48
    result = CliRunner().invoke(app, ["export", NAME])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "memorisation test flags it as copying training images" in lines[0] and "C_T" in lines[0]
    assert "near copies" in lines[0] and "--allow-flagged" in lines[0] and "membership AUC features" in lines[0]
    assert not (root / "exports" / NAME).exists()
    set_params([f"export.sets=[{NAME}]"], root / "params.yaml")
    result = run_ok(["export-sets"])  # the pipeline's stage: a note, and the run goes on
    note = json.loads((root / "exports" / NAME / "not_exported.json").read_text())
    assert note["exported"] is False and "flags it as copying training images" in note["reason"]
    assert "C_T" in note["reason"] and "export.allow_flagged" in note["reason"] and note["reason"] in result.output
    assert [f.name for f in (root / "exports" / NAME).iterdir()] == ["not_exported.json"]
    result = run_ok(["export", NAME, "--allow-flagged"])
    sheet = json.loads((root / "exports" / NAME / "datasheet.json").read_text())
    assert sheet["memorisation"]["verdict"] == "flagged as copying training images"
    assert sheet["memorisation"]["exported_despite_verdict"] is True
    assert any("Exported although" in lim for lim in sheet["limits"]) and datasheet.unfilled(sheet) == []
    text = (root / "exports" / NAME / "datasheet.md").read_text()
    assert "exported anyway, by explicit override" in text and "let out by explicit override" in text
    dropped = sheet["privacy"]["checked"]["near_copies_dropped"]
    marked = ImageSet(root / "data/synthetic" / NAME).meta["near_copy"].to_numpy().astype(bool)
    assert dropped == {**dropped, "screened": 96, "dropped": int(marked.sum()), "shipped": 96 - int(marked.sum())}
    labels = ImageSet(root / "data/synthetic" / NAME).meta["label"][~marked].value_counts().to_dict()
    assert sheet["what"]["labels"] == labels and LABELS[0] not in labels  # every F_18-38 image is a copy
    assert '"near_copies_dropped": ' + str(int(marked.sum())) in result.output
    shipped = set(pd_ids(root / "exports" / NAME))
    assert shipped == set(ImageSet(root / "data/synthetic" / NAME).meta["image_id"][~marked])


def pd_ids(folder: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(folder / "metadata.csv")["image_id"].tolist()


def test_generate_from_a_flagged_set_refuses_unless_allowed_and_drops_near_copies(in_copying, tmp_path):
    """generate NAME reads the copying verdict: it refuses a flagged set in one line and writes nothing; with
    --allow-flagged it draws, generation.json records the override, and draws that are near copies of training
    images are dropped: a label whose every draw is one gets nothing."""
    result = CliRunner().invoke(app, ["generate", NAME, "-n", "4", "--out", str(tmp_path / "g")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "flags it as copying training images" in lines[0] and "--allow-flagged to generate from it" in lines[0]
    assert not (tmp_path / "g").exists()
    run_ok(["generate", NAME, "-n", "4", "--label", LABELS[1], "--out", str(tmp_path / "g"), "--allow-flagged"])
    info = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert info["gate"]["flagged"] and info["gate"]["overridden"] and info["per_label"][LABELS[1]]["images"] == 4
    assert info["near_copy_screen"].startswith("applied") and "membership AUC" in info["gate"]["evidence"]
    result = CliRunner().invoke(app, ["generate", NAME, "-n", "2", "--label", LABELS[0], "--out",
                                      str(tmp_path / "f"), "--allow-flagged"])
    assert result.exit_code == 1 and "got 0 of 2 images" in result.output
    assert "near copies of training images dropped" in result.output and not (tmp_path / "f").exists()


def test_a_shipped_generator_carries_the_gate(in_copying, tmp_path):
    """--with-generator passes the same gate: a flagged set's generator ships only by override, its card carries the
    verdict, and generate --generator refuses it in turn unless allowed (recording the override)."""
    run_ok(["export", NAME, "--with-generator", "--allow-flagged", "--out", str(tmp_path / "e")])
    gen = str(tmp_path / "e" / "generator")
    result = CliRunner().invoke(app, ["generate", "--generator", gen, "-n", "2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "flags it as copying training images" in result.output
    assert not (tmp_path / "m").exists()
    run_ok(["generate", "--generator", gen, "-n", "2", "--out", str(tmp_path / "m"), "--allow-flagged"])
    assert json.loads((tmp_path / "m" / "generation.json").read_text())["gate"]["overridden"]
    card = json.loads((tmp_path / "e" / "generator" / "card.json").read_text())
    assert card["gate"]["flagged"] and card["gate"]["overridden"]
    assert card["near_copy_screen"].startswith("not applied by generate --generator")
    result = CliRunner().invoke(app, ["export", NAME, "--with-generator", "--out", str(tmp_path / "refused")])
    assert result.exit_code == 1 and "--allow-flagged to export it with its generator" in result.output


def test_a_set_that_passes_still_leaves_without_its_near_copies(project, tmp_path, monkeypatch):
    """One training image planted among the first draws: the set passes the memorisation test (one near copy is
    chance), yet export leaves it out and says so, and generate drops and redraws it."""
    root = tmp_path / "one"
    shutil.copytree(project, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    state = {"planted": 0}

    def one_copy(label, drawn, train_images, rng):
        if label == LABELS[0] and not state["planted"]:
            drawn = drawn.copy()
            drawn[0] = train_images[0]
            state["planted"] += 1
        return drawn

    planted(root, monkeypatch, one_copy)
    run_ok(["synthesize", "dcgan-x_norm-cond"])
    record_synthesize_metrics(root)
    synth = json.loads((root / f"metrics/synthesize/{NAME}.json").read_text())
    meta = ImageSet(root / "data/synthetic" / NAME).meta
    marked = meta["near_copy"].to_numpy().astype(bool)
    assert not synth["evidence"]["copying"] and marked[0] and synth["evidence"]["screen"]["near_copies"] == marked.sum()
    result = run_ok(["export", NAME, "--out", str(tmp_path / "e")])
    assert f'"near_copies_dropped": {marked.sum()}' in result.output
    assert meta["image_id"][0] not in pd_ids(tmp_path / "e") and len(pd_ids(tmp_path / "e")) == 96 - marked.sum()
    sheet = json.loads((tmp_path / "e" / "datasheet.json").read_text())
    assert sheet["privacy"]["checked"]["near_copies_dropped"]["dropped"] == marked.sum()
    assert f"dropped on the way out: {marked.sum()} of 96" in (tmp_path / "e" / "datasheet.md").read_text()
    state["planted"] = 0
    run_ok(["generate", NAME, "-n", "3", "--label", LABELS[0], "--out", str(tmp_path / "g")])
    info = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert info["per_label"][LABELS[0]]["near_copies"] >= 1 and info["per_label"][LABELS[0]]["images"] == 3
    first = np.asarray(ImageSet(root / "data/studygroups/x_norm/train")[0])[..., 0]
    for png in (tmp_path / "g" / "images" / LABELS[0]).iterdir():
        assert not np.array_equal(np.asarray(Image.open(png)), first)


def test_a_hand_edited_verdict_is_refused(project, tmp_path, monkeypatch):
    """The gate reads synthesize's verdict only from the bytes dvc.lock records for its stage: a flagged set's
    metrics edited to `copying: false` are refused in one line and nothing is written (before, they were exported);
    so are metrics no run recorded."""
    root = tmp_path / "edited"
    shutil.copytree(project, root)
    monkeypatch.chdir(root)
    metrics = root / f"metrics/synthesize/{NAME}.json"
    synth = json.loads(metrics.read_text())
    synth["evidence"]["copying"] = True  # a flagged run, as its stage wrote it and DVC recorded it
    write_json(metrics, synth)
    record_synthesize_metrics(root)
    assert "flags it as copying training images" in CliRunner().invoke(app, ["export", NAME]).output
    synth["evidence"]["copying"] = False  # the hand edit
    write_json(metrics, synth)
    edited = CliRunner().invoke(app, ["export", NAME])
    (root / "dvc.lock").unlink()
    unrecorded = CliRunner().invoke(app, ["export", NAME])
    for result in (edited, unrecorded):
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert "memorisation verdict cannot be" in result.output and f"dvc repro synthesize@{NAME}" in result.output
    assert f"is not the file synthesize@{NAME} wrote (its md5 differs from dvc.lock's" in edited.output
    assert f"records no synthesize@{NAME} run that wrote it" in unrecorded.output
    assert not (root / "exports").exists()


def test_a_set_whose_gan_learnt_nothing_is_not_exported_unless_asked(project, tmp_path, monkeypatch):
    """A real cohort's two histology sets whose GANs learnt nothing were exported, datasheet and all, as if usable.
    Now export refuses in one line, the stage writes a note, and the override ships it with the datasheet saying so."""
    at = tmp_path / "project"
    shutil.copytree(project, at)
    monkeypatch.chdir(at)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    assert json.loads((at / f"metrics/synthesize/{NAME}.json").read_text())["gan_learnt"] is False
    set_params(["export.allow_unlearnt=[]", f"export.sets=[{NAME}]"], at / "params.yaml")
    result = CliRunner().invoke(app, ["export", NAME])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "learnt nothing" in result.output and "--allow-unlearnt" in result.output
    assert not (at / "exports" / NAME).exists()
    result = run_ok(["export-sets"])
    note = json.loads((at / "exports" / NAME / "not_exported.json").read_text())
    assert "learnt nothing" in note["reason"] and "export.allow_unlearnt" in note["reason"]
    run_ok(["export", NAME, "--allow-unlearnt"])
    assert "learnt nothing by SWD" in (at / "exports" / NAME / "datasheet.md").read_text()


def test_the_stage_exports_the_sets_params_list_and_notes_the_others(at):
    shutil.copy("params.yaml", "listed.yaml")
    set_params([f"export.sets=[{NAME}]"], "listed.yaml")
    result = run_ok(["export-sets", "--params", "listed.yaml"])
    assert f"export pggan-x_norm-cond: not exported: export.sets lists {NAME}" in result.output
    names = yaml.safe_load((at / "params.yaml").read_text())["gan"]["stages"]  # the smoke profile's: all twenty-four
    assert sorted(p.parent.name for p in (at / "exports").glob("*/SHA256SUMS")) == [NAME]
    noted = sorted(p.parent.name for p in (at / "exports").glob("*/not_exported.json"))
    assert noted == sorted(set(names) - {NAME})  # every other set says why it is not there
    note = json.loads((at / "exports/pggan-x_norm-cond/not_exported.json").read_text())
    assert note["exported"] is False and NAME in note["reason"]
    assert (at / "exports" / NAME / "croissant.json").is_file()
    bad = CliRunner().invoke(app, ["export", "gan-x_norm-cond"])
    assert bad.exit_code == 2 and "set = 'gan-x_norm-cond': allowed dcgan-x_norm-uncond" in bad.output
    with pytest.raises(ParamsError, match="export.sets lists sg9-x_norm-cond, which gan.stages does not list"):
        set_params(["export.sets=[sg9-x_norm-cond]"], "listed.yaml")
    # a listed set no stage draws is refused by check_params, before any stage runs (the export stage at the end of
    # a `dvc exp run -S tasks.xray.arch=dcgan` failed on it: "no synthetic set to export")
    listed = yaml.safe_load(Path("listed.yaml").read_text())
    listed["gan"]["stages"].pop("sg2ada-h_norm-uncond")
    listed["tasks"]["compare"] = []  # the smoke profile compares every generator, sg2ada's histology sets too
    listed["export"]["sets"] = ["sg2ada-h_norm-uncond"]
    Path("listed.yaml").write_text(yaml.safe_dump(listed))
    bad = CliRunner().invoke(app, ["check-params", "--params", "listed.yaml"])
    assert bad.exit_code == 2 and "export.sets lists sg2ada-h_norm-uncond, which gan.stages does not list (it " \
                                  "lists dcgan-h_norm-uncond, " in bad.output, bad.output


def test_an_export_never_replaces_a_folder_of_other_files(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds files that are not an export"):
        with staged(tmp_path / "mine"):
            pass
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    with pytest.raises(RuntimeError):  # a failed export leaves no half-written folder
        with staged(tmp_path / "new") as tmp:
            (tmp / "a.png").write_bytes(b"x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_png_writer_tiles_are_rgb_and_names_are_checked(tmp_path):
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with PngWriter(tmp_path, "dcgan-h_tumor-uncond", "histology", "biomedsynth 9.9") as w:
        w.add(tiles[0], "syn-000000", "tumor", "dcgan uncond, model tumor, epoch 3", draw=0)
        with pytest.raises(ValueError, match="image id 'syn-000000' twice"):
            w.add(tiles[1], "syn-000000", "tumor", "g")
        with pytest.raises(ValueError, match=r"label '\.\./x' cannot name a file"):
            w.add(tiles[1], "syn-000001", "../x", "g")
        with pytest.raises(ValueError, match="must be uint8"):
            w.add(tiles[1].astype(np.float32), "syn-000001", "tumor", "g")
        w.write_metadata()
    png = Image.open(tmp_path / "images/tumor/syn-000000.png")
    assert png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), tiles[0])
    assert json.loads(png.text["synthetic"]) == {"synthetic": True, "set": "dcgan-h_tumor-uncond",
                                                "generator": "dcgan uncond, model tumor, epoch 3",
                                                "code": "biomedsynth 9.9"}
    assert (tmp_path / "metadata.csv").read_text().splitlines() == [
        "file_name,image_id,label,tumor,draw", "images/tumor/syn-000000.png,syn-000000,tumor,1,0"]
    assert label_columns("M_48-68", "xray") == {"sex": "M", "age_bin": "48-68"}
    assert label_columns("normal", "histology") == {"tumor": 0}
    with pytest.raises(ValueError, match="not <sex>_<age bin>"):
        label_columns("X_18", "xray")


def test_unfilled_names_empty_and_placeholder_fields():
    sheet = {"a": 1, "b": {"c": None, "d": "", "e": []}, "f": ["ok", "TODO: describe"], "g": "<fill me>",
             "h": False, "i": 0, "how_made": {"options": {"images_per_phase": None}}}
    assert datasheet.unfilled(sheet) == ["b.c", "b.d", "b.e", "f[1]", "g"]
    assert datasheet.unfilled({"x": {}}) == ["x"]


def test_checksums_list_every_file_and_catch_extra_and_missing(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.txt").write_text("b")
    sums = write_checksums(tmp_path)
    assert list(sums) == ["a.txt", "sub/b.txt"]
    assert (tmp_path / "SHA256SUMS").read_text().splitlines()[0] == (
        "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb  a.txt")
    (tmp_path / "c.txt").write_text("c")
    (tmp_path / "a.txt").unlink()
    assert verify_checksums(tmp_path) == ["a.txt: missing", "c.txt: not listed"]


# ---- generate ----

def test_generate_is_deterministic_for_a_seed_and_label_on_cpu(at, tmp_path):
    def gen(out, *args):
        run_ok(["generate", NAME, "--out", str(tmp_path / out), *args])
        return files_of(tmp_path / out)

    a = gen("a", "-n", "6", "--label", "F_18-38", "--seed", "3")
    assert gen("b", "-n", "6", "--label", "F_18-38", "--seed", "3") == a
    c = gen("c", "-n", "6", "--label", "F_18-38", "--seed", "4")
    pngs = lambda files: {k: v for k, v in files.items() if k.endswith(".png")}  # noqa: E731
    assert len(pngs(a)) == 6 and not set(pngs(a).values()) & set(pngs(c).values())
    mixed = gen("mixed", "-n", "5", "--seed", "3")  # 3 F + 2 M: label F's images do not depend on M being drawn
    assert sorted(pngs(mixed)) == [f"images/F_18-38/gen-3-F_18-38-{i:06d}.png" for i in range(3)] + [
        f"images/M_48-68/gen-3-M_48-68-{i:06d}.png" for i in range(2)]
    for i in range(3):
        key = f"images/F_18-38/gen-3-F_18-38-{i:06d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "mixed" / key)),
                                      np.asarray(Image.open(tmp_path / "a" / key)))
    info = json.loads(a["generation.json"])
    assert info["hash_screen"].startswith("applied as synthesize did: 200 bits") and info["seed"] == 3
    assert info["per_label"]["F_18-38"]["images"] == 6 and info["epochs"] == json.loads(
        (at / f"metrics/synthesize/{NAME}.json").read_text())["checkpoint_epochs"]
    assert verify_checksums(tmp_path / "a") == []
    bad = CliRunner().invoke(app, ["generate", NAME, "-n", "2", "--label", "F_99-99", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 1 and "label 'F_99-99' was not trained" in bad.output
    bad = CliRunner().invoke(app, ["generate", "-n", "2", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "give a set NAME or --generator DIR" in bad.output


def test_a_shared_generator_draws_without_the_pipeline(at, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    run_ok(["export", NAME, "--out", str(out), "--with-generator"])
    check_export(out)
    gen = out / "generator"
    card = json.loads((gen / "card.json").read_text())
    epoch = card["epochs"]["conditional"]
    weights = gen / "conditional" / "epochs" / f"{epoch:03d}.pt"
    snap = torch.load(weights, weights_only=True)
    assert {v.dtype for v in snap["state_dict"].values() if v.is_floating_point()} == {torch.bfloat16}
    sheet = json.loads((out / "datasheet.json").read_text())
    assert sheet["generator"]["parameters"] > 0 and "## Generator (model card)" in (out / "datasheet.md").read_text()
    run_ok(["generate", NAME, "-n", "4", "--label", "M_48-68", "--seed", "1", "--out", str(tmp_path / "here")])
    elsewhere = tmp_path / "colleague"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no params.yaml, no models/, no data/
    result = run_ok(["generate", "--generator", str(gen), "-n", "4", "--label", "M_48-68", "--seed", "1",
                     "--out", "more"])
    assert "hash screen not applied: a shared generator" in result.output
    shared = files_of(elsewhere / "more")
    assert json.loads(shared["generation.json"])["set"] == NAME
    for key in [k for k in shared if k.endswith(".png")]:  # the same generator; bf16 weights move pixels a little
        a, b = (np.asarray(Image.open(d / key), np.float32) for d in (elsewhere / "more", tmp_path / "here"))
        assert np.abs(a - b).mean() < 3, key
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    bad = CliRunner().invoke(app, ["generate", "--generator", str(gen), "-n", "1", "--out", "x"])
    assert bad.exit_code == 1 and "differ from its SHA256SUMS" in bad.output
    torch.save({"state_dict": {}, "payload": Image.new("L", (1, 1))}, weights)  # an object, not weights
    write_checksums(gen)
    bad = CliRunner().invoke(app, ["generate", "--generator", str(gen), "-n", "1", "--out", "x"])
    assert bad.exit_code == 1 and "is not plain weights" in bad.output and not Path("x").exists()


# ---- the diffusion architecture through the same gate ----

def test_a_diffusion_set_exports_and_generates_through_the_same_gate(tmp_path_factory, tmp_path, monkeypatch):
    """A diffusion stage (the smoke profile's UNet, 4 sampler steps with guidance) trained and synthesized by the
    same commands: its set exports with a datasheet naming the architecture, generate draws the same images for a
    seed, and a shipped generator draws them again outside the pipeline."""
    name = "diffusion-x_norm-cond"
    root = build_project(tmp_path_factory.mktemp("diffusion"), name)
    monkeypatch.chdir(root)
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cpu")
    out = tmp_path / "exp"
    run_ok(["export", name, "--out", str(out), "--with-generator"])
    check_export(out)
    assert "a denoising diffusion model" in (out / "datasheet.md").read_text()
    args = ["-n", "3", "--label", "M_48-68", "--seed", "1"]
    run_ok(["generate", name, *args, "--out", str(tmp_path / "a")])
    run_ok(["generate", name, *args, "--out", str(tmp_path / "b")])
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    run_ok(["generate", "--generator", str(out / "generator"), *args, "--out", str(tmp_path / "shipped")])
    for key in [k for k in files_of(tmp_path / "a") if k.endswith(".png")]:  # bf16 weights move pixels a little
        a, b = (np.asarray(Image.open(d / key), np.float32) for d in (tmp_path / "a", tmp_path / "shipped"))
        assert np.abs(a - b).mean() < 3, key
