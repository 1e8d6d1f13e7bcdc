"""A torch.distributed Store kept in Redis: where the ranks of a data-parallel run meet.

PyTorch lets a Python class implement its Store interface (the PythonStore trampoline
that torchelastic's EtcdStore used); torch.distributed then runs its own rendezvous
(gloo's full mesh, NCCL's unique id) over it. Every key lives under one prefix per
attempt (orchestrator.keys.ddp_prefix), so an old attempt's keys can never answer a new
one (reused keys can hang: pytorch#28552), and expires with it. Works across hosts:
the ranks need only the Redis they already share; gloo and NCCL publish their own
addresses and ports through the store.

torch is imported at the top: only the process that trains imports this module.
"""

from __future__ import annotations

import contextlib
import socket
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

POLL_SECONDS = 0.01  # a blocked get/wait looks again this often (loopback: ~0.1 ms a call)
KEY_TTL_SECONDS = 24 * 3600  # an attempt's keys outlive it by this much, then vanish

# compare_set as torch defines it: set `desired` when the key holds `expected` (or is
# missing and `expected` is empty); return the value the key holds afterwards.
_COMPARE_SET = """
local cur = redis.call('GET', KEYS[1])
if (cur == false and ARGV[1] == '') or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  return ARGV[2]
end
if cur == false then return ARGV[1] end
return cur
"""


class RedisStore(dist.Store):  # type: ignore[misc]
    """torch.distributed.Store on Redis under `prefix` (see the module docstring)."""

    def __init__(self, client: Any, prefix: str, timeout: float = 300.0):
        super().__init__()
        self.client, self.prefix = client, prefix
        self._timeout = timedelta(seconds=timeout)
        self._compare_set = client.register_script(_COMPARE_SET)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def set(self, key: str, value: Any) -> None:
        self.client.set(self._k(key), bytes(value), ex=KEY_TTL_SECONDS)

    def get(self, key: str) -> bytes:
        self.wait([key])
        raw = self.client.get(self._k(key))
        return b"" if raw is None else bytes(raw)

    def add(self, key: str, value: int) -> int:
        pipe = self.client.pipeline()
        pipe.incrby(self._k(key), int(value))
        pipe.expire(self._k(key), KEY_TTL_SECONDS)
        return int(pipe.execute()[0])

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return bytes(self._compare_set(keys=[self._k(key)],
                                       args=[bytes(expected), bytes(desired), KEY_TTL_SECONDS]))

    def check(self, keys: list[str]) -> bool:
        return bool(keys) and int(self.client.exists(*[self._k(k) for k in keys])) == len(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit = (timeout or self._timeout).total_seconds()
        deadline = time.monotonic() + limit
        while not self.check(keys):
            if time.monotonic() > deadline:
                raise TimeoutError(f"store keys {keys} not set within {limit:g} s")
            time.sleep(POLL_SECONDS)

    def delete_key(self, key: str) -> bool:
        return bool(self.client.delete(self._k(key)))

    def num_keys(self) -> int:
        return sum(1 for _ in self.client.scan_iter(match=self.prefix + "*", count=1000))

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    def clone(self) -> RedisStore:
        return RedisStore(self.client, self.prefix, self._timeout.total_seconds())


def route_interface(client: Any) -> tuple[str, str] | None:
    """(interface, address) this host reaches the Redis of `client` through, when Redis is
    on another host (TCP, not loopback); else None. Every rank reaches that Redis, so the
    interface toward it is one the ranks can reach each other through, whatever the host
    names resolve to (gloo binds to the host name's address by default). IPv4, Linux."""
    import fcntl
    import struct

    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    host, port = kw.get("host"), int(kw.get("port") or 6379)
    if not host or "path" in kw:
        return None
    try:
        target = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(target)  # a route lookup: nothing is sent
            mine = probe.getsockname()[0]
    except OSError:
        return None
    if mine.startswith("127."):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                if socket.inet_ntoa(packed[20:24]) == mine:
                    return name, mine
    return None
