"""The simulated KV cache: a fixed pool of blocks with hash-chained prefix reuse.

Model (vLLM's, simplified to what the scheduler needs):

* The pool has ``num_blocks`` blocks of ``block_size`` tokens. A sequence's
  tokens fill its blocks in order; every *full* block is identified by a chain
  hash ``h_i = H(h_{i-1}, tokens of block i)``, so equal hashes mean equal
  prefixes. The last, partly filled block of a sequence is anonymous.
* With prefix caching on, a full block is shared: a second sequence whose
  prefix hashes match takes a reference instead of a new block (a *hit*).
  When its last reference goes the block stays cached but *evictable*
  (least recently freed first); a new allocation may evict it. With prefix
  caching off, every block is private and discarded on free.
* Accounting, always: ``used + evictable + free == num_blocks`` where ``used``
  counts distinct referenced full blocks plus partial blocks. ``free_blocks``
  (what an allocation can get) is ``free + evictable``.

Who calls what: only the scheduler, on the event loop thread.
``lookup_prefix`` when a sequence is considered for admission and
``record_admission`` once it is admitted (hit-rate accounting),
``allocate`` whenever a sequence needs room for more tokens (all or nothing),
``free`` when it finishes, is cancelled or is preempted. ``free`` is idempotent,
so the engine's per-request guard may call it again: blocks never leak.

KV events: ``events`` receives ``stored(hashes, parent, tokens)`` for each
contiguous run of full blocks that enters the cache (``parent`` is the hash of
the block before the run, ``tokens`` the run's tokens) and ``removed(hashes)``
when blocks leave it. Block hashes are Dynamo's chained block ids
(``backend_common.kv_events.block_hash``), so the KV router, which hashes the
request's tokens the same way, finds the blocks this cache holds.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from backend_common.kv_events import block_hash

__all__ = ["KvCache", "KvCacheStats", "KvEventSink", "chain_hash"]


class KvEventSink(Protocol):
    def stored(
        self, block_hashes: list[int], parent_hash: int | None, token_ids: list[int]
    ) -> None: ...

    def removed(self, block_hashes: list[int]) -> None: ...


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    """The 64-bit id of a full block given its parent block's id (Dynamo's scheme)."""
    return block_hash(parent, tokens)


@dataclass
class _SeqBlocks:
    keys: list[int] = field(default_factory=list)  # full blocks, in order
    partial: bool = False  # holds one anonymous tail block


@dataclass(frozen=True)
class KvCacheStats:
    num_blocks: int
    used_blocks: int
    evictable_blocks: int
    free_blocks: int  # free + evictable: what an allocation can get
    prefix_queries: int  # full prompt blocks looked up at admission
    prefix_hits: int  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    @property
    def utilisation(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 1.0


class KvCache:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        enable_prefix_caching: bool = True,
        events: KvEventSink | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events
        self._refs: dict[int, int] = {}  # key -> references (> 0)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self._seqs: dict[str, _SeqBlocks] = {}
        self._partials = 0
        self._private_keys = itertools.count(start=1 << 64)  # never collides with a 64-bit hash
        self._queries = 0
        self._hits = 0

    # -- queries ----------------------------------------------------------------
    @property
    def used_blocks(self) -> int:
        return len(self._refs) + self._partials

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take (truly free plus evictable)."""
        return self.num_blocks - self.used_blocks

    def stats(self) -> KvCacheStats:
        return KvCacheStats(
            num_blocks=self.num_blocks,
            used_blocks=self.used_blocks,
            evictable_blocks=len(self._evictable),
            free_blocks=self.free_blocks,
            prefix_queries=self._queries,
            prefix_hits=self._hits,
        )

    def holds(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, tokens: list[int], start: int, stop: int, parent: int | None) -> list[int]:
        bs = self.block_size
        out = []
        for i in range(start, stop):
            parent = chain_hash(parent, tokens[i * bs : (i + 1) * bs])
            out.append(parent)
        return out

    def lookup_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` are cached, in whole blocks. Pure query."""
        n_full = len(tokens) // self.block_size
        if not self.enable_prefix_caching or n_full == 0:
            return 0
        hits = 0
        parent = None
        for i in range(n_full):
            parent = chain_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            if parent not in self._refs and parent not in self._evictable:
                break
            hits += 1
        return hits * self.block_size

    def record_admission(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one admission for the hit rate: full prompt blocks queried vs. found."""
        self._queries += prompt_tokens // self.block_size
        self._hits += cached_tokens // self.block_size

    # -- allocation -------------------------------------------------------------
    def allocate(self, seq_id: str, tokens: list[int], num_tokens: int) -> bool:
        """Make ``seq_id`` hold blocks for ``tokens[:num_tokens]``. All or nothing.

        Returns False (and changes nothing) when the pool cannot supply the
        blocks even after evicting every unreferenced cached block.
        """
        if num_tokens > len(tokens):
            raise ValueError("num_tokens exceeds the sequence length")
        bs = self.block_size
        n_full, tail = divmod(num_tokens, bs)
        want_partial = tail != 0
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = _SeqBlocks()
        elif n_full == len(seq.keys) and want_partial == seq.partial:
            return True  # the common decode step: the tokens still fit the blocks held
        start = len(seq.keys)
        parent = seq.keys[-1] if seq.keys else None
        if n_full < start:
            raise ValueError("allocate cannot shrink a sequence; free it instead")
        # Plan: each new full block is a hit (shared) or needs a block (the
        # sequence's own partial block is promoted first, then fresh ones).
        have_partial = seq.partial
        fresh = 0
        revived = 0  # hits on evictable blocks: they stop being available
        plan: list[tuple[int, bool]] = []
        hashes = (
            self._hashes(tokens, start, n_full, parent)
            if self.enable_prefix_caching
            else [next(self._private_keys) for _ in range(start, n_full)]
        )
        for key in hashes:
            if key in self._refs:
                plan.append((key, True))
            elif key in self._evictable:
                plan.append((key, True))
                revived += 1
            else:
                plan.append((key, False))
                if have_partial:
                    have_partial = False
                else:
                    fresh += 1
        release_partial = have_partial and not want_partial
        if want_partial and not have_partial:
            fresh += 1
        available = self.free_blocks - revived + (1 if release_partial else 0)
        if fresh > available:
            return False
        # Commit. Newly stored blocks are reported per contiguous run (one parent each).
        runs: list[tuple[int | None, list[int], int]] = []  # (parent, hashes, first index)
        prev = parent
        for offset, (key, hit) in enumerate(plan):
            if hit:
                if key in self._evictable:
                    del self._evictable[key]
                self._refs[key] = self._refs.get(key, 0) + 1
            else:
                self._refs[key] = 1
                if runs and runs[-1][1][-1] == prev:
                    runs[-1][1].append(key)
                else:
                    runs.append((prev, [key], start + offset))
            seq.keys.append(key)
            prev = key
        self._partials += int(want_partial) - int(seq.partial)
        seq.partial = want_partial
        self._seqs[seq_id] = seq
        self._evict_overflow()
        if runs and self.events is not None and self.enable_prefix_caching:
            for run_parent, hashes, first in runs:
                tokens_of_run = tokens[first * bs : (first + len(hashes)) * bs]
                self.events.stored(hashes, run_parent, list(tokens_of_run))
        return True

    def free(self, seq_id: str) -> None:
        """Release everything ``seq_id`` holds. Idempotent; unknown ids are a no-op."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        # Free the tail first so eviction order (LRU) drops long tails before shared prefixes.
        for key in reversed(seq.keys):
            refs = self._refs[key] - 1
            if refs:
                self._refs[key] = refs
                continue
            del self._refs[key]
            if self.enable_prefix_caching:
                self._evictable[key] = None  # private blocks (caching off) are simply gone
        if seq.partial:
            self._partials -= 1
        self._evict_overflow()

    def _evict_overflow(self) -> None:
        # Keep used + evictable <= num_blocks: evict least recently freed blocks.
        overflow = self.used_blocks + len(self._evictable) - self.num_blocks
        removed = []
        while overflow > 0 and self._evictable:
            key, _ = self._evictable.popitem(last=False)
            removed.append(key)
            overflow -= 1
        if removed and self.events is not None:
            self.events.removed(removed)

    def check_invariants(self) -> None:
        """Raise AssertionError if the accounting is inconsistent (used by tests)."""
        counted: dict[int, int] = {}
        partials = 0
        for seq in self._seqs.values():
            for key in seq.keys:
                counted[key] = counted.get(key, 0) + 1
            partials += int(seq.partial)
        assert counted == self._refs, "reference counts diverge from sequence holdings"
        assert partials == self._partials, "partial block count diverges"
        assert not (set(self._refs) & set(self._evictable)), "a block is both used and evictable"
        assert self.used_blocks + len(self._evictable) <= self.num_blocks, "pool over-committed"
