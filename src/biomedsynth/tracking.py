"""MLflow, in one place: where runs go, what they are tagged with, and how an outage degrades.

Where: MLFLOW_TRACKING_URI when set (e.g. a team's `mlflow server`), else sqlite:///<root>/mlflow.db with
<root> = project_root(). A database store writes artifacts itself, to <root>/mlartifacts; a server keeps
its own. Each run is tagged with the git commit, the DVC experiment name and the stage, and logs params
flattened to dotted keys ("gan.dcgan.lr").

Real images: an artifact fitted to or drawn from real images that no privacy gate screened (a classifier
model, a GAN generator, its sample grid) is logged with real_images=True and reaches the store only when the
run opened with real_images=True (params tracking.real_images); otherwise the run's tag
`real_images_withheld` counts what stayed home, so a team server never receives it by default.

Off: run(..., enabled=False) (non-zero DDP ranks, a params switch) or BIOMEDSYNTH_MLFLOW=0 in the
environment (CI speed) yield a Run whose calls do nothing and write nothing.

Outages (server down, DB locked or unreadable, disk full) must not kill hours of training: one line on
stderr naming the URI and the cause, then the run goes on untracked; the URI is not retried in this
process. An outage in an open run first ends that run FAILED where the store still can (a full artifact
disk leaves the database working), so no run stays RUNNING forever. Misuse (non-numeric metric, bad
metric name, missing artifact) still raises. A server that is down is only noticed after MLflow's HTTP
retries (minutes by default, twice when it goes down mid-run: the log call, then ending the run);
MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT shorten that.

mlflow takes seconds to import, so it is imported only when a run opens.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from biomedsynth.provenance import git_commit

_down: set[str] = set()  # URIs that failed in this process: warned about once, not tried again


def project_root() -> Path:
    """Where the default mlflow.db and mlartifacts/ live."""
    # DVC sets DVC_ROOT for every stage command: the repo root under `dvc repro`. `dvc exp run --queue`
    # and `dvc queue start` run the stages in a temporary copy (.dvc/tmp/exps/...) that is deleted
    # afterwards, but pin DVC_ROOT to the user's repo (dvc/repo/experiments/queue/base.py, "Override
    # DVC_ROOT ... not an executor tempdir root"), so queued runs land in the same DB as all others,
    # where cwd or this file's location would point into the doomed copy.
    # Outside DVC: the nearest folder up from cwd that holds .dvc, else cwd.
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root().as_posix()}/mlflow.db"


def _flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _is_outage(e: Exception) -> bool:
    """An error of the tracking stack (server, database, disk), not of what the caller passed in."""
    if getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE":  # MLflow rejecting a name or value
        return False
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("mlflow", "sqlalchemy", "alembic")


def _warn(uri: str, e: Exception, outcome: str = "") -> None:
    _down.add(uri)
    cause = e  # the innermost cause says it best ("Connection refused", "database is locked")
    for _ in range(10):
        if (nxt := cause.__cause__ or cause.__context__) is None:
            break
        cause = nxt
    reason = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
    print(f"biomedsynth: MLflow tracking off for {uri}, training goes on: {reason}{outcome}", file=sys.stderr,
          flush=True)


def _end_failed(client, run_id: str) -> bool:
    """Whether the store could end the run FAILED."""
    try:
        client.set_terminated(run_id, "FAILED")
    except Exception as e:
        if not _is_outage(e):
            raise
        return False
    return True


class Run:
    """An open MLflow run, or a no-op one (tracking off, or lost): the same calls work on both."""

    def __init__(self, uri: str | None = None, client=None, run_id: str | None = None, real_images: bool = False):
        self.uri, self.run_id, self._client = uri, run_id, client
        self.real_images, self.withheld = real_images, 0

    @property
    def active(self) -> bool:
        return self._client is not None

    def log_params(self, params: Mapping) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        self._call(self._client.log_batch, self.run_id, params=[Param(k, v) for k, v in _flatten(params).items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(k, float(v), ms, 0 if step is None else int(step)) for k, v in metrics.items()]
        self._call(self._client.log_batch, self.run_id, metrics=batch)

    def _withhold(self, real_images: bool) -> bool:
        """True (and counted in the run's tags) when an artifact of real images must stay home."""
        if not real_images or self.real_images:
            return False
        self.withheld += 1
        self._call(self._client.set_tag, self.run_id, "real_images_withheld", str(self.withheld))
        return True

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None, *,
                     real_images: bool = False) -> None:
        if not self.active:
            return
        if not Path(path).is_file():
            raise FileNotFoundError(f"artifact {path} is not a file")
        if not self._withhold(real_images):
            self._call(self._client.log_artifact, self.run_id, os.fspath(path), artifact_path)

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None, *,
                      real_images: bool = False) -> None:
        if not self.active:
            return
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"artifact folder {folder} is not a folder")
        if not self._withhold(real_images):
            self._call(self._client.log_artifacts, self.run_id, os.fspath(folder), artifact_path)

    def _end(self, status: str) -> None:
        if self.active:
            self._call(self._client.set_terminated, self.run_id, status)

    def _call(self, fn, *args, **kwargs) -> None:
        """fn(*args, **kwargs) on the store. An outage turns tracking off, ending the run FAILED first (not
        tried again when ending it was the call that failed)."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            if not _is_outage(e):
                raise
            client, self._client = self._client, None
            ended = fn != client.set_terminated and _end_failed(client, self.run_id)
            _warn(self.uri, e, f"; its run {self.run_id} ended FAILED" if ended else "")


@contextmanager
def _sqlite_setup_lock(uri: str) -> Iterator[None]:
    """Parallel queued experiments (`dvc queue start -j 2`) opening a fresh sqlite DB together race
    through MLflow's schema migrations and one loses ("duplicate column name"); take turns."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    folder = Path(uri.removeprefix("sqlite:///")).parent  # locked itself: a lock file would litter the repo
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(uri: str, experiment: str, stage: str) -> Run:
    try:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        with _sqlite_setup_lock(uri):
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                # pinned at creation: MLflow's default (./mlruns under cwd) would die with a queued copy
                server = uri.startswith(("http:", "https:"))
                exp_id = client.create_experiment(
                    experiment, artifact_location=None if server else (project_root() / "mlartifacts").as_uri())
            elif exp.lifecycle_stage != "active":
                raise MlflowException(f"experiment {experiment!r} is deleted there (`mlflow experiments restore`)")
            else:
                exp_id = exp.experiment_id
        tags = {"mlflow.source.git.commit": git_commit(), "stage": stage}
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
        run_id = client.create_run(exp_id, tags=tags, run_name=stage).info.run_id
    except Exception as e:
        if not _is_outage(e):
            raise
        _warn(uri, e)
        return Run(uri)
    return Run(uri, client, run_id)


@contextmanager
def run(stage: str, params: Mapping, *, enabled: bool = True, experiment: str = "biomedsynth",
        real_images: bool = False) -> Iterator[Run]:
    """Open an MLflow run named `stage` (e.g. DVC_STAGE, "train_gan@dcgan-x_norm-cond") with `params`
    logged; it ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, SIGTERM: lifetime.Terminated), and
    exceptions pass through. `real_images`: artifacts logged with real_images=True are sent (tracking.real_images)."""
    if not enabled or os.environ.get("BIOMEDSYNTH_MLFLOW") == "0":
        yield Run()
        return
    uri = tracking_uri()
    tracker = Run(uri) if uri in _down else _open(uri, experiment, stage)
    tracker.real_images = real_images
    try:
        tracker.log_params(params)  # in here: a SIGTERM meanwhile still ends the run KILLED
        yield tracker
    except BaseException as e:
        tracker._end("FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    tracker._end("FINISHED")
