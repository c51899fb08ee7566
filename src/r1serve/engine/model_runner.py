"""Turns a SchedulerOutput into tensors, runs the model, and samples."""
from __future__ import annotations

import torch

from r1serve.engine.sampler import SampleResult, Sampler
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.kernels.attention_metadata import AttentionMetadata


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches  # per layer: (2, num_blocks, block_size, Hkv, D)
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(on_device=device.type == "cuda")  # a GPU: no host sync per sampled request
        # On cuda: replays captured graphs for decode steps (engine/cuda_graph_runner.py).
        self.decode_graphs = None

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> tuple[SampleResult, list[str]]:
        """Returns the sampled tokens and the ids of the requests they belong to."""
        input_ids, positions, meta, logits_idx = self._prepare(output)
        forward = self.model if self.decode_graphs is None else self.decode_graphs
        hidden = forward(input_ids, positions, self.kv_caches, meta)  # (N, hidden)
        sampling = [c.request for c in output.chunks if c.samples]
        if not sampling:
            return SampleResult([], []), []
        logits = self.model.compute_logits(hidden[logits_idx])  # (B_sample, vocab)
        return self.sampler(logits, sampling), [r.request_id for r in sampling]

    def compute_logits(self, output: SchedulerOutput) -> torch.Tensor:
        """Logits of every scheduled token (N, vocab): for tests against a reference model."""
        with torch.inference_mode():
            input_ids, positions, meta, _ = self._prepare(output)
            return self.model.compute_logits(self.model(input_ids, positions, self.kv_caches, meta))

    def _prepare(self, output: SchedulerOutput):
        ids, pos, slots, q_lens, s_lens, logits_idx = [], [], [], [], [], []
        bs = self.block_size
        for chunk in output.chunks:
            ids += chunk.request.token_ids[chunk.start:chunk.end]
            positions = range(chunk.start, chunk.end)
            pos += positions
            slots += [chunk.block_table[p // bs] * bs + p % bs for p in positions]
            q_lens.append(chunk.num_tokens)
            s_lens.append(chunk.end)
            if chunk.samples:
                logits_idx.append(len(ids) - 1)
        dev = self.device
        meta = AttentionMetadata.build(q_lens, s_lens, torch.tensor(slots, device=dev),
                                       block_tables(output.chunks).to(dev), bs)
        return (torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta,
                torch.tensor(logits_idx, device=dev, dtype=torch.long))


def block_tables(chunks) -> torch.Tensor:
    """(B, max_blocks) int64, padded with 0: each chunk's block ids copied in at C speed (a
    Python list of a long context's ids would cost ~30 ns per block every step)."""
    tables = torch.zeros(len(chunks), max(len(c.block_table) for c in chunks), dtype=torch.int64)
    for row, chunk in zip(tables, chunks):
        if len(chunk.block_table):
            row[:len(chunk.block_table)] = torch.frombuffer(chunk.block_table, dtype=torch.int64)
    return tables
