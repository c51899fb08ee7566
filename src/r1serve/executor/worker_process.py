"""A tensor-parallel rank other than 0, as a process: join the group, bring up its Worker
(this rank's shard and KV cache), then run every step rank 0 broadcasts, until it broadcasts
None.

    rank 0 (the engine's process)            rank r (this module, one process each)
    ------------------------------           -------------------------------------
    start the workers, join the group  <-->  join the group
    load shard 0                             load shard r
    all_gather_object(load error)      <-->  all_gather_object(load error)
    broadcast num_kv_blocks            --->  allocate the same KV cache
    per step: broadcast StepInputs     --->  the same forward; its collectives pair up
              forward, sample                (the logits gather to rank 0)
    broadcast None                     --->  exit

A worker leaves when told to, when rank 0's process dies (the group's connections close
and the next collective raises), or when its stdin closes (the parent that launched it
is gone), so no rank outlives the engine.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from r1serve.config import EngineConfig
from r1serve.parallel.process_group import gather_sum_bytes, init_group
from r1serve.parallel.tensor_parallel import TensorParallel

log = logging.getLogger("r1serve.executor")


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank needs to join its group and load its shard (pickled to its stdin)."""

    config: EngineConfig
    model_path: Path
    rank: int
    world_size: int
    init_method: str  # tcp://host:port of rank 0's store
    num_threads: int
    log_level: int = logging.WARNING


def join_group(spec: WorkerSpec, backend: str) -> tuple[object, TensorParallel]:
    """A rank of a tensor-parallel group joins it: (the gloo group for host data, its place)."""
    host = init_group(spec.init_method, spec.rank, spec.world_size, backend, spec.config.distributed_timeout_s)
    return host, TensorParallel(spec.rank, spec.world_size, dist.group.WORLD, spec.config.expert_parallel,
                                gather_sum_bytes(backend))


def agree_loaded(error: BaseException | None, world_size: int) -> list[str | None]:
    """Every rank's load error (None: loaded), gathered on every rank."""
    errors: list[str | None] = [None] * world_size
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    return errors


def run_worker(spec: WorkerSpec) -> None:
    # Imported here: the module is also the entry point, and these pull in the whole model stack.
    from r1serve.executor.step_broadcast import StepBroadcast
    from r1serve.executor.worker import Worker
    from r1serve.platforms import get_platform

    platform = get_platform(spec.config)
    torch.set_num_threads(spec.num_threads)
    if platform.device.type == "cuda":
        torch.cuda.set_device(spec.rank % torch.cuda.device_count())
    host_group, tp = join_group(spec, platform.dist_backend)
    worker, error = None, None
    try:
        worker = Worker(spec.config, spec.model_path, platform, tp)
    except Exception as exc:
        error = exc
    if any(agree_loaded(error, spec.world_size)):
        return  # rank 0 reports which rank failed, and why
    steps = StepBroadcast(host_group)
    worker.allocate_kv(steps.recv_object())  # the number of blocks rank 0 chose
    worker.serve_steps(steps)


def _exit_when_stdin_closes() -> None:
    # The launching process holds our stdin's other end; EOF means it is gone. os.read, not
    # sys.stdin: a daemon thread blocked inside a buffered reader aborts interpreter exit.
    while os.read(0, 1 << 16):
        pass
    os._exit(0)


def main() -> None:
    spec: WorkerSpec = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_when_stdin_closes, name="r1serve-stdin-watch", daemon=True).start()
    try:
        run_worker(spec)
    except Exception as exc:  # rank 0 sees the group's connection close and names this rank
        log.error("rank %d stopped: %s: %s", spec.rank, type(exc).__name__, exc)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
