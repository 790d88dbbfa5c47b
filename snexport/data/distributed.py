"""One process, or one rank of several under torchrun: who am I, how do ranks exchange results, how many threads.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the rendezvous address) in every worker.
Without them this is a plain single process: nothing here imports torch.distributed, and every exchange is the
identity. Under torchrun the ranks join one process group (gloo on CPU, nccl with CUDA) and exchange picklable
Python objects; every rank must call every exchange the same number of times (a collective behind ``if rank == 0``
hangs the others until the timeout).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

from snexport.errors import SnexportError

# A peer that dies closes its socket, which fails the others' pending collective at once; the timeout only ends a
# wait for a peer that is alive but stuck. It must exceed the longest honest wait between two exchanges: one rank
# still running a configuration over the whole validation set (DeiT-B over ImageNet-val on a CPU: about an hour).
# torch's default is 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(hours=3)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Rank 0 (or a plain process): the one that writes files and prints results."""
    return dist_info()[0] == 0


def threads_per_rank() -> int:
    """This machine's usable cores shared evenly among the ranks on it (torchrun's own default is 1 thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return max(1, cores // max(1, local_world))


@dataclass
class Ranks:
    """This process's place among the ranks, and the exchanges between them (identities for a single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    use_cuda: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        """Where this rank computes: its own GPU under torchrun with CUDA, else the GPU if any, else the CPU."""
        if self.world > 1:
            return f"cuda:{self.local_rank}" if self.use_cuda else "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (the others' argument is ignored)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """`fn()` run on rank 0 alone, its value on every rank.

        A SnexportError it raises is raised on every rank, so each ends with the same one-line message instead of
        the peers failing on a closed connection.
        """
        if self.world == 1:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = (True, fn())
            except SnexportError as exc:
                outcome = (False, exc)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, indexed by rank, on every rank (objects may differ in size; pickled)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered


@contextlib.contextmanager
def joined_ranks(timeout: timedelta = COLLECTIVE_TIMEOUT) -> Iterator[Ranks]:
    """Join torchrun's process group for the duration (or reuse one a caller opened); a plain process gets rank 0 of 1.

    Each rank computes with `threads_per_rank()` threads, so N ranks on one machine do not oversubscribe its cores.
    """
    rank, world, local_rank = dist_info()
    if world == 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)  # nccl's object collectives use the current device
    torch.set_num_threads(threads_per_rank())
    opened_here = not dist.is_initialized()
    if opened_here:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
    ok = False
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local_rank, use_cuda)
        ok = True
    finally:
        if opened_here:
            if ok:
                dist.barrier()  # nobody tears the group down while a peer still waits on it
            dist.destroy_process_group()
