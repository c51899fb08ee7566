"""The synchronous engine: requests in, one model step at a time, RequestOutputs out."""
from __future__ import annotations

import logging
import time

import torch

from r1serve.config import EngineConfig
from r1serve.executor.launch import start_executor
from r1serve.executor.worker import Worker
from r1serve.executor.replica_group import ReplicaGroup, ReplicaSpec
from r1serve.engine.cuda_graph_runner import CudaGraphRunner
from r1serve.engine.drafter import NgramDrafter
from r1serve.engine.mtp_drafter import MTPDrafter
from r1serve.engine.input_processor import InputProcessor
from r1serve.engine.kv_cache_manager import KVCacheManager
from r1serve.engine.model_runner import ModelRunner
from r1serve.engine.output_processor import OutputProcessor, ParentRequest
from r1serve.engine.request import Request
from r1serve.engine.scheduler import Scheduler, SchedulerConfig
from r1serve.engine.engine_stats import EngineStats
from r1serve.engine.spec_decode_stats import SpecDecodeStats
from r1serve.engine.core_messages import ModelLayout, Prompt
from r1serve.engine.speculation import Speculation
from r1serve.errors import InvalidRequestError, ModelLoadError, RankFailedError
from r1serve.models.loader import LoadedModel
from r1serve.models.planning import ModelNumbers, numbers_for
from r1serve.outputs import RequestOutput
from r1serve.platforms import get_platform
from r1serve.sampling_params import SamplingParams

log = logging.getLogger("r1serve.engine")


class LLMEngine:
    def __init__(self, config: EngineConfig, model_path, replica: ReplicaSpec | None = None) -> None:
        self.config = config
        self.platform = get_platform(config)
        # The engine's ranks: this process is rank 0, any others were started (executor/).
        self.executor = start_executor(config, model_path, self.platform)
        # Under DP attention: this replica's place among the replicas its MoE layers span.
        self.replicas = (ReplicaGroup(replica, self.platform.dist_backend, config.distributed_timeout_s)
                         if replica else None)
        if self.platform.host_threads and self.executor.threads:
            torch.set_num_threads(self.executor.threads)
        try:
            self.worker = self._start_worker(model_path)  # this rank's model and KV cache (executor/worker.py)
        except BaseException:
            self._leave_ranks()
            raise
        self.loaded: LoadedModel = self.worker.loaded
        self.tokenizer = self.loaded.tokenizer
        self.dtype = self.loaded.dtype  # the activations'
        arch = self.loaded.arch
        self.num_kv_blocks = self.worker.kv_blocks_wanted()
        self.max_model_len = self._max_model_len()
        kv_caches = self.worker.allocate_kv(self.num_kv_blocks)
        self.kv = KVCacheManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                 lookahead_layers=config.speculative == "mtp")
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.enable_chunked_prefill), self.kv)
        self.executor.share_kv_blocks(self.num_kv_blocks)
        self.runner = ModelRunner(self.loaded.model, kv_caches, config.block_size, self.platform.device,
                                  self.executor.steps, self._decode_graphs(kv_caches),
                                  keep_hidden=config.speculative == "mtp")
        self.kernels = self.loaded.kernels + self.platform.bind(self.runner.sampler, config.kernel)  # `r1serve info`
        self.speculation = self._speculation()
        n = self.numbers()
        log.info("%s: %.3g parameters (%.3g active per token), %.2f GiB of weights, %d KV bytes per token "
                 "(%s), KV cache for %d tokens", arch.architecture, n.parameters, n.active_parameters,
                 n.weight_bytes / 2**30, n.kv_bytes_per_token, str(self.kv_dtype).removeprefix("torch."),
                 n.max_tokens_in_kv_cache)
        eos = frozenset(self.tokenizer.eos_token_ids) | frozenset(arch.eos_token_ids)
        self.inputs = InputProcessor(self.tokenizer, arch.vocab_size, self.max_model_len, eos, self.platform.device,
                                     config.seed)
        self.outputs = OutputProcessor(self.tokenizer)
        self.failure: RankFailedError | None = None  # set once a rank of the group has failed

    def _start_worker(self, model_path) -> Worker:
        # Under DP attention the model's group is the replicas' (its MoE layers span them).
        tp = self.replicas.tp if self.replicas is not None else self.executor.tp
        worker, error = None, None
        try:
            worker = Worker(self.config, model_path, self.platform, tp)
        except Exception as exc:
            error = exc
        self.executor.agree_loaded(error)  # raises rank 0's error, or another rank's
        return worker

    def layout(self) -> ModelLayout:
        """How the model is spread: this engine's ranks, its place among DP-attention
        replicas, and the routed experts its rank 0 holds."""
        return ModelLayout(self.config.tensor_parallel_size,
                           (self.replicas.tp.rank, self.replicas.tp.size) if self.replicas else None,
                           self.worker.experts_held())

    def shutdown(self) -> None:
        self._leave_ranks()
        if self.inputs.masks is not None:
            self.inputs.masks.close()

    def _leave_ranks(self) -> None:
        """Stop the other ranks of a tensor-parallel group, leave the replicas' (nothing to do on one rank)."""
        self.executor.shutdown()
        if self.replicas is not None:
            self.replicas.shutdown()

    def _decode_graphs(self, kv_caches: list[torch.Tensor]) -> CudaGraphRunner | None:
        """Decode steps captured as graphs, where the platform has them (one rank, not --enforce-eager)."""
        c = self.config
        if self.platform.graph_capture is None or c.enforce_eager or self.executor.size > 1:
            return None
        why_not = self.platform.graph_capture(c.kernel)
        if why_not is not None:
            log.info("decode steps run eagerly: %s", why_not)
            return None
        graphs = CudaGraphRunner(self.loaded.model, kv_caches, c.block_size, c.max_num_seqs, self.max_model_len,
                                 self.platform.device)
        graphs.capture_all()
        return graphs

    def _speculation(self) -> Speculation | None:
        c = self.config
        if c.speculative is None:
            return None
        if c.speculative == "ngram":
            drafter = NgramDrafter(c.prompt_lookup_min, c.prompt_lookup_max)
        else:
            drafter = MTPDrafter.for_engine(self.runner, self.kv)
        return Speculation(c, drafter)

    def numbers(self) -> ModelNumbers:
        """Parameters, active parameters, weight and KV bytes, and the context the cache holds."""
        lm = self.loaded
        return numbers_for(lm.model, lm.arch, lm.dtype, self.num_kv_blocks * self.kv_bytes_per_block,
                           lm.num_parameters, lm.weight_bytes, self.kv_dtype)

    @property
    def kv_spec(self):
        return self.worker.kv_spec  # per-head K/V, or MLA's one latent per token

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.worker.kv_dtype

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_spec.bytes_per_token(self.kv_dtype)

    @property
    def kv_bytes_per_block(self) -> int:
        return self.worker.kv_bytes_per_block

    def _max_model_len(self) -> int:
        limit = self.loaded.arch.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            raise ModelLoadError(f"max_model_len={wanted} exceeds the model's limit of {limit} positions")
        # A single request must always fit in the cache alone, or preemption could not help it.
        return min(wanted, self.num_kv_blocks * self.config.block_size)

    # ---- requests in ------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Queue a request; returns its prompt's token ids."""
        if request_id in self.outputs.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        parent = self.inputs.process(request_id, prompt, params)
        self.outputs.add(parent)
        for child in parent.children:
            self.scheduler.add(child)
        return parent.prompt_token_ids

    def abort_request(self, request_id: str) -> RequestOutput | None:
        parent = self.outputs.parents.get(request_id)
        if parent is None:
            return None
        for child in parent.children:
            if not child.finished:
                self.scheduler.finish(child.request_id, "abort")
        return self._finish_parent(parent)

    def abort_all(self) -> list[str]:
        """Abort every request (after a failed step); returns their ids."""
        ids = list(self.outputs.parents)
        for rid in ids:
            self.abort_request(rid)
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.parents)

    # ---- one step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests waiting; the KV cache is too small")
            if self.replicas is not None:  # the other replicas' MoE layers need this one's part
                self.runner.idle_step()
            return []
        started = time.perf_counter()
        result = self._execute(sched)
        if self.speculation is not None and all(c.is_decode for c in sched.chunks):
            self.speculation.observe_step(sum(c.num_tokens for c in sched.chunks), time.perf_counter() - started)
        new = dict(zip(result.request_ids, zip(result.token_ids, result.logprobs)))
        touched: dict[str, ParentRequest] = {}
        failed: list[ParentRequest] = []

        def on_token(req: Request, j: int, token: int) -> None:
            parent = self.outputs.parent_of(req.request_id)
            if parent is None:
                return
            touched[parent.request_id] = parent
            lps = new[req.request_id][1]
            try:
                self.outputs.on_token(parent, req, token, lps[j] if lps else None)
            except Exception as exc:  # one request's failure (detokenizing, stop checks) ends it alone
                parent.error = f"{type(exc).__name__}: {exc}"
                req.finish("abort")
                failed.append(parent)

        self._record_verified(sched, new)
        self.scheduler.update(sched, {rid: tokens for rid, (tokens, _) in new.items()}, on_token)
        for parent in failed:
            self.abort_request(parent.request_id)
        if self.speculation is not None:
            self.speculation.drafter.after_step(sched)
            self.speculation.propose(self.scheduler.running)
        outs = [self.outputs.output(p) if not p.finished else self._finish_parent(p) for p in touched.values()]
        return [o for o in outs if o is not None]

    def _record_verified(self, sched, new: dict) -> None:
        if self.speculation is None:
            return
        for chunk in sched.chunks:
            if chunk.draft_token_ids:
                tokens = new[chunk.request.request_id][0]
                self.speculation.record(chunk.request, len(chunk.draft_token_ids), len(tokens) - 1)

    def _execute(self, sched):
        masks = self._start_masks(sched)
        if self.executor.size == 1:  # a failed step fails its requests; the engine goes on
            return self.runner.execute(sched, masks)
        if self.failure is not None:
            raise self.failure
        try:
            return self.runner.execute(sched, masks)
        except Exception as exc:
            # Ranks that ran part of a step are out of step with this one: none can go on.
            self.failure = self.executor.failure(exc)
            raise self.failure from exc

    def _start_masks(self, sched):
        """Start computing the grammar masks of this step's constrained rows; returns what
        the sampler calls, after the forward pass, to get them (None: nothing constrained)."""
        masks = self.inputs.masks
        if masks is None:
            return None
        rows, first = [], 0
        for chunk in sched.chunks:
            if not chunk.samples:
                continue
            row = chunk.request.grammar_row()
            if row is not None:
                rows.append((first, *row, chunk.draft_token_ids))
            first += 1 + len(chunk.draft_token_ids)
        pending = masks.start(rows)
        return None if pending is None else lambda logits: masks.apply(pending, logits)

    def _finish_parent(self, parent: ParentRequest) -> RequestOutput:
        if self.speculation is not None:
            for child in parent.children:
                self.speculation.forget(child.request_id)
        return self.outputs.remove(parent)

    # ---- introspection ------------------------------------------------------------------

    def stats(self) -> EngineStats:
        spec = self.speculation.stats if self.speculation else SpecDecodeStats()
        return EngineStats(
            num_requests_running=len(self.scheduler.running), num_requests_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage(), num_kv_blocks=self.num_kv_blocks, num_free_blocks=self.kv.pool.num_free,
            prefix_cache_queries=self.kv.stats.queries, prefix_cache_hits=self.kv.stats.hits,
            prefix_cache_evictions=self.kv.pool.num_evictions,
            grammar_wait_seconds=self.inputs.masks.seconds if self.inputs.masks else 0.0,
            spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_accepted_per_position=tuple(spec.accepted_per_position))
