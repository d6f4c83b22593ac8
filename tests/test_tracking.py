import errno
import os
import shutil
import subprocess
import sys

import pytest

from biomedsynth import tracking

PARAMS = {"seed": 7, "gan": {"arch": "dcgan", "dcgan": {"lr": 0.0002, "betas": [0.5, 0.999]}}}


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty MLflow sqlite DB, made once: MLflow's schema migrations take seconds."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("migrated") / "t.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def root(tmp_path, monkeypatch):
    """Tracking to sqlite in tmp_path (no DB file yet), which is also the DVC root; no memory of
    failed URIs."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/t.db")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    for var in ("DVC_EXP_NAME", "BIOMEDSYNTH_MLFLOW"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking, "_down", set())
    return tmp_path


@pytest.fixture
def db(root, migrated_db):
    """The tracking DB, already migrated."""
    return shutil.copy(migrated_db, root / "t.db")


def _git_repo(path):
    path.mkdir()
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


def test_run_logs_params_metrics_artifacts_and_tags(root, db, monkeypatch):
    from mlflow import MlflowClient

    commit = _git_repo(root / "repo")
    monkeypatch.chdir(root / "repo")
    monkeypatch.setenv("DVC_EXP_NAME", "tawny-kite")
    (root / "samples").mkdir()
    (root / "samples" / "grid.txt").write_text("grid")
    (root / "ckpt.txt").write_text("weights")
    with tracking.run("train_gan@dcgan-x_norm-cond", PARAMS) as r:
        for step in range(3):
            r.log_metrics({"loss_d": 1.0 / (step + 1), "kid": step * 0.5}, step=step)
        r.log_artifact(root / "ckpt.txt")
        r.log_artifacts(root / "samples", artifact_path="samples")
    assert r.active

    client = MlflowClient(f"sqlite:///{db}")
    got = client.get_run(r.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "train_gan@dcgan-x_norm-cond"
    assert got.data.params == {"seed": "7", "gan.arch": "dcgan", "gan.dcgan.lr": "0.0002",
                               "gan.dcgan.betas": "[0.5, 0.999]"}
    history = client.get_metric_history(r.run_id, "loss_d")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert [m.value for m in client.get_metric_history(r.run_id, "kid")] == [0.0, 0.5, 1.0]
    tags = got.data.tags
    assert (tags["mlflow.source.git.commit"], tags["stage"], tags["dvc_exp_name"]) == (
        commit, "train_gan@dcgan-x_norm-cond", "tawny-kite")
    assert sorted(a.path for a in client.list_artifacts(r.run_id)) == ["ckpt.txt", "samples"]
    local = client.download_artifacts(r.run_id, "samples/grid.txt", str(root))
    assert open(local).read() == "grid"
    # artifacts are pinned under the DVC root, not under cwd (which a queued experiment deletes)
    assert got.info.artifact_uri == (root / "mlartifacts" / r.run_id / "artifacts").as_uri()

    # outside git and outside a DVC experiment: commit "unknown", no experiment tag
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.run("ingest@xray", {}) as r2:
        pass
    tags = client.get_run(r2.run_id).data.tags
    assert tags["mlflow.source.git.commit"] == "unknown" and "dvc_exp_name" not in tags


@pytest.mark.parametrize("opted_in", [False, True])
def test_artifacts_of_real_images_leave_only_when_opted_in(root, db, opted_in):
    """tracking.real_images: a model or grid of real images is withheld by default and counted in a tag."""
    from mlflow import MlflowClient

    (root / "model.pt").write_text("fitted to real scans")
    (root / "roc.csv").write_text("fpr,tpr\n0,0\n1,1\n")
    (root / "models").mkdir()
    (root / "models" / "knn.joblib").write_text("every training feature")
    with tracking.run("classify@histology-knn", PARAMS, real_images=opted_in) as r:
        r.log_artifact(root / "roc.csv")
        r.log_artifact(root / "model.pt", real_images=True)
        r.log_artifacts(root / "models", "model", real_images=True)
    got = MlflowClient(f"sqlite:///{db}").get_run(r.run_id)
    logged = sorted(a.path for a in MlflowClient(f"sqlite:///{db}").list_artifacts(r.run_id))
    if opted_in:
        assert logged == ["model", "model.pt", "roc.csv"] and "real_images_withheld" not in got.data.tags
    else:
        assert logged == ["roc.csv"] and got.data.tags["real_images_withheld"] == "2"
    assert got.info.status == "FINISHED"


def test_failures_in_the_body_end_the_run_failed_and_propagate(root, db):
    from mlflow import MlflowClient

    with pytest.raises(RuntimeError, match="boom"):
        with tracking.run("train_gan@x", PARAMS) as r:
            raise RuntimeError("boom")
    assert MlflowClient(f"sqlite:///{db}").get_run(r.run_id).info.status == "FAILED"


def test_misuse_raises_while_tracking(root, db):
    from mlflow.exceptions import MlflowException

    with tracking.run("train_gan@x", PARAMS) as r:
        with pytest.raises(ValueError):
            r.log_metrics({"loss": "not a number"})
        with pytest.raises(MlflowException, match="Names may only contain"):
            r.log_metrics({"loss@bad": 1.0})
        with pytest.raises(FileNotFoundError, match="missing.pt"):
            r.log_artifact(root / "missing.pt")
        assert r.active


def test_parallel_first_runs_on_a_fresh_db_both_get_tracked(root):
    # `dvc queue start -j 2` on a repo without mlflow.db yet: without a lock, one loses MLflow's migrations
    from mlflow import MlflowClient

    code = "from biomedsynth import tracking\nwith tracking.run('s', {}) as r: assert r.active, 'untracked'"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=os.environ.copy(), stderr=subprocess.PIPE)
             for _ in range(2)]
    assert [(p.wait(), b"tracking off" in p.stderr.read()) for p in procs] == [(0, False), (0, False)]
    client = MlflowClient(f"sqlite:///{root}/t.db")
    runs = client.search_runs([client.get_experiment_by_name("biomedsynth").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]


@pytest.mark.parametrize("how", ["enabled=False", "BIOMEDSYNTH_MLFLOW=0"])
def test_off_writes_nothing(root, monkeypatch, how, capsys):
    if how == "BIOMEDSYNTH_MLFLOW=0":
        monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    with tracking.run("train_gan@x", PARAMS, enabled=how != "enabled=False") as r:
        r.log_metrics({"loss": 1.0}, step=0)
        r.log_artifact(root / "written_by_rank_0_only.pt")  # no-op: non-zero ranks have no such file
        r.log_artifacts(root / "nowhere")
    assert not r.active and r.run_id is None
    assert sorted(p.name for p in root.iterdir()) == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("uri, cause", [("http://127.0.0.1:9", "Connection refused"),
                                        ("sqlite:///{tmp}/garbage.db", "file is not a database")])
def test_outage_warns_once_and_training_goes_on(root, monkeypatch, capsys, uri, cause):
    (root / "garbage.db").write_bytes(b"not sqlite at all, this is some other file" * 50)
    uri = uri.format(tmp=root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    steps = 0
    for _ in range(2):  # the second run neither retries nor warns again
        with tracking.run("train_gan@x", PARAMS) as r:
            for step in range(3):
                r.log_metrics({"loss": 1.0}, step=step)
                steps += 1
        assert not r.active
    assert steps == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and uri in err[0] and cause in err[0], err


@pytest.mark.parametrize("call", ["log_artifact", "log_artifacts"])
def test_a_full_artifact_store_ends_the_run_failed_and_training_goes_on(root, db, monkeypatch, capsys, call):
    """The database still answers when the artifact disk is full: the run is ended FAILED there at once (a run
    left RUNNING would stay so forever), with one line on stderr, and the body runs on untracked."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalArtifactRepository, call, full)
    (root / "samples").mkdir()
    (root / "samples" / "grid.png").write_bytes(b"png")
    with tracking.run("train_gan@x", PARAMS) as r:
        r.log_metrics({"loss": 1.0}, step=0)
        getattr(r, call)(root / "samples" / "grid.png" if call == "log_artifact" else root / "samples")
        r.log_metrics({"loss": 0.5}, step=1)  # untracked now: a no-op, not an error
        assert not r.active
    client = MlflowClient(f"sqlite:///{db}")
    assert client.get_run(r.run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(r.run_id, "loss")] == [1.0]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err


def test_default_uri_is_sqlite_under_the_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "main"))
    monkeypatch.chdir(tmp_path)  # cwd, e.g. a queued experiment's copy, does not matter
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/main/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert tracking.tracking_uri() == "http://mlflow.team:5000"

    # outside DVC: the nearest folder up holding .dvc, else cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("DVC_ROOT")
    (tmp_path / "repo" / ".dvc").mkdir(parents=True)
    (tmp_path / "repo" / "src" / "deep").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "src" / "deep")
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path}/repo/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert tracking.project_root() == tmp_path.resolve()


def test_mlflow_is_imported_only_when_a_run_opens():
    code = ("import sys; from biomedsynth import tracking\n"
            "with tracking.run('s', {}, enabled=False) as r: r.log_metrics({'a': 1.0})\n"
            "assert 'mlflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A team's tracking server on 127.0.0.1 (its own sqlite store and artifact folder), stopped afterwards."""
    import time
    import urllib.request

    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {proc.stderr.read().decode()[-1500:]}")
            time.sleep(0.5)
        yield url, tmp_path / "server-artifacts"
    finally:
        os.killpg(proc.pid, 15)  # the server and its workers
        proc.wait(timeout=30)
    assert proc.poll() is not None


def test_runs_go_to_a_team_server(root, mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    url, store = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    (root / "vgg16.pt").write_bytes(b"weights")
    with tracking.run("classify@xray_sex-vgg16", PARAMS) as r:
        r.log_metrics({"real.accuracy": 0.8, "synthetic.accuracy": 0.7})
        r.log_artifact(root / "vgg16.pt", "model")
    got = MlflowClient(url).get_run(r.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics == {"real.accuracy": 0.8, "synthetic.accuracy": 0.7}
    assert got.data.tags["dvc_exp_name"] == "exp-a" and got.data.params["gan.arch"] == "dcgan"
    assert [f.read_bytes() for f in store.rglob("vgg16.pt")] == [b"weights"]  # uploaded to the server's store
    assert not (root / "mlartifacts").exists() and not (root / "t.db").exists()  # nothing written locally
