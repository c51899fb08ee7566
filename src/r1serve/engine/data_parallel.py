"""Data parallelism: several engine replicas (each an engine process, each of
tensor_parallel_size ranks) behind one front end, every request run whole by one of them.

    AsyncEngine / LLM                DataParallelCore                    replicas
    -----------------                ----------------                    --------
    send(AddRequest)  ---------->    ReplicaRouter.pick  ------------>   ProcessCore i
    report(Stepped, merged)  <----   _ReplicaSink i (stats i)    <----   its engine loop

A request goes to the replica with the fewest open requests, unless its prompt opens as one
sent before did: then to that replica while it is not much busier than the least loaded one,
so a shared system prompt stays in one replica's prefix cache instead of being recomputed in
every replica's (SGLang's cache-aware router does the same, at the cost of a radix tree).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import replace

import torch

from r1serve.config import EngineConfig
from r1serve.executor.executor import free_port
from r1serve.executor.replica_group import ReplicaSpec
from r1serve.engine.core_messages import (AbortRequest, Added, AddRequest, Command, EngineInfo, Failed, Reply,
                                          Shutdown, Stepped, Stopped, check_command, prompt_text)
from r1serve.engine.engine_core import EngineSink, ProcessCore
from r1serve.engine.engine_stats import EngineStats
from r1serve.errors import EngineDeadError, InvalidRequestError
from r1serve.outputs import RequestOutput

log = logging.getLogger("r1serve.engine")


def prefix_key(prompt) -> tuple | str | None:
    """The opening of a prompt, as text or ids: what the affinity table keys on."""
    if isinstance(prompt, dict):
        prompt = prompt.get("prompt") or prompt.get("prompt_token_ids")
    if isinstance(prompt, str):
        return prompt[:ReplicaRouter.AFFINITY_CHARS]
    if isinstance(prompt, (list, tuple)):
        return tuple(prompt[:ReplicaRouter.AFFINITY_TOKENS])
    return None


class ReplicaRouter:
    """Which replica runs a request; thread-safe (the front end picks, readers finish)."""

    AFFINITY_CHARS = 256  # about the first 64 tokens: a system prompt's opening
    AFFINITY_TOKENS = 64
    AFFINITY_ENTRIES = 4096  # prefixes remembered, least recently used dropped first

    def __init__(self, num_replicas: int, slack: int = 4) -> None:
        self.load = [0] * num_replicas  # open requests per replica
        self.slack = slack  # how many more open requests the affine replica may have
        self._owner: dict[str, int] = {}
        self._affinity: OrderedDict[tuple | str, int] = OrderedDict()
        self._lock = threading.Lock()

    def pick(self, request_id: str, prompt) -> int:
        key = prefix_key(prompt)
        with self._lock:
            least = min(range(len(self.load)), key=self.load.__getitem__)
            chosen = self._affinity.get(key, least) if key is not None else least
            if self.load[chosen] > self.load[least] + self.slack:
                chosen = least
            if key is not None:
                self._affinity[key] = chosen
                self._affinity.move_to_end(key)
                if len(self._affinity) > self.AFFINITY_ENTRIES:
                    self._affinity.popitem(last=False)
            self._owner[request_id] = chosen
            self.load[chosen] += 1
            return chosen

    def owner(self, request_id: str) -> int | None:
        with self._lock:
            return self._owner.get(request_id)

    def done(self, request_id: str) -> None:
        with self._lock:
            replica = self._owner.pop(request_id, None)
            if replica is not None:
                self.load[replica] -= 1


class DataParallelCore:
    """N ProcessCores behind the interface of one (load, start, send, is_alive, stop)."""

    def __init__(self, config: EngineConfig, model_path) -> None:
        n = config.data_parallel_size
        self.dp_attention = dp_attention(config, model_path)
        if self.dp_attention:  # one engine process per replica, their MoE layers one group
            init_method = f"tcp://127.0.0.1:{free_port()}"
            specs = [ReplicaSpec(i, n, init_method) for i in range(n)]
        else:
            specs = [None] * n
        self.replicas = [ProcessCore(_replica_config(config), model_path, spec) for spec in specs]
        self.router = ReplicaRouter(n)
        self._stats = [EngineStats()] * n
        self._stopped = [False] * n
        self._lock = threading.Lock()
        self._sink: EngineSink | None = None

    def stats(self) -> EngineStats:
        """The replicas' latest counters, merged into one engine's."""
        with self._lock:
            return EngineStats.merged(self._stats)

    def load(self) -> EngineInfo:
        """Load every replica at once (blocking); the first failure stops them all and is raised."""
        infos: list[EngineInfo | BaseException] = [RuntimeError("not loaded")] * len(self.replicas)

        def load(i: int) -> None:
            try:
                infos[i] = self.replicas[i].load()
            except BaseException as exc:
                infos[i] = exc

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(self.replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [e for e in infos if isinstance(e, BaseException)]
        if errors:
            self.stop(10.0)
            raise errors[0]
        self.infos: list[EngineInfo] = infos
        return infos[0]

    def start(self, sink: EngineSink) -> None:
        self._sink = sink
        for i, replica in enumerate(self.replicas):
            replica.start(_ReplicaSink(self, i))

    def send(self, command: Command) -> None:
        check_command(command)
        match command:
            case AddRequest(request_id=rid, prompt=prompt):
                self.replicas[self.router.pick(rid, prompt)].send(command)
            case AbortRequest(request_id=rid):
                replica = self.router.owner(rid)
                if replica is not None:
                    self.replicas[replica].send(command)
            case Shutdown():
                for replica in self.replicas:
                    replica.send(command)

    def is_alive(self) -> bool:
        return all(r.is_alive() for r in self.replicas)

    def stop(self, timeout: float) -> None:
        threads = [threading.Thread(target=r.stop, args=(timeout,)) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _report(self, i: int, reply: Reply) -> None:
        """Replica i's reply, as the front end should see it (called on i's reader thread)."""
        match reply:
            case Stepped(outputs=outputs, stats=stats):
                for out in outputs:
                    if out.finished:
                        self.router.done(out.request_id)
                with self._lock:
                    self._stats[i] = stats
                    merged = EngineStats.merged(self._stats)
                reply = Stepped(outputs, merged)
            case Added(request_id=rid, error=error) if error is not None:
                self.router.done(rid)
            case Failed(request_ids=ids):
                for rid in ids:
                    self.router.done(rid)
            case Stopped(error=error):
                with self._lock:
                    self._stopped[i] = True
                    everyone = all(self._stopped)
                if error is not None:  # one replica down: the front end reports unhealthy
                    reply = Stopped(f"data-parallel replica {i}: {error}")
                elif not everyone:
                    return
        self._sink.report(reply)


class _ReplicaSink:
    def __init__(self, core: DataParallelCore, index: int) -> None:
        self.core = core
        self.index = index

    def report(self, reply: Reply) -> None:
        self.core._report(self.index, reply)


def _replica_config(config: EngineConfig) -> EngineConfig:
    """One replica's config: with no num_threads given, the node's cores shared among every
    rank of every replica (num_threads is per rank)."""
    ranks = config.data_parallel_size * config.tensor_parallel_size
    threads = config.num_threads or max(1, len(os.sched_getaffinity(0)) // ranks)
    return replace(config, num_threads=threads)


def dp_attention(config: EngineConfig, model_path) -> bool:
    """Whether the replicas' MoE layers form one expert-parallel group (DP attention):
    --expert-parallel over replicas of one rank each, for a model that has routed experts.
    (Replicas of several ranks each split their experts among their own ranks.)"""
    if not (config.expert_parallel and config.tensor_parallel_size == 1 and config.data_parallel_size > 1):
        return False
    from r1serve.models.checkpoint import open_checkpoint

    if open_checkpoint(model_path).hf_config.get("n_routed_experts"):
        return True
    log.info("--expert-parallel: the model has no routed experts; its replicas run independently")
    return False


class DataParallelEngine:
    """The LLMEngine surface that LLM drives (add_request, step, abort_request), over
    data-parallel replicas: step() returns what any replica produced since the last call."""

    def __init__(self, config: EngineConfig, model_path) -> None:
        from r1serve.models.checkpoint import open_checkpoint

        self.core = DataParallelCore(config, model_path)
        info = self.core.load()
        self.max_model_len = info.max_model_len
        self.dtype = getattr(torch, info.dtype)
        self.tokenizer = open_checkpoint(model_path).tokenizer()
        self._replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        self._held: list[Reply] = []  # replies that came while an add waited for its answer
        self._prompts: dict[str, tuple] = {}  # request id -> (prompt text, ids): outputs come without them
        self._error: str | None = None
        self.core.start(self)

    def stats(self) -> EngineStats:
        return self.core.stats()

    def report(self, reply: Reply) -> None:  # EngineSink, on the replicas' reader threads
        self._replies.put(reply)

    def add_request(self, request_id: str, prompt, params) -> list[int]:
        self._check_alive()
        if request_id in self._prompts:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.core.send(AddRequest(request_id, prompt, params))
        while True:
            reply = self._replies.get()
            if isinstance(reply, Added) and reply.request_id == request_id:
                break
            self._held.append(reply)
            if isinstance(reply, Stopped) and reply.error is not None:
                self._error = reply.error
                self._check_alive()
        if reply.error is not None:
            raise reply.error
        self._prompts[request_id] = (prompt_text(prompt), reply.prompt_token_ids)
        return reply.prompt_token_ids

    def abort_request(self, request_id: str) -> None:
        if self._prompts.pop(request_id, None) is not None:
            self.core.send(AbortRequest(request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self._prompts)

    def step(self) -> list[RequestOutput]:
        """The outputs the replicas produced since the last call (waiting for one step if none)."""
        self._check_alive()
        replies, self._held = self._held, []
        if not replies and self._prompts:
            replies.append(self._replies.get())
        while not self._replies.empty():
            replies.append(self._replies.get())
        outputs: list[RequestOutput] = []
        for reply in replies:
            outputs += self._take(reply)
        return outputs

    def _take(self, reply: Reply) -> list[RequestOutput]:
        match reply:
            case Stepped(outputs=outputs):
                kept = [o for o in outputs if o.request_id in self._prompts]
                for out in kept:
                    out.prompt, out.prompt_token_ids = self._prompts[out.request_id]
                    if out.finished:
                        del self._prompts[out.request_id]
                return kept
            case Failed(request_ids=ids, message=message):
                for rid in ids:
                    self._prompts.pop(rid, None)
                raise RuntimeError(message)
            case Stopped(error=error) if error is not None:
                self._error = error
                self._check_alive()
        return []

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine has stopped ({self._error})")

    def shutdown(self) -> None:
        self.core.stop(10.0)
