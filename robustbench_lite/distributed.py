"""Data-parallel execution: one process per device, started by torchrun.

    torchrun --nproc-per-node 2 -m robustbench_lite attack ...
    torchrun --nproc-per-node 2 -m robustbench_lite train-robust ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` then joins the process group (NCCL on CUDA,
gloo on CPU). Without those variables everything here is a no-op and the code runs as a single
process. Only rank 0 writes files (checkpoints, metrics, leaderboard rows) and prints.

Evaluation (suite.execute_run): each rank attacks the strided shard ``shard(n)``; randomness is keyed
by sample id (robustbench_lite.rng), so the gathered per-sample outcomes equal a single-process run.
Training (training.train): every rank holds the data and steps through the same global batches;
each takes the strided share of a batch, its mean loss weighted by (share x world / batch), so
DistributedDataParallel's gradient average is the global batch's gradient and N processes take the
steps one would (up to float summation order; BatchNorm statistics stay per rank). This replaces
torch's DistributedSampler, which would change the batch composition and with it the results.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CTX = Context()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: torch.device) -> Context:
    """Join the process group when started by torchrun; returns the context (idempotent)."""
    global _CTX
    if not launched_by_torchrun():
        return _CTX
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    _CTX = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _CTX


def context() -> Context:
    return _CTX


def local_device(device: torch.device) -> torch.device:
    """With several GPUs per node, rank r uses cuda:LOCAL_RANK."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(n: int, ctx: Context = None) -> torch.Tensor:
    """Indices 0..n-1 that this rank owns (strided, so every rank gets a similar mix)."""
    ctx = ctx or _CTX
    return torch.arange(ctx.rank, n, ctx.world_size)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _CTX.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (a one-item list when single-process)."""
    if not _CTX.enabled:
        return [obj]
    out: List[Any] = [None] * _CTX.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _CTX.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _CTX.enabled:
        dist.barrier()


def shutdown() -> None:
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CTX = Context()
