"""What a stage does when it is stopped, killed, run twice or meets a faulty machine: SIGTERM ends it like Ctrl-C,
kill -9 leaves no process behind, a second run of a stage stops at once, the next run removes a killed run's
leftovers, and a full disk, a read-only or unremovable output and a missing GPU are one line, exit 1."""
import ctypes
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

import biomedsynth
from biomedsynth.cli import app
from biomedsynth.params_edit import apply_profile
from biomedsynth.store import ImageSet, ImageSetWriter

CODE = Path(biomedsynth.__file__).resolve().parents[2]  # the checkout under test (PYTHONPATH may name another)
CLI = [sys.executable, "-c", "from biomedsynth.cli import app; app()"]
ENV = {**os.environ, "PYTHONPATH": str(CODE / "src"), "BIOMEDSYNTH_MLFLOW": "0", "BIOMEDSYNTH_DEVICE": "cpu"}
ENV.pop("BIOMEDSYNTH_DEBUG", None)


def params(root: Path, smoke: bool = False, **changes) -> None:
    """root/params.yaml: the checkout's, the smoke profile applied if asked, then `changes` ("a.b": value)."""
    shutil.copy(CODE / "params.yaml", root / "params.yaml")
    if smoke:
        apply_profile("smoke", root / "params.yaml")
    p = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = p
        for k in parents:
            node = node[k]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(p))


def xray_project(root: Path, rows: int, distinct: int = 1) -> Path:
    """A project whose X-ray manifest lists `rows` scans of one patient, cycling over `distinct` images (a
    repeat is decoded, then skipped as a duplicate): ingest xray takes about rows / 20 seconds on 2 workers."""
    scans = root / "data/raw/xray"
    scans.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:400, :360] / np.array([400, 360])[:, None, None]
    chest = 0.05 + 0.65 * (((y - 0.5) / 0.45) ** 2 + ((x - 0.5) / 0.4) ** 2 <= 1)
    for i in range(distinct):
        img = chest + rng.normal(0, 0.02, chest.shape)
        Image.fromarray((img * 4000).clip(0, 65535).astype(np.uint16)).save(scans / f"scan{i}.png")
    write_manifest(scans, rows, distinct)
    params(root, **{"sources.xray": {"format": "manifest", "root": "data/raw/xray", "csv": "data/raw/xray/list.csv",
                                     "allow_outside_root": False},
                    "ingest.workers": 2, "ingest.xray.image_size": 32})
    return root


def write_manifest(scans: Path, rows: int, distinct: int = 1) -> None:
    (scans / "list.csv").write_text("path,patient_id,sex,age,image_id\n" + "".join(
        f"scan{i % distinct}.png,p1,F,40,img{i}\n" for i in range(rows)))


def gan_project(root: Path, **changes) -> Path:
    """x_norm's train and val sides and a KID feature net, as the earlier stages leave them; smoke params."""
    from biomedsynth.gan import score
    from biomedsynth.gan.score import read_batch

    yy, xx = np.mgrid[:32, :32]
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 < 110
    rng = np.random.default_rng(0)
    for side, n in (("train", 64), ("val", 16)):
        with ImageSetWriter(root / "data/studygroups/x_norm" / side, (32, 32, 1)) as w:
            for i in range(n):
                label = ("F_a", "M_a")[i % 2]
                img = 40 + 60 * disc * (1 + i % 2) + rng.normal(0, 10, (32, 32))
                w.add(np.clip(img, 0, 255).astype(np.uint8), label=label, patient_id=f"{side}{i}")
    train = ImageSet(root / "data/studygroups/x_norm/train")
    images, labels = read_batch(train, np.arange(len(train)), 32), train.meta["label"].to_numpy()
    net = score.train_feature_net(images, labels, epochs=1)
    score.save_feature_net(net, root / "models/feature_net/xray.pt", resolution=32)
    params(root, smoke=True, **changes)
    return root


@contextmanager
def running(cmd: list[str], root: Path, env: dict = ENV, **kw):
    """A command running in the background; on leaving, it and every process it started are killed."""
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, **kw)
    family = [psutil.Process(proc.pid)]
    try:
        yield proc, family
    finally:
        for p in family + [c for p in family for c in descendants(p)]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()


def descendants(p: psutil.Process) -> list[psutil.Process]:
    try:
        return p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie has ended
    except psutil.NoSuchProcess:
        return False


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # ended meanwhile
        return ""


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old"))


def test_kill_9_of_ingest_leaves_no_process_and_the_next_run_removes_its_leftovers(tmp_path):
    root = xray_project(tmp_path, rows=600)
    interim = root / "data/interim"
    with running(CLI + ["ingest", "xray"], root, stderr=subprocess.DEVNULL) as (proc, family):
        workers = wait_for(lambda: len(kids := family[0].children()) == 2 and kids, "the 2 pool workers")
        wait_for(lambda: list(interim.glob(".xray.tmp-*")), "the image set being written")
        family += workers
        time.sleep(0.5)  # the workers at work on their chunks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 3
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not [w.pid for w in workers if alive(w)], "pool workers outlived their killed parent"
    assert len(list(interim.glob(".xray.tmp-*"))) == 1  # what the kill left
    write_manifest(root / "data/raw/xray", rows=2)
    run = subprocess.run(CLI + ["ingest", "xray"], cwd=root, env=ENV, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert leftovers(root) == [] and len(ImageSet(interim / "xray")) == 1


def test_kill_9_during_lbp_features_leaves_no_process(tmp_path):
    """The features stage's pool is a forkserver's: its workers must not outlive the process they work for."""
    lbp = ("import numpy as np; from biomedsynth.classify.lbp import lbp_features; "
           "lbp_features(np.zeros((4000, 96, 96, 1), np.uint8), workers=2)")
    with running([sys.executable, "-c", lbp], tmp_path, stderr=subprocess.DEVNULL) as (proc, family):
        helpers = wait_for(lambda: len(kids := descendants(family[0])) >= 4 and kids,
                           "the forkserver, its 2 workers and the resource tracker")
        family += helpers
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while any(alive(p) for p in helpers) and time.time() < deadline:
            time.sleep(0.05)
        assert not [cmdline(p)[:80] for p in helpers if alive(p)], "processes outlived their killed parent"


@pytest.mark.e2e
def test_sigterm_ends_train_gan_like_ctrl_c(tmp_path):
    """The MLflow run ends KILLED, not RUNNING forever; exit 143 with one line."""
    root = gan_project(tmp_path, **{"gan.xray.epochs_cond": 500})
    env = {k: v for k, v in ENV.items() if k != "BIOMEDSYNTH_MLFLOW"}  # tracked, to root/mlflow.db
    db = root / "mlflow.db"

    def runs_and_metrics():
        if not db.is_file():
            return None
        try:
            with sqlite3.connect(db) as con:
                runs = con.execute("SELECT status FROM runs").fetchall()
                return runs and con.execute("SELECT count(*) FROM metrics").fetchone()[0] and runs
        except sqlite3.OperationalError:  # tables not there yet, or locked by the writer
            return None

    with (root / "stderr.log").open("w") as log, \
            running(CLI + ["train-gan", "dcgan-x_norm-cond"], root, env, stderr=log) as (proc, _):
        assert wait_for(runs_and_metrics, "an epoch logged to MLflow", timeout=120) == [("RUNNING",)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert (root / "stderr.log").read_text().strip().splitlines()[-1] == "biomedsynth train-gan: stopped by SIGTERM"
    assert runs_and_metrics() == [("KILLED",)]


@pytest.mark.e2e
def test_a_second_train_gan_on_one_stage_stops_at_once(tmp_path):
    root = gan_project(tmp_path, **{"gan.xray.epochs_cond": 500})
    stage = root / "models/gan/dcgan-x_norm-cond"
    with running(CLI + ["train-gan", "dcgan-x_norm-cond"], root, stderr=subprocess.DEVNULL) as (first, _):
        wait_for(lambda: list(root.rglob("log.jsonl")), "the first run's first epoch", timeout=120)
        being_written = stage.with_name(f".{stage.name}.tmp-by-the-first")  # what only the holder may clear
        being_written.mkdir(parents=True)
        second = subprocess.run(CLI + ["train-gan", "dcgan-x_norm-cond"], cwd=root, env=ENV, capture_output=True,
                                text=True, timeout=60)
        assert first.poll() is None and being_written.is_dir()  # the first undisturbed
    assert second.returncode == 1
    assert second.stderr.splitlines() == [f"biomedsynth: {stage.relative_to(root)} is being written by process "
                                          f"{first.pid} (another run of this stage); wait for it to end or stop it"]


@pytest.mark.e2e
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_sigterm_to_dvc_repro_stops_its_stage(tmp_path, shell):
    """DVC runs a stage as `$SHELL -c "<cmd>"` (bash execs it, dash waits for it) and releases its lock meanwhile:
    the stage must not go on writing without it."""
    if not Path(shell).is_file():
        pytest.skip(f"no {shell}")
    root = xray_project(tmp_path, rows=3000)  # half a minute or more: it would still be running
    (root / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: biomedsynth ingest xray\n    deps: [data/raw/xray]\n"
                                   "    outs: [data/interim/xray]\n")
    env = {**ENV, "SHELL": shell, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # where `biomedsynth` is
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    with (root / "stage.log").open("w") as log, \
            running([sys.executable, "-m", "dvc", "repro"], root, env, stderr=log) as (dvc, family):
        wait_for(lambda: list((root / "data/interim").glob(".xray.tmp-*")), "the image set being written")
        family += [p for p in descendants(family[0]) if "ingest" in cmdline(p)]  # the stage, its workers, a shell
        assert len(family) > 1
        dvc.send_signal(signal.SIGTERM)
        dvc.wait(timeout=30)
        deadline = time.time() + 30  # its cleanup under CI's load once took over 10 s; the log below tells a stage
        while any(alive(p) for p in family[1:]) and time.time() < deadline:  # that stopped from one that finished
            time.sleep(0.1)
        assert not [p.pid for p in family[1:] if alive(p)], "the stage ran on after dvc ended"
    assert leftovers(root) == []  # it stopped as on Ctrl-C: its temporary image set removed
    assert "biomedsynth ingest: stopped by SIGTERM" in (root / "stage.log").read_text()


def test_leftover_names_are_removed_and_nothing_else(tmp_path):
    from biomedsynth.lifetime import remove_leftovers

    out = tmp_path / "models/gan/x"
    made = {"models/gan/.x.tmp-ab12/shard.npy", "models/gan/.x.old/info.json", "models/gan/.x.tmp",
            "models/gan/x/F/.checkpoint.pt.tmp", "models/gan/x/F/grids/.001.png.tmp", "models/gan/x/.log.jsonl.tmp-k2",
            "models/gan/x/F/checkpoint.pt", "models/gan/x/.keep", "models/gan/.xy.tmp-zz", "models/gan/.x.json"}
    for name in made:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = remove_leftovers(out)
    assert {str(p.relative_to(tmp_path)) for p in removed} == {
        "models/gan/.x.tmp-ab12", "models/gan/.x.old", "models/gan/.x.tmp", "models/gan/x/F/.checkpoint.pt.tmp",
        "models/gan/x/F/grids/.001.png.tmp", "models/gan/x/.log.jsonl.tmp-k2"}
    kept = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    # .xy.tmp-zz: what another output's writer is writing beside it, which this holder must not touch
    assert kept == {"models/gan/x/F/checkpoint.pt", "models/gan/x/.keep", "models/gan/.xy.tmp-zz", "models/gan/.x.json"}


def one_line(run) -> str:
    """The command's one error line (its progress bars aside); exit status 1, no traceback."""
    lines = [line for line in run.stderr.splitlines() if line.startswith("biomedsynth:")]
    assert run.returncode == 1 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return lines[0]


def on_a_full_disk(folder: str, size: str = "4k") -> list[str]:
    """A command prefix: run in a user and mount namespace of its own with `folder` a tiny tmpfs."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged mount namespace here (unshare -rm) for a small file system")
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {folder} && exec "$@"', "sh"]


def test_a_full_disk_is_one_line_naming_the_path(tmp_path):
    root = xray_project(tmp_path, rows=12, distinct=12)
    (root / "data/interim").mkdir(parents=True)
    run = subprocess.run(on_a_full_disk("data/interim") + CLI + ["ingest", "xray"], cwd=root, env=ENV,
                         capture_output=True, text=True)
    line = one_line(run)
    assert line == "biomedsynth: data/interim/xray: the disk is full (No space left on device)", line


def test_torch_save_on_a_full_disk_is_an_os_error_naming_the_file(tmp_path):
    """torch.save to a path says only "unexpected pos N vs M" there; store.save_torch names the file."""
    (tmp_path / "full").mkdir()
    save = ("import os, torch; from biomedsynth.store import save_torch\n"
            "try: save_torch({'w': torch.zeros(100000)}, 'full/x.pt')\n"
            "except OSError as e: print(e.errno, e.filename, os.listdir('full'))")
    run = subprocess.run(on_a_full_disk("full") + [sys.executable, "-c", save], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True)
    assert run.stdout.split() == ["28", "full/x.pt", "[]"], run.stderr[-2000:]  # nothing half-written left


def _without_root_override():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE (root's licence to write where the mode says no) for the command."""
    if os.geteuid() == 0:
        ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0)  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE


def _as_user(cmd, root) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, preexec_fn=_without_root_override)


@contextmanager
def read_only(folder: Path, root: Path):
    """`folder` in mode 555 for the block; then every folder under `root` writable again, wherever it went."""
    folder.chmod(0o555)
    try:
        if _as_user([sys.executable, "-c", f"open({str(folder / 'probe')!r}, 'w')"], folder).returncode == 0:
            pytest.skip("a mode of 555 does not stop this user writing (root without a droppable CAP_DAC_OVERRIDE)")
        yield
    finally:
        for d in root.rglob("*"):
            if d.is_dir():
                d.chmod(0o755)


def test_a_read_only_output_folder_is_one_line_naming_it(tmp_path):
    root = xray_project(tmp_path, rows=2)
    (root / "data/interim").mkdir(parents=True)
    with read_only(root / "data/interim", root):
        line = one_line(_as_user(CLI + ["ingest", "xray"], root))
    assert line == "biomedsynth: data/interim: Permission denied", line


def test_an_output_that_cannot_be_removed_is_one_line_naming_it(tmp_path):
    """The previous data/interim/xray holds a folder the user may not empty: replacing it cannot finish."""
    root = xray_project(tmp_path, rows=2)
    stuck = root / "data/interim/xray/locked"
    stuck.mkdir(parents=True)
    (stuck / "f").write_text("x")
    with read_only(stuck, root):
        line = one_line(_as_user(CLI + ["ingest", "xray"], root))
    assert line == ("biomedsynth: data/interim/.xray.old: cannot be removed (Permission denied: "
                    "data/interim/.xray.old/locked/f)"), line


def test_a_device_that_is_not_there_is_one_line_naming_those_there_are(tmp_path, monkeypatch):
    import torch

    gan_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOMEDSYNTH_MLFLOW", "0")
    monkeypatch.setenv("BIOMEDSYNTH_DEVICE", "cuda:99")
    result = CliRunner().invoke(app, ["train-gan", "dcgan-x_norm-cond"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("biomedsynth: device cuda:99 (BIOMEDSYNTH_DEVICE or params device): this machine has ")
    n = torch.cuda.device_count()
    assert lines[0].endswith("no GPU that torch can use; use cpu" if n == 0 else f"cuda:{n - 1}; use one of them or cpu")
