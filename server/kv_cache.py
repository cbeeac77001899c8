"""The KV cache: pages from one pool, charged to the budget as sessions fill them.

The budget is ``--cache-tokens`` tokens in every block of the span, cut into pages of
:data:`PAGE_TOKENS` tokens. A page holds the keys and values of its tokens in every block of the
span (a session over part of the span still takes whole pages). Nothing is reserved when a session
opens: it takes pages as its rows grow (:meth:`SessionCache.grow`, all or nothing, else
:class:`~swarm.errors.ServerBusy`) and gives them back when it rolls back or closes.

- :class:`PagePool`: which pages are free (bookkeeping only; thread-safe).
- :class:`SessionCache`: one session's pages, a page table ``[batch, pages]``, its length and its
  padding mask.
- :class:`PagedKV`: the memory: per block, keys and values of every token slot
  (``[slots, kv heads, head dim]``), grown on demand up to the budget and freed when no session
  holds a page. :meth:`PagedKV.view` gives the blocks of one batched step their cache.

Slot ``page * PAGE_TOKENS + offset`` is a token's place in every block. Page 0 is never handed out:
a batch's page table pads shorter rows with it (those entries are never read).

What a running session that needs a page finds when none is free: its step fails with ``ServerBusy``
and changes nothing (the client fails over to another server); no other session is touched, and
nothing is evicted. New sessions are refused while fewer than one page per row is free; clients
route a new session only to servers announcing room for its whole ``max_length``, which leaves the
sessions already there room to grow into.
"""

from __future__ import annotations

import heapq
import threading
from typing import Protocol

import torch

from swarm.errors import ConfigError, ServerBusy

PAGE_TOKENS = 16


class PagePool:
    """The free pages of a budget of ``cache_tokens`` tokens (rounded down to whole pages)."""

    def __init__(self, cache_tokens: int, num_blocks: int, bytes_per_token_block: int,
                 page_tokens: int = PAGE_TOKENS):
        self.page_tokens = page_tokens
        self.capacity = cache_tokens // page_tokens  # pages
        if self.capacity < 1:
            raise ConfigError(f"--cache-tokens {cache_tokens} is less than one page of the KV cache ({page_tokens} "
                              "tokens); give at least that")
        self.num_blocks = num_blocks
        self.bytes_per_token_block = bytes_per_token_block
        self.lock = threading.Lock()  # pages are taken on the compute thread and given back from the event loop
        self._free = list(range(1, self.capacity + 1))  # a heap: the lowest pages go first, keeping memory compact
        self._retired: list[int] = []  # pages of sessions closed while a batch may still write them
        self.top = 0  # the highest page taken since the pool was last empty: the storage holds pages 0..top

    @property
    def used(self) -> int:
        return self.capacity - len(self._free) - len(self._retired)

    @property
    def tokens_left(self) -> int:
        """Tokens (of one row) that fit the free pages."""
        return (len(self._free) + len(self._retired)) * self.page_tokens

    @property
    def page_bytes(self) -> int:
        return self.page_tokens * self.num_blocks * self.bytes_per_token_block

    @property
    def capacity_bytes(self) -> int:
        return self.capacity * self.page_bytes

    def take(self, count: int, what: str = "", highest: bool = False) -> list[int]:
        """``count`` free pages, or :class:`ServerBusy` (and nothing taken). ``highest``: pages that only
        stand for memory held elsewhere (never written), taken from the top so the KV storage need not
        grow to hold them."""
        with self.lock:
            if count > len(self._free):
                raise ServerBusy(
                    f"this server's KV cache is full: {what or 'the step'} needs {count * self.page_tokens} more "
                    f"tokens of cache, {len(self._free) * self.page_tokens} are free (of --cache-tokens "
                    f"{self.capacity * self.page_tokens}); retry later or use another server")
            if highest:
                pages = heapq.nlargest(count, self._free)
                taken = set(pages)
                self._free = [page for page in self._free if page not in taken]
                heapq.heapify(self._free)
                return pages
            pages = [heapq.heappop(self._free) for _ in range(count)]
            self.top = max([self.top, *pages])
            return pages

    def give(self, pages: list[int]) -> None:
        """Frees ``pages`` now (on the compute side, between or before a batch's writes)."""
        with self.lock:
            for page in pages:
                heapq.heappush(self._free, page)
            if len(self._free) == self.capacity:
                self.top = 0

    def retire(self, pages: list[int]) -> None:
        """Frees ``pages`` at the next :meth:`collect` (from the event loop: a batch running now may still
        write them, and must not find them handed to another session meanwhile)."""
        with self.lock:
            self._retired.extend(pages)

    def collect(self) -> None:
        """Frees the retired pages; only where no batch runs (the compute lock is held)."""
        with self.lock:
            retired, self._retired = self._retired, []
        self.give(retired)


class Account(Protocol):
    """Who a session's pages are charged to besides the pool (a peer's share: :mod:`server.quotas`)."""

    def take(self, count: int, what: str) -> None: ...  # raises ServerBusy past the share

    def give(self, count: int) -> None: ...


class ReorderMark:
    """The last beam reorder applied to a session's rows: at which position, by which ``hypo_ids``.

    The same reorder at the same position again is the same step once more: the client sent its own copy of
    a step the server before this one had pushed here already (after a hedge), or retried it. The rows moved
    already and must not move twice."""

    def __init__(self) -> None:
        self.position = -1
        self.ids: torch.Tensor | None = None  # [batch] int64, on the CPU

    def first(self, position: int, hypo_ids: torch.Tensor) -> bool:
        """Whether reordering by ``hypo_ids`` at ``position`` is new; if so, it counts as applied from now on."""
        ids = hypo_ids.to("cpu", torch.int64)
        if position == self.position and self.ids is not None and torch.equal(ids, self.ids):
            return False
        self.position, self.ids = position, ids.clone()
        return True


class SessionCache:
    """The pages of one session of ``batch`` rows; every row holds ``length`` tokens. Everything else the
    session holds (deep prompts, LoRA weights) is charged as pages too (:meth:`charge`)."""

    def __init__(self, pool: PagePool, batch: int, account: Account | None = None):
        self.pool, self.batch, self.account = pool, batch, account
        self.charged: list[int] = []  # pages standing for the bytes charged
        self.length = 0
        self.table = torch.zeros(batch, 0, dtype=torch.int64)  # [batch, pages]: row r's pages in order
        self.key_mask: torch.Tensor | None = None  # [batch, length] bool, False for padding; None: no padding
        self.reordered = ReorderMark()  # the last beam reorder of its rows (PagedKV.reorder applies each once)
        self.closed = False
        self._lock = threading.Lock()  # closed from the event loop while a batch may be growing it

    def pages_for(self, length: int) -> int:
        return -(-length // self.pool.page_tokens)

    def _take(self, count: int, what: str, highest: bool = False) -> list[int]:
        pages = self.pool.take(count, what, highest)
        if self.account is not None:
            try:
                self.account.take(count, what)
            except ServerBusy:
                self.pool.give(pages)
                raise
        return pages

    def _give(self, pages: list[int]) -> None:
        if self.account is not None and pages:
            self.account.give(len(pages))

    def charge(self, nbytes: int, what: str) -> None:
        """Holds pages for ``nbytes`` of memory the session keeps outside the cache until it closes
        (all or nothing, else ServerBusy)."""
        pages = -(-nbytes // self.pool.page_bytes)
        if pages:
            with self._lock:
                self.charged += self._take(pages, what, highest=True)

    def missing_pages(self, length: int) -> int:
        """Pages :meth:`grow` to ``length`` would take."""
        return max(0, self.pages_for(length) - self.table.shape[1]) * self.batch

    def grow(self, length: int) -> None:
        """Makes room for ``length`` tokens per row: takes the pages missing, all or none (ServerBusy)."""
        with self._lock:
            if self.closed:
                raise ServerBusy("this session was closed while its step waited")
            missing = self.pages_for(length) - self.table.shape[1]
            if missing <= 0:
                return
            pages = self._take(missing * self.batch, f"this session ({self.batch} rows to {length} tokens)")
            self.table = torch.cat([self.table, torch.tensor(pages, dtype=torch.int64).view(self.batch, missing)],
                                   dim=1)

    def crop(self, length: int, keep: int = 0) -> None:
        """Rolls back to ``length`` tokens per row; pages past ``max(length, keep)`` tokens go back to the pool."""
        self.length = min(self.length, length)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :self.length]
        keep = self.pages_for(max(self.length, keep))
        with self._lock:
            if keep < self.table.shape[1] and not self.closed:  # a closed session's pages are retired already
                freed, self.table = self.table[:, keep:], self.table[:, :keep]
                self.pool.give(freed.reshape(-1).tolist())
                self._give(freed.reshape(-1).tolist())

    def close(self) -> None:
        """The session ended (from the event loop): its pages are freed before the next batch runs."""
        with self._lock:
            if not self.closed:
                self.closed = True
                pages = self.table.reshape(-1).tolist() + self.charged
                self.pool.retire(pages)
                self._give(pages)

    def slots(self, start: int, end: int) -> torch.Tensor:
        """[batch, end - start]: the slots of positions ``start..end-1`` of every row (pages taken already)."""
        positions = torch.arange(start, end)
        pages = self.table[:, positions // self.pool.page_tokens]
        return pages * self.pool.page_tokens + positions % self.pool.page_tokens

    def append_mask(self, mask: torch.Tensor | None, new: int) -> None:
        """Records the padding of ``new`` tokens appended at ``length`` ([batch, new] bool, None: none)."""
        if mask is None and self.key_mask is None:
            return
        kept = self.key_mask if self.key_mask is not None else torch.ones(self.batch, self.length, dtype=torch.bool)
        mask = torch.ones(self.batch, new, dtype=torch.bool) if mask is None else mask.cpu()
        self.key_mask = torch.cat([kept[:, :self.length], mask], dim=1)


class PagedKV:
    """Keys and values of every slot, for each block of a span (allocated lazily, per block)."""

    def __init__(self, pool: PagePool, span_start: int, num_blocks: int, device: torch.device):
        self.pool, self.span_start, self.device = pool, span_start, device
        self.keys: list[torch.Tensor | None] = [None] * num_blocks  # [slots, kv heads, head dim]
        self.values: list[torch.Tensor | None] = [None] * num_blocks

    def release_if_unused(self) -> None:
        """Frees closed sessions' pages, and the memory once no session holds a page (it grows again from
        small); where compute runs, never during a batch."""
        self.pool.collect()
        if self.pool.used == 0:
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)

    def reorder(self, cache: SessionCache, hypo_ids: torch.Tensor) -> None:
        """Row ``r`` of ``cache`` becomes a copy of row ``hypo_ids[r]`` (beam search), in every block; the
        same reorder at the same length as the last one is not applied again (:class:`ReorderMark`)."""
        if not cache.reordered.first(cache.length, hypo_ids) or cache.length == 0:
            return
        slots = cache.slots(0, cache.length).to(self.device)  # [batch, length]
        source = slots[hypo_ids.to(self.device)].reshape(-1)
        for store in (*self.keys, *self.values):
            if store is not None:
                store.index_copy_(0, slots.reshape(-1), store.index_select(0, source))
        if cache.key_mask is not None:
            cache.key_mask = cache.key_mask[hypo_ids.cpu()]

    def view(self, write: torch.Tensor, read: torch.Tensor) -> "BatchView":
        """The cache the blocks of one step see: ``write`` [rows, new] slots of the new tokens, ``read``
        [rows, keys] slots of every key each row attends to (left-padded with slot 0)."""
        return BatchView(self, write.to(self.device), read.to(self.device))

    def grown(self, stores: list[torch.Tensor | None], index: int, like: torch.Tensor) -> torch.Tensor:
        """``stores[index]`` (keys or values of block ``index``), allocated or grown (at least doubling) to
        hold every page taken so far; ``like``: [rows, heads, tokens, dim] states of that block."""
        needed = (self.pool.top + 1) * self.pool.page_tokens
        store = stores[index]
        if store is not None and store.shape[0] >= needed:
            return store
        limit = (self.pool.capacity + 1) * self.pool.page_tokens
        size = min(limit, max(needed, 2 * store.shape[0] if store is not None else 4 * self.pool.page_tokens))
        grown = torch.zeros(size, like.shape[1], like.shape[3], dtype=like.dtype, device=self.device)
        if store is not None:
            grown[:store.shape[0]] = store
        stores[index] = grown
        return grown


class BatchView:
    """What the blocks of one batched step get as their cache: ``update`` writes the new keys and values
    and returns every key and value each row attends to, ``[rows, kv heads, keys, head dim]``."""

    def __init__(self, kv: PagedKV, write: torch.Tensor, read: torch.Tensor):
        self.kv, self.write, self.read, self.read_flat = kv, write.reshape(-1), read, read.reshape(-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        index = layer_idx - self.kv.span_start
        rows, keys = self.read.shape
        out = []
        for states, stores in ((key_states, self.kv.keys), (value_states, self.kv.values)):
            _, heads, new, dim = states.shape  # [rows, heads, new tokens, head dim]
            store = self.kv.grown(stores, index, states)
            store.index_copy_(0, self.write, states.transpose(1, 2).reshape(rows * new, heads, dim))
            gathered = store.index_select(0, self.read_flat)  # [rows * keys, heads, dim]
            out.append(gathered.view(rows, keys, heads, dim).transpose(1, 2))
        return out[0], out[1]
