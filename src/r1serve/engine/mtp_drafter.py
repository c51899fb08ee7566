"""Drafting with DeepSeek-V3/R1's multi-token-prediction layer (models/deepseek_mtp.py).

Every step, after the target model ran, the MTP layer runs over each scheduled request's
newly computed positions p (the target's hidden state H[p] there, and the token t[p+1]
now known after it), writing its own KV cache entry at p: the layer attends over all of
them, as it was trained to. Its output at the request's last computed position (the one
before the last known token) is the draft of the token after the last known one. For
k > 1 drafts it is chained: the draft goes back in as t[p+1] at the next position, with
the layer's own output as H[p], k - 1 more decode passes batched over the requests.

Positions it wrote for a chain are overwritten by the next step's pass once the target has
verified them (or past the accepted end, later). With the prefix cache on, a hit's last
block is recomputed (KVCacheManager.lookahead_layers): the MTP entry at the last position
of a block was computed with the token after the block, which another request may not share.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from r1serve.engine.drafter import Drafter
from r1serve.engine.kv_cache_manager import KVCacheManager
from r1serve.engine.request import Request
from r1serve.engine.scheduler_output import SchedulerOutput
from r1serve.errors import ModelLoadError
from r1serve.executor.mtp_pass import MTPLogits, MTPPass, TargetRows
from r1serve.executor.step_inputs import StepInputs


@dataclass(frozen=True)
class MTPHead:
    position: int  # the position whose MTP output this is: it drafts the token at position + 2
    hidden: torch.Tensor  # (hidden,) the MTP layer's normalised output there


@dataclass(frozen=True)
class _Rows:
    """A batch of MTP rows: per sequence, tokens t[p+1] at consecutive positions p."""

    tables: list[array]  # (B,) block tables
    starts: list[int]  # (B,) first position
    token_ids: list[list[int]]  # (B, n_b)


class MTPDrafter(Drafter):
    def __init__(self, runner, kv: KVCacheManager) -> None:
        # The model runner runs each MTP pass on every rank (its mtp()): the MTP layer's own
        # cache is the last of the runner's.
        self.runner = runner
        self.kv = kv
        self._heads: dict[str, MTPHead] = {}

    @classmethod
    def for_engine(cls, runner, kv: KVCacheManager) -> MTPDrafter:
        if getattr(runner.model, "mtp", None) is None:
            raise ModelLoadError("speculative='mtp' needs the model loaded with its MTP layer")
        return cls(runner, kv)

    @torch.inference_mode()
    def after_step(self, output: SchedulerOutput) -> None:
        # H: the target step's hidden states, which the runner kept on every rank (keep_hidden).
        reqs, rows, src, offset = [], _Rows([], [], []), [], 0
        for chunk in output.chunks:
            req = chunk.request
            n = min(chunk.end, req.num_computed_tokens) - chunk.start  # positions the target kept
            if n > 0 and not req.finished:
                reqs.append(req)
                rows.tables.append(self.kv.block_table(req.request_id))
                rows.starts.append(chunk.start)
                rows.token_ids.append(req.token_ids[chunk.start + 1:chunk.start + n + 1])
                src += range(offset, offset + n)
            offset += chunk.num_tokens
        if not reqs:
            return
        out = self._forward(rows, TargetRows(src))  # (N, hidden)
        last = 0
        for req, start, ids in zip(reqs, rows.starts, rows.token_ids):
            last += len(ids)
            # A copy: a view would keep the whole step's output (a long prefill's) alive.
            self._heads[req.request_id] = MTPHead(start + len(ids) - 1, out[last - 1].clone())

    @torch.inference_mode()
    def propose(self, requests: list[Request], ks: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        live = []  # (index, head) of requests that draft
        for i, (req, k) in enumerate(zip(requests, ks)):
            head = self._heads.get(req.request_id)
            # Fresh: the head is at the position before the last known token.
            if k > 0 and head is not None and head.position == req.num_tokens - 2:
                live.append((i, head))
        if not live:
            return drafts
        hidden = torch.stack([h.hidden for _, h in live])  # (B, hidden)
        for step in range(max(ks[i] for i, _ in live)):
            tokens = self.runner.mtp(MTPLogits(hidden)).argmax(dim=-1).tolist()  # (B,)
            for (i, _), t in zip(live, tokens):
                drafts[i].append(t)
            keep = [j for j, (i, _) in enumerate(live) if len(drafts[i]) < ks[i] and self._reserve(requests[i], ks[i])]
            if not keep:
                break
            live = [live[j] for j in keep]
            reqs = [requests[i] for i, _ in live]
            rows = _Rows([self.kv.block_table(r.request_id) for r in reqs], [r.num_tokens - 1 + step for r in reqs],
                         [[drafts[i][-1]] for i, _ in live])
            hidden = self._forward(rows, hidden[torch.tensor(keep, device=hidden.device)])
        return drafts

    def forget(self, request_id: str) -> None:
        self._heads.pop(request_id, None)

    def head(self, request_id: str) -> MTPHead | None:
        """The request's latest MTP output (what its next draft comes from)."""
        return self._heads.get(request_id)

    def _reserve(self, req: Request, k: int) -> bool:
        """Cache slots for the chain's positions (up to num_tokens + k - 3), which the next
        step's verification would allocate anyway; False if blocks ran short."""
        return self.kv.allocate(req, k - 1)

    def _forward(self, rows: _Rows, previous: TargetRows | torch.Tensor) -> torch.Tensor:
        """The MTP layer over the rows, H[p] from the target step's rows or given."""
        bs, ids, pos, slots = self.kv.block_size, [], [], []
        for table, start, tokens in zip(rows.tables, rows.starts, rows.token_ids):
            positions = range(start, start + len(tokens))
            ids += tokens
            pos += positions
            slots += [table[p // bs] * bs + p % bs for p in positions]
        tables = torch.zeros(len(rows.tables), max(len(t) for t in rows.tables), dtype=torch.int64)
        for row, table in zip(tables, rows.tables):
            row[:len(table)] = torch.frombuffer(table, dtype=torch.int64)
        inputs = StepInputs(ids, pos, slots, [len(t) for t in rows.token_ids],
                            [s + len(t) for s, t in zip(rows.starts, rows.token_ids)], tables, bs, None)
        return self.runner.mtp(MTPPass(inputs, previous))
