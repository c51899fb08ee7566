"""The executor an engine's configuration asks for: this process alone for one rank, else the
other ranks started as processes of this node or as actors of a Ray cluster."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from r1serve.config import EngineConfig
from r1serve.errors import ModelLoadError
from r1serve.executor.executor import Executor, UniprocExecutor
from r1serve.executor.multiproc_executor import MultiprocExecutor
from r1serve.executor.ray_executor import RayExecutor


def start_executor(config: EngineConfig, model_path: Path, platform) -> Executor:
    """The ranks of the engine's tensor-parallel group, the others started."""
    if config.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    if dist.is_initialized():  # torch.distributed has one default group per process
        raise ModelLoadError("this process already runs a tensor-parallel engine (one per process); close it "
                             "first (LLM.close()), or use data_parallel_size for several in their own processes")
    if config.distributed_executor_backend == "ray":
        return RayExecutor(config, model_path, platform.dist_backend)
    return MultiprocExecutor(config, model_path, platform.dist_backend)
