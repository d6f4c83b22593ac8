"""One process or many: the device a process trains on and, under torchrun, its rank and the gradient average.

params.yaml `launch` asks for N processes: the stage's command starts them itself through torchrun's Python
entry (an argument list, never a shell string), each running the same `biomedsynth <stage> ...`; each takes
its share of every batch, gradients are averaged over all of them, and rank 0 alone writes files, logs and
tracks. BIOMEDSYNTH_DEVICE=cpu runs them on CPU with the gloo backend (what the tests do).
"""
from __future__ import annotations

import os
import signal
import shlex

import torch
import torch.distributed as dist


def torchrun_args(launch, args: list[str]) -> list[str]:
    """torchrun's arguments for params `launch` (a params.Launch), each worker running `python -m biomedsynth *args`
    with this interpreter, however this process was started."""
    if launch.rdzv_endpoint is None:  # one node: a rendezvous on a free local port, so parallel stages never clash
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                 "--rdzv-endpoint", launch.rdzv_endpoint]
    return [*where, "--nproc-per-node", str(launch.nproc_per_node), "--module", "biomedsynth", *args]


def run_workers(launch, args: list[str]) -> int | None:
    """Run `biomedsynth *args` in the processes `launch` asks for and return their exit status; None when
    this process does the work itself: `launch` asks for one, or this is already a torchrun worker."""
    if launch.nproc_per_node * launch.nnodes == 1 or "WORLD_SIZE" in os.environ:
        return None
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from biomedsynth.lifetime import Terminated

    argv = torchrun_args(launch, args)
    print(f"{launch.nproc_per_node * launch.nnodes} processes: torchrun {shlex.join(argv)}", flush=True)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as e:
        # the worker has printed why; its status (1 for a signal) tells DVC that the stage failed
        return max(e.get_first_failure()[1].exitcode, 1)
    except SignalException as e:  # torchrun takes over SIGTERM while it runs; it has stopped the workers
        if e.sigval != signal.SIGTERM:
            raise
        raise Terminated() from None
    return 0


def dist_info() -> tuple[int, int]:
    """(rank, world size), initialising the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and os.environ.get("BIOMEDSYNTH_DEVICE", "cuda").startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def pick_device(rank: int = 0) -> torch.device:
    """BIOMEDSYNTH_DEVICE when set, else cuda (this rank's local GPU) when present, else cpu. ValueError, naming
    the GPUs there are, for one this machine does not have (else the first tensor moved there fails, far away)."""
    if name := os.environ.get("BIOMEDSYNTH_DEVICE"):
        return _existing_device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible): start "
                             f"at most that many processes per node, or set BIOMEDSYNTH_DEVICE=cpu")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _existing_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} (BIOMEDSYNTH_DEVICE or params device): not a device; use cpu, cuda or "
                         f"cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= (n := torch.cuda.device_count()):
        there = ("no GPU that torch can use" if n == 0 else "1 GPU, cuda:0" if n == 1
                 else f"{n} GPUs, cuda:0 to cuda:{n - 1}")
        raise ValueError(f"device {name} (BIOMEDSYNTH_DEVICE or params device): this machine has {there}; use "
                         + ("one of them or cpu" if n else "cpu"))
    return device


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks with one all_reduce (what DDP does), done by hand because the
    WGAN-GP penalty's double backward and PGGAN's depth-dependent unused layers defeat DDP's hooks."""
    if world == 1:
        return
    # layers a PGGAN does not use yet have no gradient on any rank (all ranks share the depth); they
    # stay None so Adam skips them exactly as in a single process
    params = [p for p in module.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(chunk.view_as(p))
