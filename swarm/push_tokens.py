"""Which pushes a session accepts: only the hop its client named, with that hop's secret.

With push, a step's output goes from each server of a chain straight to the next one. Every
server of the chain learns the session ids of the servers after it, so a session id alone must
not be enough to write into a session. The client gives each session a random ``push_key`` when
it opens it (over the client's own stream, which libp2p encrypts). For every step it names the
server expected to push into each session after the first, and gives that hop a token:
HMAC-SHA256 under the session's key of (the pusher's peer id, the step id, the start position,
the number of new tokens, the beam reorder). The receiving server checks the token against the
peer id that opened the push stream (libp2p authenticates it), so:

- a token is useless to any other peer (the first server of a chain, which sees every token, cannot
  push into the third server's session: it is not the second server);
- it is good for that one step, at the position and with the reorder the client chose, and a
  server answers each step id once, so a push can never rewind a cache or replay an old step;
- a session opened without a key accepts no pushes at all.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import torch

KEY_BYTES = 32
TOKEN_BYTES = 16


def new_push_key() -> bytes:
    return os.urandom(KEY_BYTES)


def push_token(key: bytes, pusher: str, step_id: int, start_position: int, new_tokens: int,
               hypo_ids: torch.Tensor | None) -> bytes:
    """The token that lets ``pusher`` push this step into the session of ``key``."""
    reorder = b"" if hypo_ids is None else hypo_ids.to("cpu", torch.int64).contiguous().numpy().tobytes()
    text = b"swarm-push\0%s\0%d\0%d\0%d\0" % (pusher.encode(), step_id, start_position, new_tokens)
    return hmac.new(key, text + reorder, hashlib.sha256).digest()[:TOKEN_BYTES]


def check_push_token(key: bytes, token: bytes, pusher: str, step_id: int, start_position: int, new_tokens: int,
                     hypo_ids: torch.Tensor | None) -> bool:
    if not key or step_id <= 0 or len(token) != TOKEN_BYTES:
        return False
    return hmac.compare_digest(token, push_token(key, pusher, step_id, start_position, new_tokens, hypo_ids))
