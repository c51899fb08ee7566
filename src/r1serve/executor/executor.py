"""What rank 0 does with the other ranks of its tensor-parallel group, however they were
launched (UniprocExecutor: there are none; as processes of this node, multiproc_executor.py;
as Ray actors, ray_executor.py): agree that every rank loaded, share the KV cache's size,
broadcast each step, and tell apart a dead rank from a failed step."""
from __future__ import annotations

import os
import socket
import time
from abc import ABC, abstractmethod

from r1serve.config import EngineConfig
from r1serve.errors import ModelLoadError, RankFailedError
from r1serve.executor.step_broadcast import StepBroadcast
from r1serve.executor.worker_process import agree_loaded
from r1serve.parallel.tensor_parallel import TensorParallel

def threads_per_rank(config: EngineConfig) -> int:
    """num_threads, or this node's cores shared among its ranks (more would make the ranks'
    thread pools fight for the cores, and every collective wait on the slowest)."""
    if config.num_threads:
        return config.num_threads
    return max(1, len(os.sched_getaffinity(0)) // config.tensor_parallel_size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Executor(ABC):
    """What rank 0 does with the other ranks, however they were launched: set up by a
    subclass (tp, steps, threads, size) that also says which ranks died."""

    size: int
    serving = False  # every rank loaded: the workers now wait for steps
    tp: TensorParallel
    steps: StepBroadcast | None  # None: no other rank to send steps to
    threads: int | None  # the thread pool of each rank (None: torch's own choice)

    def where(self, rank: int) -> str:
        """Where a rank runs, for messages (the node, when that tells something)."""
        return f"rank {rank}"

    @abstractmethod
    def dead_ranks(self) -> list[str]:
        """The ranks that have exited, described for a message."""

    def agree_loaded(self, error: BaseException | None) -> None:
        """Every rank says whether it loaded; raises if any did not (rank 0's own error as it is)."""
        errors = agree_loaded(error, self.size)
        self.serving = not any(errors)  # else every worker has left already
        if error is not None:
            raise error
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            rank, message = failed[0]
            raise ModelLoadError(f"{self.where(rank)} of {self.size} failed to load its shard: {message}")

    def share_kv_blocks(self, num_kv_blocks: int) -> None:
        self.steps.send_object(num_kv_blocks)

    def failure(self, exc: BaseException) -> RankFailedError:
        """What a failed collective means: which ranks died (waiting briefly for their exit
        to be seen), or the collective's own error."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not self.dead_ranks():
            time.sleep(0.05)
        dead = self.dead_ranks()
        if dead:
            return RankFailedError(f"tensor-parallel {', '.join(dead)} exited; the engine stopped "
                                   f"(restart it to serve again)")
        return RankFailedError(f"a tensor-parallel step failed ({type(exc).__name__}: {exc}); "
                               "the ranks are out of step and the engine stopped")


class UniprocExecutor(Executor):
    """One rank, this process: nothing to agree on, share or broadcast."""

    size = 1

    def __init__(self, config: EngineConfig) -> None:
        self.tp, self.steps, self.threads = TensorParallel(), None, config.num_threads

    def dead_ranks(self) -> list[str]:
        return []

    def agree_loaded(self, error: BaseException | None) -> None:
        if error is not None:
            raise error
        self.serving = True

    def share_kv_blocks(self, num_kv_blocks: int) -> None:
        pass

    def shutdown(self) -> None:
        pass
