"""The pool of KV-cache blocks: free list, reference counts, and the prefix-cache index.

Each block holds the K/V of `block_size` consecutive tokens of one sequence. A block is
in one of three states:

    in use        ref_count > 0           (in some request's block table)
    free, cached  ref_count == 0, hashed  (in the free list AND the hash index: reusable
                                           by a request with the same prefix until evicted)
    free, empty   ref_count == 0, no hash (in the free list only)

Free blocks wait in two places, and `allocate` takes from the first that has one:

    empty    a stack: the block freed last is reused first. Its pages are already in
             memory (and in the CPU's caches), while a block never written is not: the
             KV cache is allocated lazily, so reusing warm blocks keeps the engine's
             resident memory at what its traffic needs instead of creeping one block per
             request through the whole pool.
    cached   LRU order: appended when their last user lets go, evicted from the front,
             and only when no empty block is left (a cached prefix outlives any empty block).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Hash of a full block, chained on its parent so equal hashes mean equal prefixes."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._empty: list[KVBlock] = self.blocks[::-1]  # popped from the end: block 0 first
        self._free_cached: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[bytes, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._empty) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free; check can_allocate first")
        out = []
        for _ in range(n):
            block = self._empty.pop() if self._empty else self._free_cached.popitem(last=False)[1]
            self._evict(block)
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (possibly free ones)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free_cached[block.block_id]  # only a cached block can be found
            block.ref_count += 1

    def release(self, blocks: list[KVBlock]) -> None:
        # Callers pass a request's blocks tail first, so a sequence's last blocks are
        # evicted before its first ones: the shared prefix lives longest.
        for block in blocks:
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"KV block {block.block_id} released more often than taken")
            if block.ref_count == 0 and block.block_hash is not None:
                self._free_cached[block.block_id] = block
            elif block.ref_count == 0:
                self._empty.append(block)

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        # Two requests may compute the same prefix at once; the first block keeps the entry.
        if block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None
            self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Drop every cached-but-free block from the index. False if blocks are still in use."""
        if self.num_free != self.num_blocks:
            return False
        for block in self._free_cached.values():
            block.block_hash = None
            self._empty.append(block)
        self._free_cached.clear()
        self._cached.clear()
        return True
