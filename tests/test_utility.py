"""Checkpoint choice by utility: the probe, which epochs count, and when the rule does not apply."""
import json

import numpy as np
import pytest

from biomedsynth.gan.utility import candidate_epochs, choose_checkpoint, probe_accuracy, utility_epoch


def test_probe_reads_labels_from_informative_features_only():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 60)
    informative = rng.normal(0, 1, (180, 8)) + 3 * np.eye(3, 8)[y]
    assert probe_accuracy(informative[::2], y[::2], informative[1::2], y[1::2]) > 0.95
    noise = rng.normal(0, 1, (180, 8))
    assert abs(probe_accuracy(noise[::2], y[::2], noise[1::2], y[1::2]) - 1 / 3) < 0.15


def _model(d, sides, snapshots):
    (d / "epochs").mkdir(parents=True)
    rows = [{"epoch": e, "side": s, "alpha": 1.0, "swd": 1.0 / e} for e, s in enumerate(sides, 1)]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for e in snapshots:
        (d / "epochs" / f"{e:03d}.pt").write_bytes(b"")


def test_candidates_are_full_size_epochs_every_model_has(tmp_path):
    _model(tmp_path / "a", [4, 8, 16, 16, 16], snapshots=[1, 2, 3, 4, 5])
    _model(tmp_path / "b", [4, 8, 16, 16, 16], snapshots=[2, 3, 5])
    assert candidate_epochs([tmp_path / "a"]) == [3, 4, 5]  # a PGGAN still growing draws upsampled blocks
    assert candidate_epochs([tmp_path / "a", tmp_path / "b"]) == [3, 5]
    assert utility_epoch({3: 0.7, 4: 0.8, 5: 0.8}) == 5


def test_one_label_falls_back_to_swd_and_other_choices_pass_through(tmp_path, monkeypatch):
    from biomedsynth.gan import utility

    (tmp_path / "options.json").write_text(json.dumps({"labels": ["normal"]}))
    monkeypatch.setattr(utility.Options, "from_json", classmethod(lambda cls, d: type("O", (), d)))  # reads .labels
    choice, rule = choose_checkpoint("utility", tmp_path, tmp_path / "net.pt", tmp_path / "val")
    assert choice == "best" and rule["rule"] == "best" and "one" in rule["why"]
    assert choose_checkpoint("epoch_3", tmp_path, tmp_path, tmp_path) == ("epoch_3", {"rule": "epoch_3"})
