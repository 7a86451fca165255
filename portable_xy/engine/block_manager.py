"""Paged KV-cache blocks with prefix reuse at token granularity.

A block holds ``block_size`` token slots; ``Block.token_ids`` are the tokens whose K/V in it are
valid (the real count of a sequence's last block is ``len(token_ids)``). A full block is hashed by
chaining its parent block's hash with its token ids, so a hash names a whole prefix.

Prefix reuse (XY-Serve §5.1.1): a new prompt first takes the cached full blocks of its longest
matching prefix (shared, reference counted). Where the match then continues part-way into a block
-- a full block or the partly filled last block of another sequence, found among the blocks that
follow the same parent -- the matched tokens are reused by copying that block into a fresh one
(copy-on-write; the copy is queued in :attr:`BlockManager.pending_copies` and done by the model
runner before the step's forward pass) instead of being recomputed. Freed blocks keep their
contents and stay findable until they are reused; reuse takes the least recently freed block first
(LRU).
"""

from __future__ import annotations

from collections import OrderedDict

from .sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and computed
        self.parent: int | None = None  # hash of the blocks before it (None: first block)
        self.token_ids: tuple[int, ...] = ()  # tokens whose K/V in this block are valid


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, token_wise_reuse: bool = True
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.token_wise_reuse = enable_prefix_caching and token_wise_reuse
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # full-block hash -> block id
        self.children: dict[int | None, set[int]] = {}  # parent hash -> blocks with valid tokens after it
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies for the next forward
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0
        self.num_copied_tokens = 0  # hits served by copy-on-write of a partly matched block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # ---- prefix lookup -----------------------------------------------------------------------
    def lookup_prefix(self, seq: Sequence) -> tuple[list[int], tuple[int, int] | None]:
        """The cached full blocks of ``seq``'s longest matching prefix, and ``(block, n)`` when
        the match continues for ``n`` more tokens inside ``block``. At least one token is always
        left to compute, so the step that finishes the prompt has logits to sample."""
        if not self.enable_prefix_caching:
            return [], None
        hits: list[int] = []
        parent = None
        bs, toks = self.block_size, seq.token_ids
        limit = seq.num_tokens - 1
        for i in range(limit // bs):
            chunk = tuple(toks[i * bs : (i + 1) * bs])
            h = chain_hash(parent, chunk)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != chunk:
                break
            hits.append(bid)
            parent = h
        if not self.token_wise_reuse:
            return hits, None
        start = len(hits) * bs
        rest = toks[start : min(start + bs, limit)]
        best, best_n = None, 0
        for bid in self.children.get(parent, ()):
            n = _common_prefix(self.blocks[bid].token_ids, rest)
            if n > best_n:
                best, best_n = bid, n
        return hits, (None if best is None else (best, best_n))

    def record_lookup(self, num_tokens: int, num_hit_tokens: int, num_copied_tokens: int = 0) -> None:
        """Count an admitted prompt's lookup (of its hits, ``num_copied_tokens`` by copy-on-write)."""
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens
        self.num_copied_tokens += num_copied_tokens

    def take_cached(
        self, seq: Sequence, block_ids: list[int], partial: tuple[int, int] | None = None
    ) -> tuple[int, int]:
        """Give a new sequence the prefix found by :meth:`lookup_prefix`: shared full blocks, then
        (if a block is free for it) a copy of the partly matched block. Returns ``(tokens now
        cached, of which copied)``; the scheduler sets the sequence's computed-token count."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = list(block_ids)
        cached = len(block_ids) * self.block_size
        if partial is not None and self.free:
            src, n = partial
            parent = self.blocks[block_ids[-1]].hash if block_ids else None
            dst = self._pop_free()
            self.pending_copies.append((src, dst))
            self._set_contents(self.blocks[dst], parent, self.blocks[src].token_ids[:n])
            seq.block_table.append(dst)
            return cached + n, n
        return cached, 0

    # ---- allocation --------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self.free)

    def _pop_free(self) -> int:
        bid, _ = self.free.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None and self.cached.get(block.hash) == bid:
            del self.cached[block.hash]
        self._unindex(block)
        block.hash, block.parent, block.token_ids, block.ref_count = None, None, (), 1
        return bid

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_new_tokens`` more tokens (check first)."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._pop_free())

    def _unindex(self, block: Block) -> None:
        siblings = self.children.get(block.parent)
        if siblings is not None:
            siblings.discard(block.block_id)
            if not siblings:
                del self.children[block.parent]

    def _set_contents(self, block: Block, parent: int | None, token_ids: tuple[int, ...]) -> None:
        self._unindex(block)
        block.parent, block.token_ids = parent, token_ids
        if token_ids and self.token_wise_reuse:
            self.children.setdefault(parent, set()).add(block.block_id)
        if len(token_ids) == self.block_size:
            block.hash = chain_hash(parent, token_ids)
            self.cached.setdefault(block.hash, block.block_id)

    def publish(self, seq: Sequence) -> None:
        """Record which tokens of ``seq``'s blocks are now computed: full blocks get their hash
        (findable by later prompts), a partly filled last block its real token count."""
        if not self.enable_prefix_caching:
            return
        bs, computed = self.block_size, seq.num_computed_tokens
        parent = None
        for i in range(-(-computed // bs)):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                toks = tuple(seq.token_ids[i * bs : min((i + 1) * bs, computed)])
                if toks != block.token_ids:
                    self._set_contents(block, parent, toks)
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

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
