"""Every result file names the data it came from, and no commit: a rerun of the same code on the same data at
another commit writes the same bytes, so DVC's hashes (and dvc.lock) do not change."""
import json

from biomedsynth.provenance import fingerprint, same_data, stamp
from test_tracking import _git_repo

SOURCES = {"xray": {"format": "nih", "root": "data/raw/xray"}}


def test_a_stamp_names_the_data_and_no_commit(tmp_path, monkeypatch):
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: raw\n")
    monkeypatch.chdir(tmp_path)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"written": 3}))
    stamp(metrics, SOURCES)
    first = metrics.read_bytes()
    assert json.loads(first) == {"written": 3, "provenance": {"data": "abc.dir", "sources": SOURCES}}
    # at a commit: still no commit, the same bytes
    _git_repo(tmp_path / "repo")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "repo" / ".git"))
    metrics.write_text(json.dumps({"written": 3}))
    stamp(metrics, SOURCES)
    assert metrics.read_bytes() == first


def test_same_data_names_the_results_of_other_data(tmp_path):
    dvc = tmp_path / "data.dvc"
    dvc.write_text("outs:\n- md5: abc.dir\n  path: raw\n")
    ours = fingerprint(SOURCES, dvc)
    assert set(ours) == {"data", "sources"}
    other_root = {"xray": {**SOURCES["xray"], "root": "/elsewhere"}}
    prints = {"a": ours, "b": dict(ours), "c": {**ours, "data": "phantom.dir"}, "d": fingerprint(other_root, dvc)}
    assert same_data(prints) == ["c", "d"]
    assert fingerprint(SOURCES, tmp_path / "none.dvc")["data"] is None  # no data.dvc: no hash
