"""The export step: a synthetic set leaves the pipeline in formats others load as they are, with a datasheet
(what it is, how it was made, how faithful, private and useful it is), Croissant metadata for catalogues,
checksums, and on request the generator that drew it.

    exports/<name>/
        images/<label>/<image_id>.png   8-bit grayscale X-rays or RGB tiles, each marked synthetic in a text chunk
        metadata.csv                    file_name (into images/), image_id, label, the label's parts, draw
        datasheet.md, datasheet.json    datasheet.py
        croissant.json                  croissant.py
        generator/                      with_generator: the chosen epochs' sampling generators in bf16 and card.json,
                                        as `biomedsynth generate --generator` reads them (generate.py)
        SHA256SUMS                      every other file: `sha256sum -c SHA256SUMS` checks them

The folder is a Hugging Face `imagefolder` (metadata.csv's file_name points into images/) and images/ a torchvision
`ImageFolder` (one folder per label). Nothing in it comes from a patient's record: image ids are the synthetic
set's own, the columns are the label's parts, the source data appears as counts.

What leaves passes the privacy gate (gate.py): a set the memorisation test (evidence.py) flags as copying training
images is refused unless the caller allows it (the datasheet then records the override), and the images synthesize
marked as near copies of training images are left out, counted in the datasheet. The verdict is read from
synthesize's metrics only when they are the bytes dvc.lock records for its stage, so a hand-edited verdict is
refused. Everything is written beside the output folder and renamed into place, so an interrupted export leaves
the previous one whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from biomedsynth import croissant, datasheet, gate
from biomedsynth.provenance import code_version
from biomedsynth.store import (NEAR_COPY, ImageSet, atomic_write_text, load_weights, replace_tree, save_torch,
                               write_json)

CHECKSUMS = "SHA256SUMS"
IMAGES = "images"
METADATA = "metadata.csv"
GENERATOR = "generator"
CARD = "card.json"
NOT_EXPORTED = "not_exported.json"
MARK = "synthetic"  # the PNG tEXt keyword
SAFE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
XRAY_LABEL = re.compile(r"(?P<sex>[FM])_(?P<age_bin>\d+-\d+)")
LABEL_COLUMNS = {"xray": {"sex": "F or M", "age_bin": "the age bin, low-high years"},
                 "histology": {"tumor": "1 for a tumour tile, 0 for a normal one"}}


def label_columns(label: str, modality: str) -> dict:
    """metadata.csv's columns for a label's parts: X-ray sex and age bin (F_18-38), histology tumor 1/0."""
    if modality == "xray":
        if (m := XRAY_LABEL.fullmatch(label)) is None:
            raise ValueError(f"X-ray label {label!r} is not <sex>_<age bin>, e.g. F_18-38")
        return {"sex": m["sex"], "age_bin": m["age_bin"]}
    if label not in ("normal", "tumor"):
        raise ValueError(f"histology label {label!r} is not normal or tumor")
    return {"tumor": int(label == "tumor")}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under root but its own SHA256SUMS, as sorted relative POSIX paths."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file()
                  and p.relative_to(root).as_posix() != CHECKSUMS)


def write_checksums(root: Path) -> dict[str, str]:
    """SHA256SUMS over every other file under root, in `sha256sum`'s format; returns path -> hex."""
    sums = {rel: sha256(Path(root) / rel) for rel in _files(root)}
    atomic_write_text(Path(root) / CHECKSUMS, "".join(f"{h}  {rel}\n" for rel, h in sums.items()))
    return sums


def verify_checksums(root: Path) -> list[str]:
    """What disagrees with root/SHA256SUMS: changed or missing files and files it does not list; [] if none."""
    path = Path(root) / CHECKSUMS
    if not path.is_file():
        return [f"{CHECKSUMS} missing"]
    listed = dict(reversed(line.split("  ", 1)) for line in path.read_text().splitlines() if line)
    bad = [f"{rel}: missing" for rel in listed if not (Path(root) / rel).is_file()]
    bad += [f"{rel}: changed" for rel, h in listed.items()
            if (Path(root) / rel).is_file() and sha256(Path(root) / rel) != h]
    return bad + [f"{rel}: not listed" for rel in _files(root) if rel not in listed]


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A new folder beside `out` to write into; on success it replaces `out`, on failure it goes and `out` stays as
    it was. `out` must be absent, empty, or an earlier output of this module (it holds SHA256SUMS or not_exported.json):
    never a folder of the user's other files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not any(
            (out / f).is_file() for f in (CHECKSUMS, NOT_EXPORTED)))):
        raise ValueError(f"{out} holds files that are not an export; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))  # a leftover the next run removes
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's is owner-only; an export is meant to be shared
        yield tmp
        replace_tree(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class PngWriter:
    """Images into <root>/images/<label>/<image_id>.png, each marked synthetic by a tEXt chunk (JSON: synthetic,
    set, generator, code: what made it, e.g. provenance.code_version()); write_metadata() writes metadata.csv, one
    row per image in the order added. A context manager: PNGs are encoded by a pool of threads (Pillow's encoder
    releases the GIL: 2-3x on 2 cores), all finished when the block ends."""

    def __init__(self, root: Path, set_name: str, modality: str, code: str, workers: int | None = None):
        self.root, self.set_name, self.modality, self.code = Path(root), set_name, modality, code
        self.rows: list[dict] = []
        self._ids: set[str] = set()
        self._pool = ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1))
        self._pending: deque[Future] = deque()

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for f in self._pending:
                f.cancel()
        self._pool.shutdown(wait=True)  # no thread writes into the folder once the block is left
        if exc_type is None:
            self._wait(0)

    def _wait(self, left: int) -> None:
        while len(self._pending) > left:
            self._pending.popleft().result()  # a failed write raises here

    @staticmethod
    def _save(image: np.ndarray, path: Path, mark: str) -> None:
        info = PngImagePlugin.PngInfo()
        info.add_text(MARK, mark)
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path, pnginfo=info)

    def add(self, image: np.ndarray, image_id: str, label: str, generator: str, **columns) -> None:
        for what, value in (("label", label), ("image id", image_id)):
            if not SAFE_NAME.fullmatch(value):
                raise ValueError(f"{what} {value!r} cannot name a file (letters, digits, _ . + - only)")
        if image_id in self._ids:
            raise ValueError(f"image id {image_id!r} twice in {self.root}")
        image = np.array(image)  # a copy: the caller may reuse its buffer while the pool writes
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"image {image_id} must be uint8 (H, W, 1 or 3), got {image.dtype} {image.shape}")
        mark = json.dumps({"synthetic": True, "set": self.set_name, "generator": generator, "code": self.code},
                          sort_keys=True)
        rel = f"{IMAGES}/{label}/{image_id}.png"
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        self._pending.append(self._pool.submit(self._save, image, self.root / rel, mark))
        self._wait(64)  # bounded: a few batches of images in memory at most
        self._ids.add(image_id)
        self.rows.append({"file_name": rel, "image_id": image_id, "label": label,
                          **label_columns(label, self.modality), **columns})

    def write_metadata(self) -> None:
        self._wait(0)
        pd.DataFrame(self.rows).to_csv(self.root / METADATA, index=False)


# ---- the generator, shareable ----

def _bf16(obj):
    """A snapshot with every floating-point tensor in bfloat16 (half the bytes; ints and the rest as they are)."""
    import torch

    if isinstance(obj, dict):
        return {k: _bf16(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_bf16(v) for v in obj)
    return obj.to(torch.bfloat16) if torch.is_tensor(obj) and obj.is_floating_point() else obj


def write_generator(model_root: Path, epochs: dict[str, int], out: Path, card: dict) -> dict:
    """The sampling generator of each model's chosen epoch in bf16, laid out as gan.checkpoint's Synthesizer reads a
    stage (options.json, <model>/log.jsonl holding the chosen epoch's row, <model>/epochs/NNN.pt), with card.json
    and SHA256SUMS; returns the card with the parameter count."""
    from biomedsynth.gan.checkpoint import epoch_file, read_log

    out.mkdir(parents=True)
    shutil.copyfile(model_root / "options.json", out / "options.json")
    parameters = set()
    for model, epoch in epochs.items():
        snap = _bf16(load_weights(epoch_file(model_root / model, epoch)))
        save_torch(snap, epoch_file(out / model, epoch))
        row = next(r for r in read_log(model_root / model) if r["epoch"] == epoch)
        atomic_write_text(out / model / "log.jsonl", json.dumps(row) + "\n")
        parameters.add(sum(v.numel() for k, v in snap["state_dict"].items() if v.is_floating_point()))
    card = {**card, "parameters": max(parameters)}
    write_json(out / CARD, card)
    write_checksums(out)
    return card


# ---- the export ----

@dataclass(frozen=True)
class RunFiles:
    """Where one synthetic set's run outputs are (the pipeline's layout by default, see `of`)."""
    synthetic: Path
    model_root: Path
    synthesize_metrics: Path
    gan_metrics: Path
    studygroups_metrics: Path
    summary: Path
    dvc_lock: Path
    metrics: Path  # the run's metrics folder, whose warnings (report.run_warnings) the datasheet repeats

    @classmethod
    def of(cls, name: str, root: Path = Path(".")) -> RunFiles:
        return cls(root / "data/synthetic" / name, root / "models/gan" / name,
                   root / "metrics/synthesize" / f"{name}.json", root / "metrics/gan" / f"{name}.json",
                   root / "metrics/studygroups.json",
                   root / "metrics/summary.json", root / "dvc.lock", root / "metrics")


def _bytes(path: Path) -> bytes:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing; run the stage that writes it (dvc repro)")
    return Path(path).read_bytes()


def _json(path: Path) -> dict:
    return json.loads(_bytes(path))


def recorded_metrics(name: str, run: RunFiles, lock: dict | None) -> dict:
    """synthesize's metrics of set `name`, the export gate's evidence, read only when their bytes are those its
    stage recorded in dvc.lock (DVC's md5): a hand edit (`copying: false`) or a run outside DVC cannot pass the gate.
    ValueError, one line, otherwise."""
    path, stage = run.synthesize_metrics, f"synthesize@{name}"
    outs = ((lock or {}).get("stages") or {}).get(stage, {}).get("outs", [])
    where = os.path.abspath(path)
    recorded = next((o.get("md5") for o in outs if os.path.abspath(run.dvc_lock.parent / o["path"]) == where), None)
    if recorded is None:
        raise ValueError(f"{path}: {run.dvc_lock} records no {stage} run that wrote it, so its memorisation verdict "
                         f"cannot be checked; run `dvc repro {stage}`")
    data = _bytes(path)
    if hashlib.md5(data).hexdigest() != recorded:
        raise ValueError(f"{path} is not the file {stage} wrote (its md5 differs from dvc.lock's {recorded}), so its "
                         f"memorisation verdict cannot be trusted; run `dvc repro {stage}` to measure it again")
    return json.loads(data)


def generator_names(arch: str, setup: str, epochs: dict[str, int], labels: list[str]) -> dict[str, str]:
    """Per label, the model and epoch that draw it, as the PNGs' text chunk names it."""
    from biomedsynth.gan.checkpoint import COND_MODEL

    model = lambda label: COND_MODEL if setup == "cond" else label  # noqa: E731
    return {label: f"{arch} {setup}, model {model(label)}, epoch {epochs[model(label)]}" for label in labels}


def unlearnt(name: str, synth: dict) -> str | None:
    """Why set `name` is not worth sharing when a GAN behind it learnt nothing (its synthesize metrics say so), with
    the override; None when every GAN learnt."""
    if synth.get("gan_learnt", True):
        return None
    return (f"{name}: a GAN behind it learnt nothing (metrics/gan/{name}.json): its images are not realistic; "
            "list it in export.allow_unlearnt (or pass --allow-unlearnt) to export it anyway")


def why_not_exported(name: str, export, listed: list[str], synth: dict) -> str | None:
    """The export stage's rule for set `name`: None to export it, else why it gets a note instead: params do not
    list it; the memorisation test flags it as copying (unless export.allow_flagged names it); a GAN behind it
    learnt nothing (unless export.allow_unlearnt names it). `synth` is the set's synthesize metrics ({} when it is
    not listed)."""
    if name not in listed:
        asked = f"is {export.sets} ({', '.join(listed)})" if isinstance(export.sets, str) else \
            f"lists {', '.join(listed)}"
        return f"not exported: export.sets {asked}"
    if (refusal := gate.refusal(gate.verdict(synth))) and name not in export.allow_flagged:
        return f"not exported: {refusal}; list it in export.allow_flagged to export it anyway"
    if name not in export.allow_unlearnt and (why := unlearnt(name, synth)):
        return f"not exported: {why.split(': ', 1)[1]}"
    return None


def export_set(name: str, run: RunFiles, out: Path, *, modality: str, group: str, license: str, version: str,
               intended_use: str, allow_flagged: bool = False, allow_unlearnt: bool = False,
               with_generator: bool = False) -> dict:
    """Write the export of synthetic set `name` (an arch-group-setup stage) at `out`, less the images marked as near
    copies; return a short summary. ValueError, before anything is written, when the set is flagged
    as copying and not allowed, has no near-copy marks, or its memorisation evidence is not what its stage recorded
    in dvc.lock."""
    lock = yaml.safe_load(run.dvc_lock.read_text()) if run.dvc_lock.is_file() else None
    synth = recorded_metrics(name, run, lock)
    if (why := unlearnt(name, synth)) and not allow_unlearnt:
        raise ValueError(why)
    passed = gate.admit(name, gate.verdict(synth), allow_flagged=allow_flagged,
                        action="export it" + (" with its generator" if with_generator else ""))
    images = ImageSet(run.synthetic)
    if NEAR_COPY not in images.meta:
        raise ValueError(f"{run.synthetic} has no {NEAR_COPY} column (drawn before the near-copy screen); "
                         f"run synthesize@{name} again (dvc repro)")
    shipped = np.flatnonzero(images.meta[NEAR_COPY].to_numpy(int) == 0)
    if not len(shipped):
        raise ValueError(f"{name}: every one of its {len(images)} images is a near copy of a training image")
    options = _json(run.model_root / "options.json")
    from biomedsynth.gan.checkpoint import read_log  # here: torch comes with it, and the stage's notes need none of it
    from biomedsynth.report import run_warnings

    epochs = synth["checkpoint_epochs"]
    logs = {model: next(r for r in read_log(run.model_root / model) if r["epoch"] == e) for model, e in epochs.items()}
    studygroups, summary, gan = _json(run.studygroups_metrics), _json(run.summary), _json(run.gan_metrics)
    meta = images.meta.assign(draw=images.meta["draw"] if "draw" in images.meta else 0).iloc[shipped]
    labels = sorted(meta["label"].unique())
    generators = generator_names(options["arch"], options["setup"], epochs, labels)
    code = code_version()  # not the commit: a rerun of the same code writes the same export
    with staged(out) as tmp:
        with PngWriter(tmp, name, modality, code) as writer:
            rows = zip(meta["image_id"], meta["label"], meta["draw"])
            for image, (image_id, label, draw) in tqdm(zip((im for b in images.batches(shipped) for im in b), rows),
                                                       total=len(shipped), desc=f"export {name}", unit="img"):
                writer.add(image, image_id, label, generators[label], draw=int(draw))
            writer.write_metadata()
        card = None
        if with_generator:
            card = write_generator(run.model_root, epochs, tmp / GENERATOR, {
                "set": name, "modality": modality, "arch": options["arch"], "setup": options["setup"],
                "labels": options["labels"], "resolution": options["resolution"], "channels": options["channels"],
                "epochs": epochs, "code": code, "license": license, "dtype": "bfloat16",
                "summary": f"the sampling generator{'s' if len(epochs) > 1 else ''} of {name} at the chosen epoch(s)",
                "usage": f"biomedsynth generate --generator {GENERATOR} -n 100 --out more --seed 0",
                "hash_screen": (f"not applied by generate --generator (it needs the training images' hashes, which "
                                f"stay with the pipeline); synthesize rejected {synth['rejection_rate']:.1%} of drawn "
                                f"images" if synth["hash_screen"] else "none (synthesize did not screen this set)"),
                "near_copy_screen": (f"not applied by generate --generator (it needs the training images, which stay "
                                     f"with the pipeline); {synth['evidence']['screen']['near_copies']} of the set's "
                                     f"{len(images):,} images were near copies, left out of this export"),
                "gate": passed,
                "caution": "a generator can reveal more of its training images than a sample of its outputs; "
                           "share it only where the synthetic images may go"})
        sheet = datasheet.build(
            name, modality=modality, group=group, images=len(shipped), draws=int(meta["draw"].nunique()),
            side=images.shape[0], channels=images.shape[2],
            label_counts={str(k): int(v) for k, v in meta["label"].value_counts().sort_index().items()},
            label_columns=LABEL_COLUMNS[modality], example_file=writer.rows[0]["file_name"], options=options,
            logs=logs, synth=synth, gan=gan,
            studygroups=studygroups, summary=summary, dvc_lock=lock, license=license, version=version,
            intended_use=intended_use, gate=passed, screened=len(images), code=code, generator=card,
            run_warnings=run_warnings(summary, run.metrics, [name]))
        if missing := datasheet.unfilled(sheet):
            raise ValueError(f"{name}: the datasheet has no value for {', '.join(missing)}")
        write_json(tmp / "datasheet.json", sheet)
        atomic_write_text(tmp / "datasheet.md", datasheet.markdown(sheet))
        sums = {rel: sha256(tmp / rel) for rel in _files(tmp)}
        write_json(tmp / "croissant.json", croissant.metadata(sheet, tmp, sums))
        write_checksums(tmp)
    return {"images": len(shipped), "near_copies_dropped": len(images) - len(shipped),
            "labels": sheet["what"]["labels"],
            "memorisation": sheet["memorisation"]["verdict"], "exported_despite_verdict": passed["overridden"],
            "generator": with_generator, "out": str(out)}


def write_not_exported(out: Path, reason: str) -> None:
    """The export stage's output for a set params do not list: a note saying why."""
    with staged(out) as tmp:
        write_json(tmp / NOT_EXPORTED, {"exported": False, "reason": reason})
