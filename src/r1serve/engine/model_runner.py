"""Turns a SchedulerOutput into tensors, runs the model, and samples."""
from __future__ import annotations

import torch

from r1serve.engine.sampler import SampleResult, Sampler
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.distributed.step_broadcast import StepBroadcast
from r1serve.models.step_inputs import StepInputs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, ranks: StepBroadcast | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches  # per layer: (2, num_blocks, block_size, Hkv, D)
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(on_device=device.type == "cuda")  # a GPU: no host sync per sampled request
        # On cuda: replays captured graphs for decode steps (engine/cuda_graph_runner.py).
        self.decode_graphs = None
        # Under tensor parallelism: sends each step's inputs to the other ranks, which run
        # the same forward (distributed/worker.py); this rank then samples alone.
        self.ranks = ranks

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, masks=None) -> tuple[SampleResult, list[str]]:
        """Returns the sampled tokens and the ids of the requests they belong to. masks: the
        step's grammar masks, to wait for only after the forward pass (Sampler)."""
        sampling = [c.request for c in output.chunks if c.samples]
        logits = self._forward(self._inputs(output, all_rows=False))
        if logits is None:
            return SampleResult([], []), []
        return self.sampler(logits, sampling, masks), [r.request_id for r in sampling]

    @torch.inference_mode()
    def idle_step(self) -> None:
        """DP attention: this replica has nothing to run, the others do (distributed/replica_group.py)."""
        self.model.idle_step()

    def compute_logits(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits of every scheduled token (N, vocab): for tests against a reference model."""
        with torch.inference_mode():
            return self._forward(self._inputs(output, all_rows=True))

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits of the inputs' logits rows (None if there are none); every rank runs it."""
        if self.ranks is not None:
            self.ranks.send(inputs)
        input_ids, positions, meta, rows = inputs.tensors(self.device)
        forward = self.model if self.decode_graphs is None else self.decode_graphs
        hidden = forward(input_ids, positions, self.kv_caches, meta)  # (N, hidden)
        return None if rows is None else self.model.compute_logits(hidden[rows])  # (B_sample, vocab)

    def _inputs(self, output: SchedulerOutput, all_rows: bool) -> StepInputs:
        ids, pos, slots, q_lens, s_lens, logits_rows = [], [], [], [], [], []
        bs = self.block_size
        for chunk in output.chunks:
            ids += chunk.request.token_ids[chunk.start:chunk.end]
            positions = range(chunk.start, chunk.end)
            pos += positions
            slots += [chunk.block_table[p // bs] * bs + p % bs for p in positions]
            q_lens.append(chunk.num_tokens)
            s_lens.append(chunk.end)
            if chunk.samples:
                logits_rows.append(len(ids) - 1)
        if all_rows:
            logits_rows = list(range(len(ids)))
        return StepInputs(ids, pos, slots, q_lens, s_lens, block_tables(output.chunks), bs, logits_rows or None)


def block_tables(chunks) -> torch.Tensor:
    """(B, max_blocks) int64, padded with 0: each chunk's block ids copied in at C speed (a
    Python list of a long context's ids would cost ~30 ns per block every step)."""
    tables = torch.zeros(len(chunks), max(len(c.block_table) for c in chunks), dtype=torch.int64)
    for row, chunk in zip(tables, chunks):
        if len(chunk.block_table):
            row[:len(chunk.block_table)] = torch.frombuffer(chunk.block_table, dtype=torch.int64)
    return tables
