"""The KV cache budget: every inference session reserves its worst case up front.

A session that may hold ``max_length`` tokens for a batch of ``batch_size`` over ``n`` blocks
reserves ``max_length * batch_size * n`` token-blocks of the server's budget
(``cache_tokens * span length``) when it opens and returns them when it closes, so memory never
grows past the budget however the sessions' caches fill up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from swarm.errors import ServerBusy


class CacheBudget:
    def __init__(self, cache_tokens: int, num_blocks: int, bytes_per_token_block: int):
        self.capacity = cache_tokens * num_blocks  # token-blocks
        self.used = 0
        self.num_blocks = num_blocks
        self.bytes_per_token_block = bytes_per_token_block

    @property
    def tokens_left(self) -> int:
        """Tokens a new session could still hold across the whole span."""
        return (self.capacity - self.used) // self.num_blocks

    @contextlib.contextmanager
    def reserve(self, tokens: int, blocks: int) -> Iterator[None]:
        need = tokens * blocks
        if self.used + need > self.capacity:
            raise ServerBusy(
                f"this server's KV cache is full: the session needs {tokens} tokens x {blocks} blocks, "
                f"{(self.capacity - self.used) // max(blocks, 1)} tokens are left (the server's --cache-tokens); "
                "try a shorter max_length, a smaller batch, or another server"
            )
        self.used += need
        try:
            yield
        finally:
            self.used -= need
