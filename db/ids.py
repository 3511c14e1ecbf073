"""Job ids: UUIDv7 (RFC 9562), time-ordered so that new rows land at the right edge of the
primary-key index instead of on random pages, and ties in claim order follow submission order."""

import os
import time
from uuid import UUID

_RAND_B_BITS = 62


def new_job_id() -> UUID:
    """48 bits of Unix milliseconds, version 7, 74 random bits."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> _RAND_B_BITS) & 0xFFF
    rand_b = rand & ((1 << _RAND_B_BITS) - 1)
    return UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
