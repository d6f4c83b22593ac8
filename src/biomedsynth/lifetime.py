"""How a biomedsynth process holds its outputs and ends, whatever ends it.

- SIGTERM stops a command as Ctrl-C does: it raises Terminated (a SystemExit, not an Exception) in the main
  thread, so `finally` blocks and context managers run (temporary files removed, an MLflow run ended KILLED
  by tracking.run), then one line and exit status 143 (128 + SIGTERM). A second SIGTERM meanwhile is ignored,
  so it cannot cut that cleanup short; kill -9 still ends the process at once.
- A DVC stage command (DVC_STAGE set) or a torchrun worker (WORLD_SIZE set) gets the same SIGTERM when the
  process that launched it ends, even by kill -9: DVC releases its repository lock while a command runs, so
  an orphan would go on writing outputs that the next `dvc repro` writes too.
- Pool workers die with the process that made them (die_with_parent as the pool's initializer).
- hold: one process at a time writes a stage's outputs (a lock file under .cache/locks, outside
  every DVC output); the holder first removes what a killed run left in and beside them.
- describe: one line for an OS error, naming the path and the cause.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

LOCKS = Path(".cache/locks")
SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "fish"}  # what DVC may run a stage's command through
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_writing: list[Path] = []  # the outputs the running command holds: what a write error without a path names
_held: ExitStack | None = None  # what the running command holds until it ends


class Terminated(SystemExit):
    """SIGTERM, raised where the main thread is; exit status 143."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


@contextmanager
def command(name: str) -> Iterator[None]:
    """The life of one command: SIGTERM handled like Ctrl-C, and what `hold` takes held until it ends."""
    global _held
    with ExitStack() as held, _sigterm_like_ctrl_c(name):
        _held = held
        try:
            yield
        finally:
            _held = None


@contextmanager
def _sigterm_like_ctrl_c(command: str) -> Iterator[None]:
    """For the time of a command: SIGTERM raises Terminated, and a DVC stage or torchrun worker is sent
    SIGTERM when its launcher ends. Says so in one line when it happened."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    stopped = []

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopped.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    _stop_with_launcher()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stopped:
            print(f"biomedsynth {command}: stopped by SIGTERM", file=sys.stderr, flush=True)


def _stop_with_launcher() -> None:
    """Under DVC or torchrun, SIGTERM this process when its launcher ends (a thread waits for that)."""
    if "DVC_STAGE" not in os.environ and "WORLD_SIZE" not in os.environ:
        return  # started by a user's shell, nohup or a scheduler: it outlives them, as they expect
    try:
        launcher = _launcher()
    except (OSError, ValueError):  # no /proc (not Linux): not watched
        return
    if launcher > 1:  # 1: the launcher is init (dvc as a container's first process) or already gone
        _when_gone(launcher, signal.SIGTERM)


def _launcher() -> int:
    """The first ancestor that is not a shell: DVC runs `$SHELL -c "<cmd>"`, and bash execs a lone command
    while dash (/bin/sh on Debian) waits for it as its child; a killed DVC leaves that shell waiting."""
    pid = os.getppid()
    name, parent = _proc_stat(pid)
    while name in SHELLS and pid > 1:
        pid = parent
        name, parent = _proc_stat(pid)
    return pid


def _proc_stat(pid: int) -> tuple[str, int]:
    """(name, parent pid) of a process, from /proc/<pid>/stat: `pid (name) state ppid ...`."""
    text = Path(f"/proc/{pid}/stat").read_text()
    end = text.rindex(")")
    return text[text.index("(") + 1:end], int(text[end + 2:].split()[1])


def _when_gone(pid: int, sig: int) -> None:
    """Send this process `sig` once process `pid` has ended (a daemon thread waits for that)."""
    def wait():
        try:
            fd = os.pidfd_open(pid)  # readable once the process ends (Linux 5.3+)
        except ProcessLookupError:
            pass  # already gone
        except (AttributeError, OSError):  # no pidfd: look once a second
            while _alive(pid):
                time.sleep(1)
        else:
            select.select([fd], [], [])
        os.kill(os.getpid(), sig)

    threading.Thread(target=wait, daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def die_with_parent(owner: int) -> None:
    """Pool initializer (initargs: os.getpid() of the pool's process, its `owner`): this worker is killed
    (SIGKILL) when the owner ends, even by kill -9, instead of staying blocked on a queue nobody fills. A
    worker the owner forked asks the kernel (Linux; elsewhere nothing changes); one a forkserver forked
    watches the owner, as the server lives on while any of its workers does."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the command's handler: nothing to clean
    if os.getppid() != owner:
        _when_gone(owner, signal.SIGKILL)
    elif sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != owner:  # it ended before the kernel took the order
            os._exit(1)


def hold(outputs: list[Path]) -> None:
    """hold_outputs(outputs) until the running command ends."""
    _held.enter_context(hold_outputs(outputs))


@contextmanager
def hold_outputs(outputs: list[Path]) -> Iterator[None]:
    """Hold the stage whose outputs are `outputs` (the first names it) while the block runs: ValueError
    ("<output> is being written by process N") when another process holds it. Holding it, remove what a
    killed run left in and beside them: their writer is gone, or it would hold the lock. A torchrun worker
    takes no lock: the biomedsynth process that launched it holds it (and workers other than rank 0 write
    nothing)."""
    fd = None
    if "WORLD_SIZE" not in os.environ:
        fd = _lock(LOCKS / f"{quote(outputs[0].as_posix(), safe='')}.lock", outputs[0])
        for out in outputs:
            remove_leftovers(out)
        for stale in remove_earlier_layout(outputs):
            print(f"removed {stale}: an earlier version of this stage wrote it beside {outputs[0]}; this one does "
                  f"not", file=sys.stderr)
    _writing[:] = outputs
    try:
        yield
    finally:
        _writing.clear()
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock(path: Path, output: Path) -> int:
    """An open file descriptor of `path` holding an exclusive flock, our pid written in it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"{output} is being written by process {holder} (another run of this stage); wait for "
                         f"it to end or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def is_temporary(name: str) -> bool:
    """A name the atomic writers give what they are still writing, `.<name>.tmp` or `.<name>.tmp-<random>`
    (tempfile, store.py), or the output an image set or feature folder replaces, `.<name>.old`."""
    return _being_written(name) or (name.startswith(".") and name.endswith(".old"))


def _being_written(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def remove_leftovers(output: Path) -> list[Path]:
    """Remove the temporary files and folders of `output` (`.<its name>.tmp*` and `.<its name>.old` beside
    it, any temporary name inside it) and return them. Only for a caller that holds the output."""
    output = Path(output)
    found = []
    if output.parent.is_dir():
        prefix = f".{output.name}."
        found += [p for p in output.parent.iterdir()
                  if p.name in (prefix + "tmp", prefix + "old") or p.name.startswith(prefix + "tmp-")]
    if output.is_dir():
        found += [p for p in output.rglob(".*") if is_temporary(p.name)]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)  # one it cannot remove costs space only; nothing reads it
        else:
            p.unlink(missing_ok=True)
    return found


def remove_earlier_layout(outputs: list[Path]) -> list[Path]:
    """Remove and return the files an earlier layout of this stage left beside its outputs, which no stage writes
    now: in each output's folder, the names `<output stem>-*` and `<output stem>.*` that are not outputs
    themselves (metrics/synthesize/<set>-closest.png beside metrics/synthesize/<set>.json). Stage outputs are named
    by the whole stage (<arch>-<group>-<setup>, <task>/<model>), so no other stage's output matches (dvc.yaml's
    259 outputs checked). Only for a caller that holds the outputs."""
    outputs = [Path(o).absolute() for o in outputs]
    found = []
    for out in outputs:
        stem = out.stem if out.suffix else out.name
        if out.parent.is_dir():
            found += [p for p in out.parent.iterdir() if p not in outputs and p not in found
                      and (p.name.startswith(f"{stem}-") or p.name.startswith(f"{stem}."))]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return [p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p for p in found]


def describe(e: OSError) -> str:
    """One line for an OS error: the path (the failing call's, else the output being written) and the cause."""
    path = e.filename or (_writing[0] if _writing else None)
    cause = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        cause = f"the disk is full ({cause})"
    if path is None:
        return cause
    if e.filename2:  # a rename
        return f"{_shown(path)} -> {_shown(e.filename2)}: {cause}"
    path = Path(os.path.abspath(path))
    if temporary := [p for p in (path, *path.parents) if _being_written(p.name)]:
        path = temporary[-1].parent  # the folder it was being written in: the one to look at
    return f"{_shown(path)}: {cause}"


def _shown(path) -> str:
    """`path` relative to the working directory when inside it (as the stage commands name their outputs)."""
    rel = os.path.relpath(os.path.abspath(path))
    return os.fspath(path) if rel.startswith("..") else rel
