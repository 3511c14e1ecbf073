"""API keys: `Authorization: Bearer <key>`. Only SHA-256 hashes are stored; a key owns its jobs."""

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from db import JobStore
from handler.http.errors import refusal

KEY_PREFIX = "ace_"


@dataclass(frozen=True)
class Caller:
    """Who is asking: `owner` scopes every job and file they can see."""

    owner: str
    max_queued: int


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(store: JobStore, name: str, *, max_queued: int | None = None) -> tuple[str, str]:
    """Make and record a key; returns (key id, key). The key is not stored and cannot be shown again."""
    key_id = f"key_{secrets.token_hex(6)}"
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    store.add_api_key(key_id, name, hash_key(key), max_queued=max_queued)
    return key_id, key


class Authenticator:
    """Resolves the Authorization header to a Caller. Open mode: everyone is the one anonymous owner."""

    CACHE_SECONDS = 5.0  # how long a revoked key may still work in a process that saw it just before
    CACHE_SIZE = 10_000  # keys remembered at most (least recently used go first); unknown keys are not kept

    def __init__(self, store: JobStore, *, open_mode: bool, default_max_queued: int):
        self._store = store
        self.open_mode = open_mode
        self._default_max_queued = default_max_queued
        self._cache: OrderedDict[str, tuple[float, Caller]] = OrderedDict()
        self._lock = threading.Lock()

    def caller(self, authorization: str | None) -> Caller:
        if self.open_mode:
            return Caller(owner="", max_queued=self._default_max_queued)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise refusal(401, "Authorization", "missing API key: send Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"})
        found = self._lookup(hash_key(key.strip()))
        if found is None:
            raise refusal(401, "Authorization", "invalid API key", {"WWW-Authenticate": "Bearer"})
        return found

    def _lookup(self, key_hash: str) -> Caller | None:
        """The key's caller: from the cache of recently seen valid keys, else the database (an
        indexed lookup). Invalid keys are never cached, so a flood of random keys fills nothing."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key_hash)
            if cached and cached[0] > now:
                self._cache.move_to_end(key_hash)
                return cached[1]
        row = self._store.find_api_key(key_hash)
        if row is None:
            with self._lock:
                self._cache.pop(key_hash, None)
            return None
        caller = Caller(owner=row["id"], max_queued=row["max_queued"] or self._default_max_queued)
        with self._lock:
            self._cache[key_hash] = (now + self.CACHE_SECONDS, caller)
            self._cache.move_to_end(key_hash)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return caller
