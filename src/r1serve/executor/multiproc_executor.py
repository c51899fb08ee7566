"""Ranks 1..N-1 of a tensor-parallel group as processes of this node.

The engine's own process is rank 0: it schedules, runs its shard's forward and samples.
Ranks 1..N-1 are `python -m r1serve.executor.worker_process` processes (not multiprocessing
children: the engine may itself run in a daemonic process, which may have none), each
reading its WorkerSpec from its stdin.
"""
from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from r1serve.config import EngineConfig
from r1serve.errors import ModelLoadError
from r1serve.executor.executor import Executor, free_port, threads_per_rank
from r1serve.executor.step_broadcast import StepBroadcast
from r1serve.executor.worker_process import WorkerSpec, join_group

log = logging.getLogger("r1serve.executor")


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
    proc = subprocess.Popen([sys.executable, "-m", "r1serve.executor.worker_process"], stdin=subprocess.PIPE)
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
