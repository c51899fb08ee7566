"""Rank 0 hands each step's inputs to the other ranks of its tensor-parallel group.

Rank 0 schedules; every rank must run the same forward, since the layers' collectives pair
up across ranks. So before each forward rank 0 broadcasts the step's StepInputs (a few
lists and the block tables), and the workers, waiting in `recv`, build the same tensors
and run the same model step. None ends the workers' loops.

The broadcast goes over a gloo group (the CPU), whatever the device's backend: the inputs
are host data, and NCCL would need them on the GPU first.
"""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from r1serve.executor.step_inputs import StepInputs

# One broadcast of this many bytes carries a step's inputs (their length first): a decode
# step of 32 sequences pickles to ~3 KB. Larger ones (long prompts' block tables) follow in a
# second broadcast of their own size, as broadcast_object_list always does, at ~0.3 ms a
# broadcast between two processes on gloo.
INLINE_BYTES = 1 << 16
_LENGTH = 8


class StepBroadcast:
    def __init__(self, group, src: int = 0) -> None:
        self.group = group  # a gloo ProcessGroup spanning the tensor-parallel ranks
        self.src = src  # the global rank of the group's rank 0
        self._buf = torch.empty(INLINE_BYTES, dtype=torch.uint8)

    def send(self, inputs: StepInputs | None) -> None:
        self.send_object(inputs)

    def recv(self) -> StepInputs | None:
        return self.recv_object()

    def send_object(self, value: object) -> None:
        """Any picklable value from rank 0 (the KV cache's block count, after loading)."""
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        self._buf[:_LENGTH] = torch.frombuffer(bytearray(n.to_bytes(_LENGTH, "little")), dtype=torch.uint8)
        inline = n <= INLINE_BYTES - _LENGTH
        if inline:
            self._buf[_LENGTH:_LENGTH + n] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dist.broadcast(self._buf, src=self.src, group=self.group)
        if not inline:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=self.src, group=self.group)

    def recv_object(self) -> object:
        dist.broadcast(self._buf, src=self.src, group=self.group)
        n = int.from_bytes(self._buf[:_LENGTH].numpy().tobytes(), "little")
        if n <= INLINE_BYTES - _LENGTH:
            return pickle.loads(self._buf[_LENGTH:_LENGTH + n].numpy().tobytes())
        data = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(data, src=self.src, group=self.group)
        return pickle.loads(data.numpy().tobytes())
