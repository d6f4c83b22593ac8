"""The size of models/gan, computed from a profile's options: per GAN stage, the sampling generators it keeps
(models x kept epochs x one generator's bytes at the snapshot dtype; grids and logs add a few MB), of the
stages the profile trains (gan.stages).

    .venv/bin/python benchmarks/gan_disk.py [--profile paper|default|smoke] [--images stage=model:images,...]

Images per model: the study's (SPEC: X-Norm 120,570 scans over 50 sex-age labels, X-Norm-L 71,026 over 30,
H-Norm and H-Tumor 40,000 tiles) for the paper profile; for the others, the group's training images that
metrics/studygroups.json records, over its labels.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from biomedsynth.gan import checkpoint as C
from biomedsynth.gan import train as T
from biomedsynth.params import Params, load_params, setup_of
from biomedsynth.params_edit import apply_profile

ROOT = Path(__file__).resolve().parents[1]
STUDY = {"x_norm": (120_570, 50), "x_norm_l": (71_026, 30), "h_norm": (40_000, 1), "h_tumor": (40_000, 1)}


def profile_params(name: str) -> Params:
    """params.yaml with the profile's keys over it, as `biomedsynth profile NAME` writes it (gan.stages' preset
    made a table)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        shutil.copy(ROOT / "params.yaml", path)
        apply_profile(name, path)
        return load_params(path)


def group_sizes(profile: str) -> dict[str, tuple[int, int]]:
    """{group: (training images, labels)}."""
    if profile == "paper":
        return STUDY
    groups = json.loads((ROOT / "metrics/studygroups.json").read_text())
    return {g: (v["train"]["images"], len(v["train"]["per_label"])) for g, v in groups.items() if g in STUDY}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="paper", choices=["paper", "default", "smoke"])
    args = ap.parse_args()
    p = profile_params(args.profile)
    total = 0
    print(f"{'stage':24} {'models':>6} {'kept/model':>10} {'MB each':>8} {'GB':>7}")
    for name, item in p.gan.stages.items():
        setup = setup_of(name)
        images, labels = group_sizes(args.profile)[item.group]
        models = 1 if setup == "cond" else labels
        per_model = images if setup == "cond" else images // labels
        opt = C.Options.from_params(p, item.arch, item.modality, setup,
                                    tuple(f"l{k}" for k in range(labels)), 3 if item.modality == "histology" else 1)
        kept = len(T.kept_epochs(opt, per_model))
        size = models * kept * T.snapshot_bytes(opt)
        total += size
        print(f"{name:24} {models:>6} {kept:>10} {T.snapshot_bytes(opt) / 1e6:8.1f} {size / 1e9:7.2f}")
    print(f"models/gan, {args.profile} profile ({p.gan.snapshots.dtype}, every {p.gan.snapshots.every}): "
          f"{total / 1e9:.1f} GB of generators")


if __name__ == "__main__":
    main()
