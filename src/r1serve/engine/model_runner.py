"""Turns a SchedulerOutput into tensors, runs the model, and samples."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1serve.engine.sampler import Sampler
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.executor.step_broadcast import StepBroadcast
from r1serve.executor.mtp_pass import MTPLogits, MTPPass, run_mtp
from r1serve.executor.step_inputs import StepInputs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device, ranks: StepBroadcast | None = None, decode_graphs=None,
                 keep_hidden: bool = False) -> None:
        self.model = model
        self.kv_caches = kv_caches  # per layer: (2, num_blocks, block_size, Hkv, D)
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(on_device=device.type == "cuda")  # a GPU: no host sync per sampled request
        # On cuda: replays captured graphs for decode steps (engine/cuda_graph_runner.py).
        self.decode_graphs = decode_graphs
        # Under tensor parallelism: sends each step's inputs to the other ranks, which run
        # the same forward (executor/worker_process.py, Worker.serve_steps); this rank then samples alone.
        self.ranks = ranks
        # Speculative decoding's MTP drafter reads the step's last hidden states (N, hidden).
        self.keep_hidden = keep_hidden
        self.last_hidden: torch.Tensor | None = None

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, masks=None) -> StepResult:
        """The step's new tokens per sampling request. masks: the step's grammar masks, to
        wait for only after the forward pass (Sampler)."""
        sampling = [c for c in output.chunks if c.samples]
        logits = self._forward(self._inputs(output, all_rows=False))
        requests = [c.request for c in sampling]
        ids = [r.request_id for r in requests]
        if logits is None:
            return StepResult([], [], [])
        if not any(c.draft_token_ids for c in sampling):
            result = self.sampler(logits, requests, masks)
            lps = [None if lp is None else [lp] for lp in result.logprobs]
            return StepResult(ids, [[t] for t in result.token_ids], lps)
        verified = self.sampler.verify(logits, requests, [c.draft_token_ids for c in sampling], masks)
        return StepResult(ids, [v.token_ids for v in verified], [v.logprobs for v in verified])

    @torch.inference_mode()
    def mtp(self, message: MTPPass | MTPLogits) -> torch.Tensor:
        """An MTP pass or head (executor/mtp_pass.py), run by every rank: the MTP layer's
        output, or the whole logits."""
        if self.ranks is not None:
            self.ranks.send(message.on_host())
        return run_mtp(self.model, message, self.last_hidden, self.kv_caches[-1], self.device)

    @torch.inference_mode()
    def idle_step(self) -> None:
        """DP attention: this replica has nothing to run, the others do (executor/replica_group.py)."""
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
        if self.keep_hidden:
            self.last_hidden = hidden.clone() if forward is not self.model else hidden  # graphs reuse theirs
        return None if rows is None else self.model.compute_logits(hidden[rows])  # (B_sample, vocab)

    def _inputs(self, output: SchedulerOutput, all_rows: bool) -> StepInputs:
        ids, pos, slots, q_lens, s_lens, logits_rows = [], [], [], [], [], []
        bs = self.block_size
        # A decode step with drafts is laid out as one decode row per position (query length 1,
        # context up to that position, the same block table): causal attention over the
        # drafts is exactly that, and the batch stays decode-only, so it runs the decode
        # kernels (and CUDA graphs) at the cost of a few more rows, not a prefill.
        per_token = all(c.is_decode for c in output.chunks)
        for chunk in output.chunks:
            ids += chunk.token_ids
            positions = range(chunk.start, chunk.end)
            pos += positions
            slots += [chunk.block_table[p // bs] * bs + p % bs for p in positions]
            if per_token:
                q_lens += [1] * chunk.num_tokens
                s_lens += [p + 1 for p in positions]
            else:
                q_lens.append(chunk.num_tokens)
                s_lens.append(chunk.end)
            if chunk.samples:
                logits_rows += range(len(ids) - 1 - len(chunk.draft_token_ids), len(ids))
        if all_rows:
            logits_rows = list(range(len(ids)))
        tables = block_tables(output.chunks, [c.num_tokens if per_token else 1 for c in output.chunks])
        return StepInputs(ids, pos, slots, q_lens, s_lens, tables, bs, logits_rows or None)


@dataclass(frozen=True)
class StepResult:
    request_ids: list[str]  # the step's sampling requests, in batch order
    token_ids: list[list[int]]  # per request: its new tokens (one, or accepted drafts + one)
    logprobs: list[list | None]  # per request: {token_id: Logprob} per new token, or None


def block_tables(chunks, repeats: list[int]) -> torch.Tensor:
    """(sum(repeats), max_blocks) int64, padded with 0: each chunk's block ids copied in at C
    speed (a Python list of a long context's ids would cost ~30 ns per block every step),
    `repeats[i]` rows for chunk i."""
    tables = torch.zeros(sum(repeats), max(len(c.block_table) for c in chunks), dtype=torch.int64)
    row = 0
    for chunk, n in zip(chunks, repeats):
        if len(chunk.block_table):
            tables[row:row + n, :len(chunk.block_table)] = torch.frombuffer(chunk.block_table, dtype=torch.int64)
        row += n
    return tables
