"""API keys: `Authorization: Bearer <key>`. Only SHA-256 hashes are stored; a key owns its jobs."""

import hashlib
import secrets
import time
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

    CACHE_SECONDS = 30.0

    def __init__(self, store: JobStore, *, open_mode: bool, default_max_queued: int):
        self._store = store
        self.open_mode = open_mode
        self._default_max_queued = default_max_queued
        self._cache: dict[str, tuple[float, Caller | None]] = {}

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
        now = time.monotonic()
        cached = self._cache.get(key_hash)
        if cached and cached[0] > now:
            return cached[1]
        row = self._store.find_api_key(key_hash)
        caller = None
        if row is not None:
            caller = Caller(owner=row["id"], max_queued=row["max_queued"] or self._default_max_queued)
        self._cache[key_hash] = (now + self.CACHE_SECONDS, caller)
        return caller
