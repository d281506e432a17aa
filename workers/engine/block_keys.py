"""Keys of full KV blocks: the one definition the engine's prefix cache uses (and a router may use
to know what a replica holds).

key(block i) = BLAKE2b-128(key(block i-1) || token ids of block i), keyed with a secret salt per
cluster. A keyed cryptographic hash means a client cannot craft a prompt whose block collides
with another tenant's (the class of vLLM's CVE-2025-25183, where Python's `hash` was used); the
salt is the same in every replica of a cluster, so a key means the same thing everywhere, and it
is never returned to clients. A request's optional `cache_salt` roots its chain elsewhere: requests
with different salts never share a block, so time to first token cannot reveal whether another
tenant sent the same prompt.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Sequence

BlockKey = bytes
KEY_BYTES = 16


def new_salt() -> bytes:
    return os.urandom(32)


class BlockKeyer:
    """Chained block keys under one secret salt."""

    def __init__(self, salt: bytes):
        if not 16 <= len(salt) <= 64:  # BLAKE2b takes keys of up to 64 bytes
            raise ValueError("a block-key salt has 16 to 64 bytes")
        self._salt = salt

    @property
    def salt(self) -> bytes:
        """For engines that must compute the same keys (in-process only: never sent to clients)."""
        return self._salt

    def root(self, cache_salt: str | None) -> BlockKey | None:
        """The parent of a request's first block: none, or one derived from its cache_salt."""
        if not cache_salt:
            return None
        return hashlib.blake2b(b"cache_salt:" + cache_salt.encode(), key=self._salt, digest_size=KEY_BYTES).digest()

    def key(self, parent: BlockKey | None, tokens: Sequence[int]) -> BlockKey:
        h = hashlib.blake2b(key=self._salt, digest_size=KEY_BYTES)
        h.update(parent or b"\0" * KEY_BYTES)
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def keys(self, tokens: Sequence[int], block_size: int, cache_salt: str | None = None) -> list[BlockKey]:
        """Keys of every full block of `tokens`, in order."""
        out, parent = [], self.root(cache_salt)
        for i in range(len(tokens) // block_size):
            parent = self.key(parent, tokens[i * block_size:(i + 1) * block_size])
            out.append(parent)
        return out
