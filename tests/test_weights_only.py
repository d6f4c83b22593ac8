"""No weight file runs code: a pickle payload planted in any kind of file the project loads (feature net, GAN
resume checkpoint, GAN epoch snapshot, shipped generator, VGG16 weights) is refused in one line naming the
file, and the payload never runs."""
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from biomedsynth.cli import app
from biomedsynth.classify import vgg
from biomedsynth.export import write_checksums, write_generator
from biomedsynth.gan import score
from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import train as T
from biomedsynth.generate import from_shared
from test_gan_train import options, smoke_project, tiny_study


class Payload:
    """Unpickling this creates the folder `marker`: the code a hostile weight file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path) -> None:
    """Add a payload to the file's top-level dict; the honest file must itself load as plain weights."""
    content = torch.load(path, weights_only=True)
    torch.save({**content, "payload": Payload(marker)}, path)


def refused(load, path: Path, marker: Path) -> None:
    with pytest.raises(ValueError) as e:
        load()
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "not plain weights" in message, message
    assert not marker.exists(), "the payload ran"


@pytest.fixture(scope="module", autouse=True)
def no_tracking():
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BIOMEDSYNTH_MLFLOW", "0")
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny study, its feature net, one DCGAN stage trained one epoch (output + resume state), and the
    stage's chosen generator shipped as export --with-generator writes it."""
    root = tmp_path_factory.mktemp("w")
    train, val = tiny_study(root)
    T.train_gan(options("dcgan", epochs=1), train.path, val.path, root / "models/feature_net/xray.pt",
                root / "models/gan/x", *(root / f for f in ("m.json", "s.csv", "l.csv", "states")), log=lambda m: None)
    write_generator(root / "models/gan/x", {C.COND_MODEL: 1}, root / "shared",
                    {"epochs": {C.COND_MODEL: 1}, "set": "x", "modality": "xray",
                     "gate": {"flagged": False, "evidence": "none", "overridden": False}})
    return root


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained tree to plant payloads in, and the marker a payload would create."""
    root = tmp_path / "root"
    shutil.copytree(trained, root)
    return root, tmp_path / "payload-ran"


def test_feature_net(copy):
    root, marker = copy
    net = root / "models/feature_net/xray.pt"
    plant(net, marker)
    refused(lambda: score.load_feature_net(net), net, marker)


def test_resume_checkpoint(copy):
    root, marker = copy
    ckpt = next((root / "states").glob(f"*/{C.COND_MODEL}/checkpoint.pt"))
    plant(ckpt, marker)
    refused(lambda: T.train_gan(options("dcgan", epochs=2), root / "data/studygroups/x_norm/train",
                                root / "data/studygroups/x_norm/val", root / "models/feature_net/xray.pt",
                                root / "models/gan/x", *(root / f for f in ("m.json", "s.csv", "l.csv", "states")),
                                log=lambda m: None), ckpt, marker)


def test_gan_epoch_snapshot_sampled_and_exported(copy):
    root, marker = copy
    snap = C.epoch_file(root / "models/gan/x" / C.COND_MODEL, 1)
    plant(snap, marker)
    refused(lambda: C.Synthesizer(root / "models/gan/x", "last", torch.device("cpu")), snap, marker)
    refused(lambda: write_generator(root / "models/gan/x", {C.COND_MODEL: 1}, root / "again",
                                    {"epochs": {C.COND_MODEL: 1}, "set": "x", "modality": "xray"}), snap, marker)


def test_shipped_generator(copy):
    root, marker = copy
    snap = C.epoch_file(root / "shared" / C.COND_MODEL, 1)
    plant(snap, marker)
    write_checksums(root / "shared")  # a payload signed by whoever shipped it: the checksums do not catch it
    refused(lambda: from_shared(root / "shared"), snap, marker)


def test_vgg16_weights(tmp_path):
    weights, marker = tmp_path / "vgg16.pt", tmp_path / "payload-ran"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, weights)
    plant(weights, marker)
    refused(lambda: vgg.build_vgg(3, weights, input_size=32, head="small"), weights, marker)


def test_train_gan_stops_in_one_line_on_a_planted_feature_net(tmp_path, monkeypatch):
    """The issue's reproduction: the CLI stage exited 0 after running the payload."""
    root = smoke_project(tmp_path / "p")
    monkeypatch.chdir(root)
    net = Path("models/feature_net/xray.pt")
    plant(net, tmp_path / "payload-ran")
    result = CliRunner().invoke(app, ["train-gan", "dcgan-x_norm-cond"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and str(net) in result.output, result.output
    assert not (tmp_path / "payload-ran").exists() and not Path("models/gan").exists()

