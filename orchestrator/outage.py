"""A Redis outage (a restart, a failover, a cut link) as opposed to a failure of its own.

A run whose trainer raises has failed, and is retried up to its `retries`; a run, or a
group's finalize, that met Redis restarting has not: it waits for Redis and is tried
again, and only an outage that outlasts OUTAGE_WAIT_SECONDS (or comes back more than
OUTAGE_RETRIES times for one run) counts against it (orchestrator.execution.attempt,
orchestrator.collect.groupend).
"""

from __future__ import annotations

import time
from typing import Any

import redis

# How long an attempt or a finalize waits for Redis to answer again before giving up
# on it (a restarted Redis loading its append-only file answers LOADING meanwhile).
OUTAGE_WAIT_SECONDS = 60.0
# Outages that one run may meet mid-attempt (each retried, not counted against its
# `retries`) before the next one counts as its failure: Redis flapping for ever must
# not keep a run alive for ever.
OUTAGE_RETRIES = 5
POLL_SECONDS = 0.25


def is_outage(exc: BaseException | None) -> bool:
    """Whether `exc`, or what it was raised from, is Redis not answering: a connection
    refused, reset or timed out, or a Redis still loading its data after a restart."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # BusyLoadingError included
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def wait_for_redis(client: Any, seconds: float = OUTAGE_WAIT_SECONDS) -> bool:
    """Ping `client` until Redis answers (True) or `seconds` have passed (False)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return True
        except redis.RedisError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
