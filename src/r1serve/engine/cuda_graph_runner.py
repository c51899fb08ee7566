"""CUDA graphs for decode steps: one captured forward per batch size, replayed with the step's
inputs copied into static buffers.

A decode step of a small model, or of R1 at a few sequences, launches hundreds of small
kernels; from Python each launch costs a few microseconds, more than the kernel runs. A
graph replays the whole forward in one launch. Graphs fix every shape and address, so:

- a batch of n sequences runs the graph of the next captured size (1, 2, 4, 8, 16, ...),
  its rows n.. padded: token 0 at position 0, cache slot -1 (the Triton cache writes skip
  negative slots), context length 1 on block 0 (read, never written; the rows are dropped);
- the inputs live in buffers allocated once at the largest size, block tables as wide as
  max_model_len needs; the captured metadata views them, so the kernels read each step's
  values from the same addresses;
- what would break capture (a prefill step, a batch above the largest size) runs eagerly,
  and so does everything when capture fails (a twin with a host sync, say), with a warning.

Selected only on cuda with the Triton kernels, and not under `--enforce-eager`. The
padding and bucketing logic here is plain torch and tested on the CPU; `capture` is
injected, so a test can stand in for torch.cuda.graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from r1serve.kernels.attention_metadata import AttentionMetadata

log = logging.getLogger("r1serve.engine")

MAX_CAPTURE_SIZE = 512  # graphs above this cost more memory than their launches save
PAD_SLOT = -1

# capture(fn) -> (replay, output): runs fn under capture once; replay() reruns it in place.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], None], torch.Tensor]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every 8 up to max_num_seqs (the largest always included): a batch pads
    by at most 7 rows, and 64 sequences need 11 graphs."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    return sizes if sizes[-1] == top else sizes + [top]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest captured size that holds n rows; None when n is above them all."""
    return next((s for s in sizes if s >= n), None)


@dataclass
class DecodeBuffers:
    """The static inputs every decode graph reads, at the largest captured size."""
    input_ids: torch.Tensor  # (S,) int64
    positions: torch.Tensor  # (S,) int64
    slot_mapping: torch.Tensor  # (S,) int64
    block_tables: torch.Tensor  # (S, max_blocks) int64
    seq_lens: torch.Tensor  # (S,) int64

    @classmethod
    def allocate(cls, size: int, max_blocks: int, device: torch.device) -> "DecodeBuffers":
        def full(shape, value):
            return torch.full(shape, value, dtype=torch.long, device=device)

        return cls(full((size,), 0), full((size,), 0), full((size,), PAD_SLOT), full((size, max_blocks), 0),
                   full((size,), 1))

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int) -> None:
        """Copy a step's n decode rows in and pad rows n..size (see the module docstring)."""
        n, width = meta.num_seqs, meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens_tensor)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(PAD_SLOT)
        self.block_tables[n:size].zero_()
        self.seq_lens[n:size].fill_(1)

    def metadata(self, size: int, block_size: int) -> AttentionMetadata:
        # seq_lens (host) only steers kernel heuristics (split-K counts); the kernels read the
        # device seq_lens. Claiming the longest context keeps splits for long sequences.
        max_len = self.block_tables.shape[1] * block_size
        return AttentionMetadata([1] * size, [max_len] * size, self.slot_mapping[:size], self.block_tables[:size],
                                 block_size, self.seq_lens[:size])


def cuda_graph_capture(pool) -> Capture:
    def capture(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        # Warm up on a side stream first: Triton compiles and cuBLAS picks its workspace
        # outside the capture, as torch.cuda.graph requires.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph.replay, out

    return capture


class CudaGraphRunner:
    """Stands in for the model in ModelRunner: (input_ids, positions, kv_caches, meta) -> hidden."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int, max_num_seqs: int,
                 max_model_len: int, device: torch.device, capture: Capture | None = None) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], self.max_blocks, device)
        self.capture = capture
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (smaller graphs reuse its memory pool); on any
        failure drop them all and run eagerly."""
        capture = self.capture or cuda_graph_capture(torch.cuda.graph_pool_handle())
        try:
            for size in reversed(self.sizes):
                self.graphs[size] = capture(self._static_forward(size))
        except Exception as e:  # a layer that cannot be captured: keep serving, eagerly
            log.warning("CUDA graph capture failed (%s: %s); decode steps run eagerly", type(e).__name__, e)
            self.graphs.clear()
            return
        log.info("captured CUDA graphs for decode batches of %s sequences", self.sizes)

    def _static_forward(self, size: int) -> Callable[[], torch.Tensor]:
        # The forward a graph of `size` rows records: the model over views of the buffers. The
        # metadata is built afresh per call: its cached derived tensors (a twin's masks) must
        # not carry over from the warm-up run into the capture, where they would be frozen
        # rather than recorded; built inside the capture they fail it, and the engine stays eager.
        b = self.buffers
        return lambda: self.model(b.input_ids[:size], b.positions[:size], self.kv_caches,
                                  b.metadata(size, self.block_size))

    def graph_size(self, meta: AttentionMetadata) -> int | None:
        """The captured size this step replays, or None to run it eagerly."""
        if not self.graphs or not meta.is_decode_only or meta.block_tables.shape[1] > self.max_blocks:
            return None
        size = bucket_for(meta.num_seqs, self.sizes)
        return size if size in self.graphs else None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        size = self.graph_size(meta)
        if size is None or kv_caches is not self.kv_caches:
            return self.model(input_ids, positions, kv_caches, meta)
        self.buffers.fill(input_ids, positions, meta, size)
        replay, out = self.graphs[size]
        replay()
        return out[:meta.num_seqs]  # (n, hidden), overwritten by the next replay
