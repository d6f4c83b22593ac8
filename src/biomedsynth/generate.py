"""The generate command: more images from a generator, in the export layout (export.py: images/<label>/<id>.png
marked synthetic, metadata.csv, SHA256SUMS) with generation.json saying how they were drawn.

Both sources pass the privacy gate (gate.admit): a generator whose set the memorisation test flags draws nothing
unless overridden, and generation.json records the gate. A trained set of the pipeline (models/gan/<name>): the
epochs synthesize drew from (its metrics' checkpoint_epochs), every image drawn checked against the training images
and dropped (and redrawn) when it is a near copy (synthesize.NearCopyScreen) and, where synthesize screened the set,
the same image-hash screen (synthesize.HashScreen, its threshold, the training images' hashes). A shared generator
(export --with-generator's generator/ folder): its checksums are verified and its weights read as tensors only
before anything is loaded; the gate's record travels in its card.json; it has no training images, so neither screen.

Label k's latents come from numpy's generator seeded (seed, k), so a seed and a label give the same images
whatever else is drawn; on the CPU, bit for bit. On a GPU sampling runs in batches under bf16 autocast.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biomedsynth import gate
from biomedsynth.evidence import feature_net_space
from biomedsynth.export import CARD, PngWriter, generator_names, staged, verify_checksums, write_checksums
from biomedsynth.gan.checkpoint import Synthesizer
from biomedsynth.provenance import code_version, git_commit
from biomedsynth.store import ImageSet, write_json
from biomedsynth.synthesize import HashScreen, NearCopyScreen, draw_label, evidence_spaces

ACTION = "generate from it"


class ExitScreen:
    """What generate drops and redraws: images the hash screen rejects (where synthesize screened the set), then near
    copies of training images, counted in `near_copies`."""

    def __init__(self, near: NearCopyScreen, hash_screen: HashScreen | None):
        self.near, self.hash_screen, self.near_copies = near, hash_screen, 0

    def passes(self, batch: np.ndarray) -> np.ndarray:
        ok = self.hash_screen.passes(batch) if self.hash_screen else np.ones(len(batch), bool)
        copies = ok & self.near.near_copies(batch)
        self.near_copies += int(copies.sum())
        return ok & ~copies

    def shortfall(self) -> str:
        return (f"{self.near_copies} near copies of training images dropped so far"
                + (f"; {self.hash_screen.shortfall()}" if self.hash_screen else ""))


@dataclass
class Source:
    """A loaded generator and what generation needs to know about it."""
    synthesizer: Synthesizer
    name: str                     # the synthetic set it drew
    modality: str
    screen: ExitScreen | None
    screen_note: str
    near_copy_note: str
    gate: dict                    # the privacy gate's record (gate.admit)
    max_tries_factor: float = 1.0  # draws allowed per image kept when screened (synthesize.max_tries_factor)


def from_pipeline(name: str, modality: str, model_root: Path, synthesize_metrics: Path, train_set: Path,
                  feature_net: Path, *, max_tries_factor: float, evidence_side: int, pca_dims: int,
                  evidence_images: int, seed: int, allow_flagged: bool = False, batch_size: int = 256) -> Source:
    """The generator synthesize drew set `name` from, past the privacy gate, with its screens: near copies in the
    evidence spaces (params synthesize.evidence and seed, as synthesize built them) and its hash screen."""
    if not synthesize_metrics.is_file():
        raise FileNotFoundError(f"{synthesize_metrics} is missing; run synthesize@{name} first (dvc repro)")
    synth = json.loads(synthesize_metrics.read_text())
    passed = gate.admit(name, gate.verdict(synth), allow_flagged=allow_flagged, action=ACTION)
    epochs = synth["checkpoint_epochs"]
    # one epoch for all models passes as that epoch; per-model epochs came from a per-model rule (best, last)
    choice = next(iter(epochs.values())) if len(set(epochs.values())) == 1 else synth["checkpoint_rule"]["rule"]
    gen = Synthesizer(model_root, choice)
    if gen.epochs != epochs:
        raise ValueError(f"{model_root} now gives epochs {gen.epochs}, synthesize drew from {epochs}; "
                         f"run synthesize@{name} again (dvc repro)")
    train = ImageSet(train_set)
    spaces = evidence_spaces(train, feature_net_space(feature_net, gen.device), resolution=gen.opt.resolution,
                             side=evidence_side, pca_dims=pca_dims, fit_images=evidence_images,
                             hash_size=synth["hash_size"], seed=seed, batch_size=batch_size)
    near = NearCopyScreen.of(train, spaces, gen.opt.resolution, batch_size)
    near_note = f"applied: near copies of training images in the {', '.join(spaces)} spaces dropped and redrawn"
    if not synth["hash_screen"]:
        return Source(gen, name, modality, ExitScreen(near, None), "not applied (synthesize did not screen this set)",
                      near_note, passed, max_tries_factor)
    hashes = HashScreen(near.train_features["hash"], synth["hash_threshold"], synth["hash_size"])
    return Source(gen, name, modality, ExitScreen(near, hashes), f"applied as synthesize did: "
                  f"{synth['hash_threshold']} bits ({synth['hash_threshold_source']}), hash size {synth['hash_size']}",
                  near_note, passed, max_tries_factor)


def from_shared(folder: Path, allow_flagged: bool = False) -> Source:
    """A generator folder written by export --with-generator, checked before it is loaded, past the privacy gate on
    the verdict its card carries."""
    folder = Path(folder)
    if not (folder / CARD).is_file():
        raise FileNotFoundError(f"{folder} is not a shared generator (no {CARD}); export --with-generator writes one")
    if bad := verify_checksums(folder):
        raise ValueError(f"{folder}: files differ from its SHA256SUMS ({'; '.join(bad[:3])}); refusing to load them")
    card = json.loads((folder / CARD).read_text())
    if "gate" not in card:
        raise ValueError(f"{folder / CARD} records no privacy gate (shipped before it); export the generator again")
    passed = gate.admit(card["set"], card["gate"], allow_flagged=allow_flagged, action=ACTION)
    gen = Synthesizer(folder, "last")  # loads weights only: a pickle that would run code is refused, not run
    if gen.epochs != card["epochs"]:
        raise ValueError(f"{folder}: holds epochs {gen.epochs}, its card says {card['epochs']}")
    return Source(gen, card["set"], card["modality"], None,
                  "not applied: a shared generator has no training images to screen against",
                  "not applied: a shared generator has no training images to screen against", passed)


def label_counts(labels: list[str], n: int, label: str | None) -> dict[str, int]:
    """n images of `label`, or n spread evenly over all labels (the first ones take the remainder)."""
    if label is not None:
        if label not in labels:
            raise ValueError(f"label {label!r} was not trained (the generator knows {', '.join(labels)})")
        return {label: n}
    base, extra = divmod(n, len(labels))
    return {lb: base + (k < extra) for k, lb in enumerate(labels) if base + (k < extra)}


def generate(source: Source, out: Path, n: int, label: str | None = None, seed: int = 0,
             batch_size: int = 256) -> dict:
    """Draw n images (of `label`, or spread over the labels) into `out` in the export layout; return a summary
    with the images per second of drawing and writing."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    gen = source.synthesizer
    labels = list(gen.opt.labels)
    counts = label_counts(labels, n, label)
    cuda = gen.device.type == "cuda"

    def sample(lb: str, k: int, rng: np.random.Generator) -> np.ndarray:
        with torch.autocast(gen.device.type, dtype=torch.bfloat16, enabled=cuda):
            return gen.sample(lb, k, rng)

    commit = git_commit()
    names = generator_names(gen.opt.arch, gen.opt.setup, gen.epochs, labels)
    shape = (gen.opt.resolution, gen.opt.resolution, gen.opt.channels)
    tally = {lb: {"images": c, "drawn": 0, "rejected": 0, "near_copies": 0} for lb, c in counts.items()}
    t0 = time.perf_counter()
    with (staged(out) as tmp, PngWriter(tmp, source.name, source.modality, code_version()) as writer,
          tqdm(total=n, desc=f"generate {source.name}", unit="img") as bar):
        for lb, count in counts.items():
            rng = np.random.default_rng([seed, labels.index(lb)])
            written, before = 0, source.screen.near_copies if source.screen else 0
            for batch in draw_label(sample, lb, count, rng, shape=shape, screen=source.screen,
                                    max_tries_factor=source.max_tries_factor, batch_size=batch_size, tally=tally[lb]):
                for image in batch:
                    writer.add(image, f"gen-{seed}-{lb}-{written:06d}", lb, names[lb], seed=seed)
                    written += 1
                bar.update(len(batch))
            if source.screen:
                tally[lb]["near_copies"] = source.screen.near_copies - before
        writer.write_metadata()
        write_json(tmp / "generation.json", {
            "set": source.name, "modality": source.modality, "arch": gen.opt.arch, "setup": gen.opt.setup,
            "epochs": gen.epochs, "seed": seed, "per_label": tally, "hash_screen": source.screen_note,
            "near_copy_screen": source.near_copy_note, "gate": source.gate, "commit": commit, "synthetic": True})
        write_checksums(tmp)
    seconds = time.perf_counter() - t0
    return {"images": n, "per_label": tally, "device": str(gen.device), "seconds": round(seconds, 2),
            "images_per_s": round(n / seconds, 1), "hash_screen": source.screen_note,
            "near_copies_dropped": sum(t["near_copies"] for t in tally.values()),
            "overridden": source.gate["overridden"],
            "out": str(out)}
