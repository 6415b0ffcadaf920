"""``torch.distributed`` set-up and guarded collectives.

Launch with ``torchrun`` (one node: ``torchrun --nproc-per-node 8 ...``; several nodes: the same
command on every node with ``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--rdzv-id RUN``). torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_distributed` reads them (``env://``) and picks NCCL on CUDA, gloo on
CPU. Without them (or with ``WORLD_SIZE=1``) nothing is initialised and every helper here is a
no-op, so one CPU process runs the same code.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_no_grad",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "gather_rows",
    "init_distributed",
    "is_distributed",
    "resolve_device",
    "restart_store_problem",
    "world_and_rank",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group
    owns_group: bool = False  # we initialised it (and so destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. ``cuda`` without CUDA raises ``ValueError``."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for but no CUDA GPU is available on this machine "
            "(use --device cpu or --device auto)"
        )
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {requested!r}; choose one of: auto, cpu, cuda")
    return torch.device(requested)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


# seconds a collective may wait before it fails (torch's default otherwise: 30 min for gloo,
# 10 for NCCL); under torchrun --max-restarts a hung group then restarts instead of waiting
TIMEOUT_ENV = "SSL_CLI_DIST_TIMEOUT"


SHARED_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def restart_store_problem() -> str | None:
    """Why a restart of this torchrun group may hang, or ``None``.

    By default torchrun's c10d rendezvous hands its own TCP store, which lives as long as the
    job, to the workers, and the process group writes its keys there under the same names in
    every attempt. After a rank is lost and the group restarts, a rank can read the address a
    dead rank wrote in the previous attempt and wait on it until the connect times out (gloo:
    5 min) or fail (PyTorch issue 135712: torchelastic's restart count, the only attempt number
    a worker sees, differs between nodes, so it cannot tell the attempts apart).
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, exported before ``torchrun``, gives each attempt
    a store of its own on a fresh port (docs/training.md has the measurement)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if _env_int("TORCHELASTIC_MAX_RESTARTS", 0) <= 0:
        return None
    return (
        "torchrun shares its rendezvous store with the workers, so a restart after a lost rank "
        "can read the dead rank's address and hang; export "
        f"{SHARED_STORE_ENV}=1 before torchrun to give every attempt its own store"
    )


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment, or run alone.

    CUDA: rank ``r`` uses GPU ``LOCAL_RANK`` and NCCL. CPU: gloo. A process group that already
    exists (tests, notebooks) is used as it is and left alone at the end.
    """
    base = resolve_device(requested_device)
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        device = _local_device(base, local)
        return DistInfo(rank, world, local, device, dist.get_backend(), owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        device = _local_device(base, _env_int("LOCAL_RANK", 0))
        return DistInfo(0, 1, 0, device, None)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    problem = restart_store_problem()
    if problem is not None and rank == 0:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    device = _local_device(base, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    timeout = _env_int(TIMEOUT_ENV, 0)
    if timeout > 0:  # collectives (and the group's start) that hang past it raise instead
        kwargs["timeout"] = datetime.timedelta(seconds=timeout)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs
    )
    return DistInfo(rank, world, local, device, backend, owns_group=True)


def _local_device(base: torch.device, local_rank: int) -> torch.device:
    if base.type != "cuda":
        return base
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def cleanup_distributed(info: DistInfo) -> None:
    if info.owns_group and is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (in place); ``x`` unchanged without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (in place); ``x`` unchanged without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks (in place); ``x`` unchanged without a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def world_and_rank() -> tuple[int, int]:
    """(world size, rank); ``(1, 0)`` when no process group is initialised."""
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` ``[B, ...]`` from every rank in rank order -> ``[W * B, ...]``.

    No gradient flows through the result (used for stop-gradient keys and integer members).
    Every rank must pass the same shape (``all_gather`` needs equal sizes). With no process
    group, or a world of one, returns ``x`` detached.
    """
    world, _ = world_and_rank()
    if world == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x [counts[rank], ...]`` in rank order (all ranks get the
    result); ``x`` itself without a process group. Parts may differ in length."""
    if not is_distributed():
        return x
    top = max(counts)
    padded = x.new_zeros((top, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])
