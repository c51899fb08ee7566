"""Rank 0's side of a tensor-parallel group on one node: launch the other ranks as
processes, join their group, and tell apart a dead rank from a failed step.

The engine's own process is rank 0: it schedules, runs its shard's forward and samples.
Ranks 1..N-1 are `python -m r1serve.distributed.worker` processes (not multiprocessing
children: the engine may itself run in a daemonic process, which may have none), each
reading its WorkerSpec from its stdin. Ray places the same workers on other nodes
(ray_executor.py).
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import torch.distributed as dist

from r1serve.config import EngineConfig
from r1serve.distributed.step_broadcast import StepBroadcast
from r1serve.distributed.tensor_parallel import TensorParallel
from r1serve.distributed.worker import WorkerSpec, agree_loaded, join_group
from r1serve.errors import ModelLoadError, RankFailedError

log = logging.getLogger("r1serve.distributed")


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


def start_executor(config: EngineConfig, model_path: Path, platform) -> Executor | None:
    """The other ranks of a tensor-parallel group, started (None for one rank)."""
    if config.tensor_parallel_size == 1:
        return None
    if dist.is_initialized():  # torch.distributed has one default group per process
        raise ModelLoadError("this process already runs a tensor-parallel engine (one per process); close it "
                             "first (LLM.close()), or use data_parallel_size for several in their own processes")
    if config.distributed_executor_backend == "ray":
        from r1serve.distributed.ray_executor import RayExecutor

        return RayExecutor(config, model_path, platform.dist_backend)
    return MultiprocExecutor(config, model_path, platform.dist_backend)


class Executor(ABC):
    """What rank 0 does with the other ranks, however they were launched: set up by a
    subclass (tp, steps, threads, size) that also says which ranks died."""

    size: int
    serving = False  # every rank loaded: the workers now wait for steps
    tp: TensorParallel
    steps: StepBroadcast
    threads: int

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


class MultiprocExecutor(Executor):
    """Ranks 1..N-1 as processes of this node; this process is rank 0."""

    def __init__(self, config: EngineConfig, model_path: Path, backend: str) -> None:
        self.size = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self.threads = threads = threads_per_rank(config)
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, self.size):
            spec = WorkerSpec(config, Path(model_path), rank, self.size, init_method, threads,
                              logging.getLogger().getEffectiveLevel())
            self.procs.append(_launch(spec))
        try:
            self.host_group, self.tp = join_group(WorkerSpec(config, Path(model_path), 0, self.size, init_method,
                                                            threads), backend)
        except Exception as exc:  # a worker died before joining, or the group timed out
            for proc in self.procs:
                _stop(proc, 0.0)
            raise ModelLoadError(f"the tensor-parallel group of {self.size} ranks did not form: {exc}") from exc
        self.steps = StepBroadcast(self.host_group)
        self._stopped = False

    def dead_ranks(self) -> list[str]:
        return [f"rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs, 1) if p.poll() is not None]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every worker (told to, then killed if it lingers) and leave the group."""
        if self._stopped:
            return
        self._stopped = True
        if not self.serving:
            pass  # they left after the load failed (or never got that far: their stdin closes)
        elif self.dead_ranks():
            # The group is broken: the ranks still alive wait in a collective that will not
            # complete (until distributed_timeout_s); nothing they hold is worth waiting for.
            timeout = 0.0
        else:
            try:
                self.steps.send(None)
            except Exception:  # a rank died just now
                timeout = 0.0
        for proc in self.procs:
            _stop(proc, timeout)
        if dist.is_initialized():
            dist.destroy_process_group()


def _launch(spec: WorkerSpec) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "r1serve.distributed.worker"], stdin=subprocess.PIPE)
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.flush()  # left open: its closing tells the worker we are gone
    return proc


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if timeout:
            log.warning("a tensor-parallel worker (pid %d) did not exit within %.0f s; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait(5)
    if proc.stdin:
        proc.stdin.close()
