"""Which data a result came from, written into every result file, so a stale result (made from the phantom
sample or another dataset) can never pass for the user's.

The data is named by the hash DVC records for data/raw in data.dvc (what `dvc repro` and `dvc pull` agree
on) and by the `sources` params that say how it is read. The code a result came from is what DVC records in
dvc.lock: each stage's code files are its deps. It is not stamped into every output: a commit there made a
rerun at a new commit change every output, so a results-only commit rewrote hundreds of dvc.lock lines. The git
commit is recorded once per run instead, in metrics/summary.json's provenance (table3.py) and as the
mlflow.source.git.commit tag of each MLflow run (tracking.py); an export names the code by the package
version (code_version).
"""
from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import yaml


def git_commit() -> str:
    """HEAD of the repository in the working directory, or "unknown"."""
    # asked in cwd, not in the project root: a queued experiment's copy has HEAD at the commit it was
    # queued from, while the user's repo may have moved on since
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def code_version() -> str:
    """The installed package and its version, e.g. "biomedsynth 0.1.0": the code an export names."""
    return f"biomedsynth {version('biomedsynth')}"


def data_hash(dvc_file: Path = Path("data.dvc")) -> str | None:
    """The md5 DVC recorded for the raw data (data.dvc's first output), or None where there is no data.dvc."""
    try:
        outs = yaml.safe_load(Path(dvc_file).read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


def fingerprint(sources: dict, dvc_file: Path = Path("data.dvc")) -> dict:
    """{"data": data.dvc's hash, "sources": how the data is read}: the same on every rerun of the same data."""
    return {"data": data_hash(dvc_file), "sources": sources}


def same_data(prints: dict[str, dict]) -> list[str]:
    """The names whose data (hash and sources) differ from the first one's: results that must not be compared."""
    if not prints:
        return []
    first = next(iter(prints.values()))
    return [name for name, p in prints.items() if (p["data"], p["sources"]) != (first["data"], first["sources"])]


def stamp(metrics_path: Path, sources: dict) -> None:
    """Add the fingerprint to a stage's metrics JSON under `provenance`, so each result file names its data."""
    from biomedsynth.store import write_json

    path = Path(metrics_path)
    write_json(path, {**json.loads(path.read_text()), "provenance": fingerprint(sources)})
