"""What every rank runs, rank 0 included: its shard of the model on its platform, and its
paged KV cache. Rank 0's engine drives its Worker through the model runner; the other ranks'
(worker_process.py) run the steps rank 0 broadcasts."""
from __future__ import annotations

from pathlib import Path

import torch

from r1serve.config import EngineConfig
from r1serve.executor.mtp_pass import run_mtp
from r1serve.executor.step_inputs import StepInputs
from r1serve.layers.moe import DeepseekMoE
from r1serve.models.loader import LoadedModel, load_model
from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.platforms.base import Platform


class Worker:
    def __init__(self, config: EngineConfig, model_path: Path, platform: Platform,
                 tp: TensorParallel = TensorParallel()) -> None:
        self.config, self.platform = config, platform
        self.loaded: LoadedModel = load_model(model_path, platform, config, tp)
        self.kv_spec = self.loaded.model.kv_cache_spec()  # per-head K/V, or MLA's one latent per token
        self.kv_dtype = platform.resolve_kv_cache_dtype(config.kv_cache_dtype, self.loaded.model, self.loaded.dtype)
        self.kv_caches: list[torch.Tensor] = []

    def experts_held(self) -> tuple[int, int] | None:
        """The routed experts [first, end) this rank holds (None: the model has no MoE layers)."""
        moe = next((m for m in self.loaded.model.modules() if isinstance(m, DeepseekMoE)), None)
        return tuple(moe.experts) if moe is not None else None

    @property
    def kv_bytes_per_block(self) -> int:
        return self.kv_spec.bytes_per_token(self.kv_dtype) * self.config.block_size

    def kv_blocks_wanted(self) -> int:
        """The cache's blocks: num_kv_blocks, else as many as kv_cache_memory_gib holds (the
        same on every rank: each holds the same share of every block)."""
        c = self.config
        return c.num_kv_blocks or max(2, int(c.kv_cache_memory_gib * 2**30 // self.kv_bytes_per_block))

    def allocate_kv(self, num_blocks: int) -> list[torch.Tensor]:
        """One cache per layer the model caches for (its MTP layer's included)."""
        shape = self.kv_spec.layer_shape(num_blocks, self.config.block_size)
        self.kv_caches = [self.platform.zeros(shape, self.kv_dtype) for _ in range(self.kv_spec.num_layers)]
        return self.kv_caches

    @torch.inference_mode()
    def serve_steps(self, steps) -> None:
        """A rank other than 0: run each step (and MTP pass) rank 0 broadcasts, whose
        collectives pair with rank 0's, until None."""
        model, device = self.loaded.model, self.platform.device
        last_hidden = None  # the last target step's hidden states, for the MTP pass after it
        while (message := steps.recv()) is not None:
            if isinstance(message, StepInputs):
                input_ids, positions, meta, rows = message.tensors(device)
                last_hidden = model(input_ids, positions, self.kv_caches, meta)
                if rows is not None:
                    model.compute_logits(last_hidden[rows])  # this rank's vocabulary slice, gathered to rank 0
            else:
                run_mtp(model, message, last_hidden, self.kv_caches[-1], device)
