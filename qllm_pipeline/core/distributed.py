"""Data parallelism under `torchrun` (torch.distributed): which calibration windows this process owns, the few
collectives the stages reduce with, and a cache that exactly one rank writes.

One job, N processes (`torchrun --nproc_per_node=N -m qllm_pipeline ...`; NCCL on GPUs, one rank per device; gloo on
CPUs). Every rank runs every stage on its own windows; what a stage computes over windows is reduced (channel maxima:
max; Hessians, NLL and loss sums: sum; gradients: sum of the owners' shares), so every rank reaches the same artifact.
Rank 0 writes it under the key's lock; the others wait and read it back, so each rank goes on from the same bytes.
Without torchrun the world is one process and every helper here is the identity.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from qllm_pipeline.core.cache import Artifact, ArtifactCache, ArtifactWriter
from qllm_pipeline.core.scratch import scratch_prefix

log = logging.getLogger(__name__)

# A rank may wait this long for another (rank 0 writing a 70B block's artifact, one rank's last batch).
TIMEOUT = timedelta(hours=2)
_COLLECTIVE_SECONDS = [0.0]


def collective_seconds() -> float:
    """Seconds this process spent in collectives: moving data, and waiting for the slowest rank (imbalance)."""
    return _COLLECTIVE_SECONDS[0]


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if not self.active:
            return fn(self, *args, **kwargs)
        start = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            _COLLECTIVE_SECONDS[0] += time.perf_counter() - start

    return wrapper


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, number of ranks, rank on this node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes artifacts, results and logs; the others compute beside it."""
        return self.rank == 0

    # -- which windows this rank owns ------------------------------------------------------------------------------
    def shard(self, n: int, batch_size: int) -> slice:
        """This rank's windows of n: contiguous and in whole batches of `batch_size` (so each batch is the batch one
        process would run, and sums over batches see the same numbers), the batches dealt as evenly as they go."""
        batches = -(-n // batch_size)
        first = batches * self.rank // self.size
        last = batches * (self.rank + 1) // self.size
        return slice(min(first * batch_size, n), min(last * batch_size, n))

    def shards(self, n: int, batch_size: int) -> list[slice]:
        return [World(r, self.size).shard(n, batch_size) for r in range(self.size)]

    # -- collectives (identity in a world of one) ------------------------------------------------------------------
    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor where the backend can reduce it (NCCL: this rank's GPU; gloo: the CPU)."""
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return tensor.to(device)

    @_timed
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce `tensor` in place over the ranks (op "sum" or "max") and return it."""
        if not self.active:
            return tensor
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        buffer = self._comm(tensor)
        torch.distributed.all_reduce(buffer, op=ops[op])
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    @_timed
    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """rank `src`'s `obj` on every rank (a decision one rank takes for all: what is cached, what to compute)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    @_timed
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    @_timed
    def gather_windows(self, local: torch.Tensor, n: int, batch_size: int, count: int | None = None) -> torch.Tensor:
        """The first `count` (all when None) of the n windows, on every rank, from the shards the ranks hold
        (`local` is this rank's, `shard(n, batch_size)` of them)."""
        count = n if count is None else min(count, n)
        if not self.active:
            return local[:count]
        parts = []
        for rank, part in enumerate(self.shards(n, batch_size)):
            take = max(0, min(part.stop, count) - part.start)
            if take == 0:
                continue
            piece = local[:take] if rank == self.rank else torch.empty((take, *local.shape[1:]), dtype=local.dtype)
            buffer = self._comm(piece.contiguous())
            torch.distributed.broadcast(buffer, src=rank)
            parts.append(buffer.to(local.device))
        return torch.cat(parts)

    @_timed
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


class Ownership:
    """Which of a data-parallel job's windows this rank holds (a contiguous run of them), for a loop over the job's
    windows in a shared order (a training epoch's shuffle): each rank takes the windows it holds of every step."""

    def __init__(self, world: World, local_count: int):
        counts = world.gather_objects(int(local_count))
        self.world, self.start, self.count, self.total = world, sum(counts[: world.rank]), int(local_count), sum(counts)

    @classmethod
    def of(cls, world: World, part: slice, total: int) -> "Ownership":
        """This rank holds windows `part` of `total` (windows every rank holds whole, each computing its part)."""
        owned = cls.__new__(cls)
        owned.world, owned.start, owned.count, owned.total = world, part.start, part.stop - part.start, total
        return owned

    def local(self, index: torch.Tensor) -> torch.Tensor:
        """The rows of this rank's windows among the job's windows `index`, in their order."""
        mine = index[(index >= self.start) & (index < self.start + self.count)]
        return mine - self.start

    def sum_grads_(self, params: list[torch.Tensor]) -> None:
        """Add up every rank's gradients of `params` (a rank without windows in the step adds zeros), in one message."""
        if not self.world.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.world.all_reduce_(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = chunk.view_as(p).clone()

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (float64)."""
        if not self.world.active:
            return value
        return float(self.world.all_reduce_(torch.tensor([value], dtype=torch.float64)).item())


_WORLD = World()


def world() -> World:
    """The world this process belongs to (a world of one unless `init_from_env` joined a torchrun job)."""
    return _WORLD


def adopt_submitit_tasks() -> None:
    """In a job of Hydra's submitit launcher with several tasks (tasks_per_node × nodes), each task is a rank: set
    the environment torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from submitit's."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # rank r: cuda:r


def env_world() -> World:
    """The place torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) gives this process, before joining the job."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: torch.device) -> World:
    """Join the torchrun job described by the environment (and MASTER_ADDR/PORT): NCCL when the run is on CUDA
    (`device` is this rank's GPU), gloo on the CPU. A world of one without torchrun."""
    global _WORLD
    place = env_world()
    if not place.active:
        return _WORLD
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # once per process: several runs in one process share the group
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(shutdown)
    _WORLD = place
    return _WORLD


def shutdown() -> None:
    global _WORLD
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _WORLD = World()


class SharedCache(ArtifactCache):
    """The artifact cache of a data-parallel job: every rank computes (the stages' collectives need all of them),
    rank 0 alone writes, under the key's lock, and decides for all whether a key is cached, so the ranks never take
    different paths; after a write the ranks meet, and the others read what rank 0 wrote."""

    def __init__(self, root, world: World):
        super().__init__(root)
        self.world = world

    def clean_partial(self) -> int:
        return super().clean_partial() if self.world.is_writer else 0

    def produce(self, stage: str, key: str, compute: Callable[[ArtifactWriter], Any], force: bool = False,
                collective: bool = True) -> tuple[Artifact, bool]:
        """`ArtifactCache.produce` for the job: `collective=False` for a compute that needs no other rank (writing
        the model): the others skip it and wait."""
        lock = self.lock(stage, key) if self.world.is_writer else None
        found = None
        if lock is not None:
            lock.acquire()  # held from the decision to the write: another job cannot slip in between
            found = None if force else self.get(stage, key)
        try:
            if self.world.broadcast_object(found is not None):
                return (found if found is not None else self.get(stage, key)), False
            if self.world.is_writer:
                self._write(stage, key, compute, replace=force)
            elif collective:
                _scratch(compute)
        finally:
            if lock is not None and lock.is_locked:
                lock.release()
        self.world.barrier()
        return self.get(stage, key), True

    def put(self, stage: str, key: str, write: Callable[[ArtifactWriter], Any], replace: bool = False,
            lock: bool = True) -> Artifact:
        """Content every rank computed jointly: rank 0 writes it; the ranks meet, then read it."""
        if self.world.is_writer:
            super().put(stage, key, write, replace, lock)
        self.world.barrier()
        return self.get(stage, key)

    def locked(self, stage: str, keys: list[str]):
        return super().locked(stage, keys) if self.world.is_writer else contextlib.nullcontext()


def _scratch(compute: Callable[[ArtifactWriter], Any]) -> None:
    """Run `compute` into a throwaway writer (a rank that is not rank 0 computes its part; rank 0 writes)."""
    with tempfile.TemporaryDirectory(prefix=scratch_prefix()) as tmp:
        writer = ArtifactWriter(Path(tmp) / "artifact")
        try:
            compute(writer)
        finally:
            writer.abort()
