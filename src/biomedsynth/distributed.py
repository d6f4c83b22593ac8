"""One process or many: the device a process trains on and, under torchrun, its rank and the gradient average.

`torchrun --nproc-per-node N --no-python biomedsynth <stage> ...` (params.yaml `launcher`) starts N processes;
each takes its share of every batch, gradients are averaged over all of them, and rank 0 alone writes files,
logs and tracks. BIOMEDSYNTH_DEVICE=cpu runs them on CPU with the gloo backend (what the tests do).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size), initialising the process group when torchrun started several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and os.environ.get("BIOMEDSYNTH_DEVICE", "cuda").startswith("cuda")
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def pick_device(rank: int = 0) -> torch.device:
    """BIOMEDSYNTH_DEVICE when set, else cuda (this rank's local GPU) when present, else cpu."""
    if name := os.environ.get("BIOMEDSYNTH_DEVICE"):
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible): start "
                               f"at most that many processes per node, or set BIOMEDSYNTH_DEVICE=cpu")
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


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
