"""Maps requests to KV blocks: block tables, prefix-cache lookups, allocation and release."""
from __future__ import annotations

from array import array

from dataclasses import dataclass

from r1serve.engine.block_pool import BlockPool, KVBlock, hash_block
from r1serve.engine.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 lookahead_layers: bool = False) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # A cache layer whose entry at position p depends on token p + 1 too (the MTP layer's):
        # the last block of a hit then holds one entry computed for another continuation, so
        # that block is recomputed rather than adopted.
        self.lookahead_layers = lookahead_layers
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = PrefixCacheStats()
        self._blocks: dict[str, list[KVBlock]] = {}
        # Kept beside _blocks so that a step costs what changed, not the context's length (an
        # R1 answer runs to 32k tokens: 2k blocks per request).
        # The block table as the model runner reads it: int64s it copies into a tensor at C speed.
        self._block_ids: dict[str, array] = {}
        self._published: dict[str, int] = {}  # how many leading blocks are in the prefix cache
        self._hashes: dict[str, list[bytes]] = {}  # chain hashes of the request's full blocks

    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_table(self, request_id: str) -> array:
        """The request's block ids in order, int64 (the manager's own array: read it within
        the step, do not keep it)."""
        return self._block_ids.get(request_id, array("q"))

    def num_blocks_held(self, request_id: str) -> int:
        return len(self._blocks.get(request_id, ()))

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """Longest run of the request's full blocks already in the cache.

        At least the last token is always left to compute: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        n = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, n)[:n]
        hit = []
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            hit.append(block)
        if self.lookahead_layers and hit:
            hit.pop()
        self.stats.queries += request.num_tokens
        self.stats.hits += len(hit) * self.block_size
        return hit

    def allocate(self, request: Request, num_new_tokens: int, cached: list[KVBlock] = ()) -> bool:
        """Give the request room for `num_new_tokens` more tokens after its computed ones
        (and after `cached`, prefix blocks it is about to adopt). False if blocks ran out."""
        held = self._blocks.setdefault(request.request_id, [])
        ids = self._block_ids.setdefault(request.request_id, array("q"))
        total = request.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = -(-total // self.block_size) - len(held) - len(cached)
        # Adopting a cached block that is free takes it off the free list too.
        reclaimed = sum(1 for b in cached if b.ref_count == 0)
        if max(need, 0) + reclaimed > self.pool.num_free:
            if not held:
                del self._blocks[request.request_id], self._block_ids[request.request_id]
            return False
        self.pool.touch(list(cached))
        new = list(cached) + (self.pool.allocate(need) if need > 0 else [])
        held.extend(new)
        ids.extend(b.block_id for b in new)
        return True

    def trim(self, request: Request, num_tokens: int) -> None:
        """Release the request's trailing blocks that hold no position below num_tokens (those
        rejected drafts were written into). They were never published: only blocks of
        computed tokens are."""
        held = self._blocks.get(request.request_id)
        keep = -(-num_tokens // self.block_size)
        if held is None or len(held) <= keep:
            return
        extra = held[keep:]
        del held[keep:]
        del self._block_ids[request.request_id][keep:]
        self.pool.release(extra[::-1])

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's blocks that are full and computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        n_full = request.num_computed_tokens // self.block_size
        done = self._published.get(request.request_id, 0)
        if n_full <= done:
            return
        held, hashes = self._blocks[request.request_id], self._block_hashes(request, n_full)
        for i in range(done, n_full):
            self.pool.cache(held[i], hashes[i])
        self._published[request.request_id] = n_full

    def free(self, request: Request) -> None:
        blocks = self._blocks.pop(request.request_id, [])
        self.pool.release(blocks[::-1])
        self._block_ids.pop(request.request_id, None)
        self._published.pop(request.request_id, None)
        self._hashes.pop(request.request_id, None)

    def _block_hashes(self, request: Request, n_blocks: int) -> list[bytes]:
        # Hashes are extended incrementally: each full block is hashed once per request. The
        # first n_blocks of the returned list are the ones asked for (it may hold more).
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < n_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, request.token_ids[i * bs:(i + 1) * bs]))
        return hashes
