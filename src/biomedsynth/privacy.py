"""The privacy check: nothing that identifies a patient leaves with what a user commits, logs or tracks.

What it looks for, read from the ingested real data (data/interim/<modality>: meta.csv and the images):
- identifiers: every patient or slide id, image id, source path and file name of at least MIN_ID characters
  (shorter ones, such as NIH's numeric patient ids, cannot be told from other text: counted as not scanned);
- real images: the pixels of every ingested image (ingest.pixel_digest), against every image found.
Binary files that are not images (weights, databases) are not read for ids: nothing writes an id into them as text.

Where: the files `git add -A` would commit (tracked, or untracked and not ignored; the project's own code
folders and docs aside), any extra file given (the pull-request review page, a captured log), and the MLflow store's
params, tags and artifact files. Any image file or embedded image (a data URI) counts, real or not: git-tracked
outputs hold aggregates only. A finding names the file and what kind of identifier it holds, never the value.
"""
from __future__ import annotations

import base64
import io
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from biomedsynth.ingest import pixel_digest
from biomedsynth.store import ImageSet

MIN_ID = 6
ID_COLUMNS = {"patient_id": "patient or slide id", "image_id": "image id", "source": "source path"}
# the project's own code and docs, not its outputs (the README names example file names such as tumor_001)
PROJECT = ("src/", "tests/", "benchmarks/", ".github/", ".ci/", ".dvc/plots/", "docs/", "README.md")
MAGIC = ((0, b"\x89PNG\r\n\x1a\n"), (0, b"\xff\xd8\xff"), (0, b"II*\x00"), (0, b"MM\x00*"), (0, b"GIF8"),
         (128, b"DICM"))
DATA_URI = re.compile(rb"data:image/[a-z+]+;base64,([A-Za-z0-9+/=]{16,})")


@dataclass
class RealData:
    """What identifies the real data: {identifier: its kind}, how many were too short to scan, image digests."""
    identifiers: dict[str, str] = field(default_factory=dict)
    short: set[str] = field(default_factory=set)  # distinct values too short to scan (an id repeats over rows)
    digests: set[bytes] = field(default_factory=set)

    @property
    def too_short(self) -> int:
        return len(self.short)

    def __post_init__(self):
        self._by_prefix: dict[str, list[str]] | None = None

    def add_identifier(self, value: str, kind: str) -> None:
        value = value.strip()
        if not value:
            return
        if len(value) < MIN_ID:
            self.short.add(value)
        else:
            self.identifiers.setdefault(value, kind)
            self._by_prefix = None

    def kinds_in(self, text: str) -> set[str]:
        """The kinds of identifier found anywhere in `text` (a window over its first MIN_ID characters each)."""
        if self._by_prefix is None:
            self._by_prefix = {}
            for value in self.identifiers:
                self._by_prefix.setdefault(value[:MIN_ID], []).append(value)
        found, prefixes = set(), self._by_prefix
        for i in range(len(text) - MIN_ID + 1):
            if (candidates := prefixes.get(text[i:i + MIN_ID])) is not None:
                found.update(self.identifiers[v] for v in candidates if text.startswith(v, i))
        return found


def real_data(interim: Path) -> RealData:
    """The identifiers and image digests of every ingested set under `interim` (data/interim)."""
    real = RealData()
    sets = sorted(p.parent for p in Path(interim).glob("*/meta.csv"))
    if not sets:
        raise FileNotFoundError(f"no ingested data under {interim} (meta.csv): run the ingest stages first")
    for folder in sets:
        meta = pd.read_csv(folder / "meta.csv", dtype=str, keep_default_na=False)
        for column, kind in ID_COLUMNS.items():
            for value in meta.get(column, []):
                real.add_identifier(value, kind)
                if column == "source":
                    real.add_identifier(Path(value).name, "file name")
                    real.add_identifier(Path(value).stem, "file name")
        images = ImageSet(folder)
        for batch in images.batches():
            real.digests.update(d for image in batch if (d := pixel_digest(np.squeeze(image))) is not None)
    return real


def _image_kind(data: bytes, real: RealData) -> str:
    """'a real image' when the decoded pixels are an ingested image's, else 'an image'."""
    from PIL import Image

    try:
        pixels = np.squeeze(np.asarray(Image.open(io.BytesIO(data))))
    except Exception:
        return "an image"
    return "a real image" if pixel_digest(pixels) in real.digests else "an image"


def scan_bytes(data: bytes, real: RealData) -> list[str]:
    """What one file's bytes hold: identifier kinds, an image file, embedded images."""
    if any(data[at:at + len(magic)] == magic for at, magic in MAGIC):
        return [_image_kind(data, real)]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # weights, a database: no id is written as text there (and a byte-by-byte
        return []               # scan of a 0.5 GB VGG16 checkpoint takes minutes)
    found = [f"{kind}s" for kind in sorted(real.kinds_in(text))]
    found += [f"{_image_kind(base64.b64decode(m.group(1)), real)} (embedded)" for m in DATA_URI.finditer(data)]
    return found


def committable_files(repo: Path) -> list[Path]:
    """The files `git add -A` would commit in `repo`, the project's code folders aside."""
    run = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True)
    names = [n for n in run.stdout.decode().split("\0") if n and not n.startswith(PROJECT)]
    return [Path(repo) / n for n in names if (Path(repo) / n).is_file()]


def mlflow_texts(uri: str) -> dict[str, str]:
    """{'mlflow run <id> params'/'tags': their keys and values as text} for every run of every experiment."""
    from mlflow import MlflowClient

    client, texts = MlflowClient(uri), {}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=50000):
            texts[f"mlflow run {run.info.run_id} params"] = "\n".join(f"{k}={v}" for k, v in run.data.params.items())
            texts[f"mlflow run {run.info.run_id} tags"] = "\n".join(f"{k}={v}" for k, v in run.data.tags.items())
    return texts


def check(repo: Path, real: RealData, extra: list[Path] = (), mlflow_uri: str | None = None,
          mlflow_artifacts: Path | None = None) -> tuple[list[str], int]:
    """(findings as 'where: what', places scanned) over committable files, `extra` files and the MLflow store."""
    findings, scanned = [], 0
    files = committable_files(repo) + [Path(p) for p in extra]
    if mlflow_artifacts is not None and Path(mlflow_artifacts).is_dir():
        files += sorted(p for p in Path(mlflow_artifacts).rglob("*") if p.is_file())
    for path in files:
        scanned += 1
        if found := scan_bytes(path.read_bytes(), real):
            shown = path.relative_to(repo) if path.is_relative_to(repo) else path
            findings.append(f"{shown}: {', '.join(found)}")
    if mlflow_uri is not None:
        for where, text in mlflow_texts(mlflow_uri).items():
            scanned += 1
            if kinds := real.kinds_in(text):
                findings.append(f"{where}: {', '.join(f'{k}s' for k in sorted(kinds))}")
    return findings, scanned
