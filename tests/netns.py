"""Hosts for real, on one machine: a hub network namespace with a bridge, and one namespace
per worker host joined to it by a veth pair, so that cutting a host's link is a network
partition and not a pause (tests/test_multihost.py, tests/test_data_parallel_hosts.py).

Every address lives inside a namespace a test creates; none in the root namespace, and
nothing is sent anywhere else. Each test module owns its own names, subnet and lock file
(`Network`), so that two of them can run on one machine at the same time.

A link is cut on the hub's side (`ip link set <host>0 down`), as when a switch port or a
cable dies: the host's interface loses its carrier, what it sends on its open connections
vanishes without an error (a call waits for its socket timeout), and a new connection
fails once ARP gives up ("No route to host").
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Host:
    netns: str
    hostname: str
    hub_port: str  # the veth end on the hub's bridge: set down to cut the host off
    addr: str


@dataclass(frozen=True)
class Network:
    """A hub namespace (bridge `bridge` at `hub_addr`/24) and `hosts`, each with its own
    hostname (UTS namespace) when its commands run through `in_netns`."""

    hub: str
    bridge: str
    hub_addr: str
    hosts: dict[str, Host]
    lock: Path  # one session at a time may own these names

    def remove(self) -> None:
        """Delete the namespaces (their veths and bridge go with them); no error if they
        are not there. A process still inside one keeps it alive but nameless: a new
        namespace of the same name is a fresh one."""
        for ns in (self.hub, *(h.netns for h in self.hosts.values())):
            ip("netns", "del", ns, check=False)

    def create(self) -> None:
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        ip("-n", self.hub, "addr", "add", f"{self.hub_addr}/24", "dev", self.bridge)
        ip("-n", self.hub, "link", "set", self.bridge, "up")
        for h in self.hosts.values():
            ip("netns", "add", h.netns)
            ip("-n", h.netns, "link", "set", "lo", "up")
            # Made inside the namespaces: no interface of a test ever exists in the root one.
            ip("-n", self.hub, "link", "add", h.hub_port, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            ip("-n", self.hub, "link", "set", h.hub_port, "master", self.bridge, "up")
            ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            ip("-n", h.netns, "link", "set", "eth0", "up")
            probe = subprocess.run(in_netns(h.netns, ["true"], hostname=h.hostname),
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode != 0:
                raise RuntimeError(f"`unshare --uts` (a hostname per host) failed: {probe.stderr.strip()}")

    def set_link(self, host: Host, up: bool) -> None:
        ip("-n", self.hub, "link", "set", host.hub_port, "up" if up else "down")

    @contextlib.contextmanager
    def owned(self, what: str, wait: float = 180) -> Iterator[None]:
        """The network made (after whatever a crashed run left), held under its lock, and
        removed at the end; the test is skipped where namespaces cannot be made, or when
        another session holds the lock for longer than `wait` seconds."""
        if (why := namespaces_unavailable()) is not None:
            pytest.skip(f"{what} skipped: {why}")
        with open(self.lock, "w") as lock:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        pytest.skip(f"{what} skipped: another session holds {self.lock} (its namespaces)")
                    time.sleep(1)
            self.remove()
            try:
                try:
                    self.create()
                except RuntimeError as exc:
                    pytest.skip(f"{what} skipped: cannot make network namespaces here: {exc}")
                yield
            finally:
                self.remove()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def in_netns(netns: str, argv: list[str], hostname: str | None = None) -> list[str]:
    """`argv` run inside `netns` (same pid: ip, unshare and sh all exec), with its own
    hostname when given."""
    prefix = ["ip", "netns", "exec", netns]
    if hostname is not None:
        prefix += ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname]
    return prefix + argv


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run a test of these, or None."""
    if os.geteuid() != 0:
        return f"network namespaces need root (ip netns add); running as uid {os.geteuid()}"
    for tool in ("ip", "unshare", "redis-server"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None
