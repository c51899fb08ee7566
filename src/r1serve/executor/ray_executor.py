"""Rank 0's side of a tensor-parallel group whose other ranks are actors of a Ray cluster:
the same workers as MultiprocExecutor's (worker_process.run_worker), placed by Ray across nodes.

    ray start --head                          # on the first node (the one that runs r1serve)
    ray start --address=HEAD_IP:6379          # on every other node
    r1serve serve MODEL -tp 16 --distributed-executor-backend ray

The driver (this process) is rank 0 and hosts the group's TCP store on its node's address;
ranks 1..N-1 are one actor each, in a placement group of one bundle per rank (PACK: as few
nodes as fit). On CUDA, rank 0's own GPU is reserved too, in a bundle pinned to this node.
Actors whose owner dies are killed by Ray, so no rank outlives the engine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch.distributed as dist

from r1serve.config import EngineConfig
from r1serve.executor.executor import Executor, free_port, threads_per_rank
from r1serve.executor.step_broadcast import StepBroadcast
from r1serve.executor.worker_process import WorkerSpec, join_group, run_worker
from r1serve.errors import ModelLoadError

log = logging.getLogger("r1serve.executor")


class RankActor:
    """One rank in a Ray worker process (made a remote class by RayExecutor)."""

    def node(self) -> tuple[str, str]:
        """(IP address, Ray node id) of the node this actor runs on."""
        import ray

        return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()

    def run(self, spec: WorkerSpec) -> None:
        logging.basicConfig(level=spec.log_level,
                            format=f"%(asctime)s %(levelname)s rank{spec.rank} %(name)s: %(message)s")
        try:
            run_worker(spec)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def connect_ray():
    """The cluster `ray start` made (RAY_ADDRESS, or the one on this node), else a local one."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        except ConnectionError:
            log.warning("no Ray cluster to connect to (RAY_ADDRESS, `ray start`); starting one on this node")
            ray.init()
    return ray


class RayExecutor(Executor):
    """Ranks 1..N-1 as Ray actors; this process is rank 0."""

    def __init__(self, config: EngineConfig, model_path: Path, backend: str) -> None:
        ray = connect_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray, self._remove_pg = ray, remove_placement_group
        self.size = config.tensor_parallel_size
        self.threads = threads = threads_per_rank(config)
        gpu = backend != "gloo"
        ip = ray.util.get_node_ip_address()
        per_rank = {"GPU": 1, "CPU": 1} if gpu else {"CPU": threads}
        bundles = [dict(per_rank) for _ in range(1, self.size)]
        if gpu:  # rank 0's device, on this node
            bundles.insert(0, {"GPU": 1, f"node:{ip}": 0.001})
        self.pg = placement_group(bundles, strategy="PACK")
        timeout = config.distributed_timeout_s
        if not self.pg.wait(timeout):
            remove_placement_group(self.pg)
            raise ModelLoadError(f"the Ray cluster has no room for {self.size - 1} more rank(s) of {per_rank} "
                                 f"within {timeout:.0f} s (cluster resources: {ray.cluster_resources()})")
        actor_cls = ray.remote(RankActor)
        first = 1 if gpu else 0
        self.actors = [actor_cls.options(num_cpus=per_rank["CPU"], num_gpus=per_rank.get("GPU", 0),
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(
                                             self.pg, placement_group_bundle_index=first + i)).remote()
                       for i in range(self.size - 1)]
        # Every rank's (IP, node id), rank 0's first.
        self.nodes = [(ip, ray.get_runtime_context().get_node_id())] + ray.get([a.node.remote() for a in self.actors])
        init_method = f"tcp://{ip}:{free_port()}"
        self.runs = [a.run.remote(WorkerSpec(config, Path(model_path), rank, self.size, init_method, threads,
                                             logging.getLogger().getEffectiveLevel()))
                     for rank, a in enumerate(self.actors, 1)]
        self.host_group, self.tp = join_group(WorkerSpec(config, Path(model_path), 0, self.size, init_method,
                                                        threads), backend)
        self.steps = StepBroadcast(self.host_group)
        self._stopped = False
        log.info("tensor-parallel ranks on Ray nodes %s", [node for node, _ in self.nodes])

    def where(self, rank: int) -> str:
        return f"rank {rank} (Ray node {self.nodes[rank][0]})"

    def dead_ranks(self) -> list[str]:
        done, _ = self._ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        dead = []
        for rank, ref in enumerate(self.runs, 1):
            if ref in done:
                try:
                    self._ray.get(ref)
                    why = "returned"
                except Exception as exc:
                    why = type(exc).__name__
                dead.append(f"{self.where(rank)} ({why})")
        return dead

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.serving and not self.dead_ranks():
            try:
                self.steps.send(None)
                self._ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
            except Exception:
                pass
        for actor in self.actors:
            self._ray.kill(actor)
        self._remove_pg(self.pg)
        if dist.is_initialized():
            dist.destroy_process_group()
