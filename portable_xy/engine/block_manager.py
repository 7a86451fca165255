"""Paged KV-cache blocks with hash-based prefix caching of full blocks.

A block holds ``block_size`` token slots. Full blocks are hashed by chaining the parent block's
hash with the block's token ids, so a hash names a whole prefix. Freed blocks keep their hash and
stay findable until they are reused; reuse takes the least recently freed block first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # ---- prefix cache ------------------------------------------------------------------------
    def lookup_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached run of ``seq``'s full blocks. At least one token is
        always left to compute, so the step that finishes the prompt has logits to sample."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            toks = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, toks)
            bid = self.cached.get(parent)
            if bid is None or self.blocks[bid].token_ids != toks:
                break
            hits.append(bid)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def take_cached(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give a new sequence the cached prefix blocks found by :meth:`lookup_prefix`."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = len(block_ids) * self.block_size

    # ---- allocation --------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_new_tokens`` more tokens (check first)."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            bid, _ = self.free.popitem(last=False)
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(bid)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Hash and publish the blocks of ``seq`` that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = None
        for i in range(seq.num_computed_tokens // bs):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                block.hash = chain_hash(parent, block.token_ids)
                self.cached.setdefault(block.hash, block.block_id)
            parent = block.hash

    def free_seq(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its tail blocks become the first to be evicted."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} ref count went negative"
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0
