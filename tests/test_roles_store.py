"""The weight store and the experience stream of roles, against a real redis-server:
torn reads, fencing, K kept + best, a version over Redis's 512 MB value limit, and the
stream's bound and exactly-once hand-over across a learner and an actor restart."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from orchestrator.roles.experience import GROUP, ExperienceStream
from orchestrator.roles.weights import Fenced, MiB, WeightStore

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def lease(client: redis.Redis) -> tuple[str, str]:
    key, token = f"orch:lease:test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    client.set(key, token)
    return key, token


def _payload(version_seed: int, size: int) -> bytes:
    # Every byte says which publish it belongs to: a torn read would mix values.
    return bytes([version_seed % 251]) * size


def test_readers_never_see_a_torn_version(client: redis.Redis, lease: tuple[str, str]) -> None:
    store = WeightStore(client, f"torn{uuid.uuid4().hex[:6]}", keep=2, chunk_bytes=256 * 1024)
    key, token = lease
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        mine = WeightStore(redis.Redis(connection_pool=client.connection_pool), store.experiment,
                           keep=2, chunk_bytes=256 * 1024)
        while not stop.is_set():
            try:
                got = mine.fetch()  # verifies every chunk's and the version's checksum
                if got is None:
                    continue
                seed = got.meta["seed"]
                assert got.data == _payload(seed, len(got.data)), "bytes of two publishes mixed"
                reads.append(got.number)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    published = []
    for seed in range(1, 41):  # sizes vary: versions of 1 to 8 chunks
        published.append(store.publish(_payload(seed, (1 + seed % 8) * 256 * 1024 - seed), token, key,
                                       step=seed, info={"seed": seed}))
    deadline = time.monotonic() + 20
    while len(set(reads)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert len(reads) >= 20 and len(set(reads)) >= 5, (len(reads), set(reads))
    assert set(reads) <= set(published)
    assert store.versions() == published[-2:]  # keep=2, no best marked
    store.clear()


def test_a_zombie_publishes_nothing(client: redis.Redis, lease: tuple[str, str]) -> None:
    store = WeightStore(client, f"zombie{uuid.uuid4().hex[:6]}", chunk_bytes=MiB)
    key, token = lease
    first = store.publish(b"a" * (3 * MiB), token, key, step=10)
    client.set(key, "the-successor's-token")  # the watchdog handed the instance on
    with pytest.raises(Fenced):
        store.publish(b"b" * (3 * MiB), token, key, step=20)
    assert store.latest() == first and store.versions() == [first]
    got = store.fetch()
    assert got is not None and got.step == 10 and got.data == b"a" * (3 * MiB)
    leftovers = [k for k in client.scan_iter(f"{store.prefix}:v:*") if not k.decode().startswith(f"{store.prefix}:v:{first}:")]
    assert leftovers == []  # the fenced version's chunks are gone, not left to expire
    store.clear()


def test_keeps_the_last_k_and_the_best(client: redis.Redis, lease: tuple[str, str]) -> None:
    store = WeightStore(client, f"keep{uuid.uuid4().hex[:6]}", keep=2, chunk_bytes=1000)
    key, token = lease
    vs = [store.publish(bytes([i]) * 2500, token, key, step=i) for i in range(1, 4)]
    assert store.mark_best(vs[1], 0.8) and not store.mark_best(vs[2], 0.7)
    vs += [store.publish(bytes([i]) * 2500, token, key, step=i) for i in range(4, 7)]
    assert store.versions() == [vs[1], vs[4], vs[5]]
    for gone in (vs[0], vs[2], vs[3]):
        assert store.fetch(gone) is None
        assert not list(client.scan_iter(f"{store.prefix}:v:{gone}:*"))
    best = store.fetch(vs[1])
    assert best is not None and best.data == bytes([2]) * 2500
    store.clear()


def test_a_version_over_512_mb_works(client: redis.Redis, lease: tuple[str, str]) -> None:
    store = WeightStore(client, f"big{uuid.uuid4().hex[:6]}", keep=1, chunk_bytes=64 * MiB)
    key, token = lease
    data = bytes(range(256)) * (600 * MiB // 256)
    version = store.publish(data, token, key, step=1)
    got = store.fetch(version)
    assert got is not None and len(got.data) == 600 * MiB and got.data == data
    assert got.meta["chunks"] == 10
    del got, data
    store.clear()


def test_stream_is_bounded_and_loses_nothing_across_restarts(client: redis.Redis, lease: tuple[str, str]) -> None:
    """Actors add numbered samples; a learner reads, publishes (acknowledging what it
    trained on) and restarts twice without publishing what it read last. Every sample
    ends up in exactly one published version; the stream never held more than its bound."""
    exp = f"xp{uuid.uuid4().hex[:6]}"
    stream = ExperienceStream(client, exp, maxlen=300)
    store = WeightStore(client, exp)
    key, token = lease
    total, batch = 1200, 40
    added: list[int] = []
    stop = threading.Event()
    longest = [0]

    def actor(start: int) -> None:
        mine = ExperienceStream(redis.Redis(connection_pool=client.connection_pool), exp, maxlen=300)
        n = start
        while n < start + total // 2:
            samples = [{"n": n + i} for i in range(batch)]
            if mine.add(samples, wait=0.5):
                added.extend(s["n"] for s in samples)
                n += batch
            # An actor that dies between batches (or inside a script) adds all or nothing.
            longest[0] = max(longest[0], mine.length())

    actors = [threading.Thread(target=actor, args=(k * 100_000,)) for k in range(2)]
    for t in actors:
        t.start()
    trained: list[int] = []  # samples inside published versions
    for life in range(3):  # two restarts: the reader is made again, nothing published of its last reads
        reader = stream.reader("learner.0")
        consumed: list[tuple[str, int]] = []
        rounds = 0
        while len(trained) < total and rounds < (8 if life < 2 else 10_000):
            entries = reader.read(count=50, block_ms=200)
            consumed += [(e.id, e.sample["n"]) for e in entries]
            rounds += 1
            if len(consumed) >= 100 or (entries == [] and consumed):
                store.publish(b"w", token, key, step=len(trained),
                              acks=(stream.key, GROUP, [i for i, _ in consumed]))
                stream.trim()
                trained += [n for _, n in consumed]
                consumed = []
            longest[0] = max(longest[0], stream.length())
        # life 0 and 1 end here with `consumed` read but never published: a crash
    stop.set()
    for t in actors:
        t.join(30)
    assert sorted(trained) == sorted(added) and len(added) == total  # none lost, none twice
    assert longest[0] <= 300
    assert stream.pending() == 0
    store.clear()
    stream.reset()


def test_entries_a_zombie_read_are_taken_back(client: redis.Redis, lease: tuple[str, str]) -> None:
    """A zombie learner (same consumer name) reads entries after the live learner's
    reader passed its history: the live reader takes them back once they are idle, so
    they neither stay pending (holding back the trim until the bound stops the actors)
    nor are lost; what the live reader returned itself is never returned twice."""
    exp = f"stray{uuid.uuid4().hex[:6]}"
    stream = ExperienceStream(client, exp, maxlen=1000)
    live = stream.reader("learner.0")
    live.RECHECK_S = 0.3  # type: ignore[misc]
    assert stream.add([{"n": i} for i in range(10)])
    first = live.read(count=5)  # past its history: now reading new entries
    zombie = ExperienceStream(redis.Redis(connection_pool=client.connection_pool), exp).reader("learner.0")
    zombie._history = None  # a zombie that woke up mid-loop reads new entries only
    stolen = zombie.read(count=3)
    assert [e.sample["n"] for e in first] == [0, 1, 2, 3, 4] and [e.sample["n"] for e in stolen] == [5, 6, 7]
    time.sleep(0.4)
    seen = [e.sample["n"] for e in first]
    deadline = time.monotonic() + 5
    while len(seen) < 10 and time.monotonic() < deadline:
        seen += [e.sample["n"] for e in live.read(count=10, block_ms=100)]
    assert sorted(seen) == list(range(10)), seen
    stream.reset()


def _actor_process(url: str, exp: str, start: int, stop_at: int, log: str) -> None:
    """An actor in its own process: numbered batches of 20; a line per confirmed batch."""
    stream = ExperienceStream(redis.Redis.from_url(url), exp, maxlen=400)
    n = start
    while n < stop_at:
        if stream.add([{"n": n + i} for i in range(20)], wait=1.0):
            with open(log, "a") as fh:
                fh.write(f"{n}\n")
            n += 20


def test_an_actor_killed_mid_stream_loses_and_repeats_nothing(redis_url: str, client: redis.Redis,
                                                             lease: tuple[str, str], tmp_path: Path) -> None:
    """An actor process SIGKILLed while adding, then started again from its last
    confirmed batch, while a learner reads and publishes: every confirmed sample is
    trained exactly once; at most the one batch in flight at the kill may be in the
    stream unconfirmed (whole or not at all, never in part)."""
    exp = f"xpkill{uuid.uuid4().hex[:6]}"
    stream, store = ExperienceStream(client, exp, maxlen=400), WeightStore(client, exp)
    stream.ensure_group()
    key, token = lease
    log = tmp_path / "confirmed.txt"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_actor_process, args=(redis_url, exp, 0, 2000, str(log)))
    first.start()
    reader = stream.reader("learner.0")
    trained: list[int] = []

    def learn(until: float) -> None:
        while time.monotonic() < until:
            entries = reader.read(count=100, block_ms=100)
            if entries:
                store.publish(b"w", token, key, acks=(stream.key, GROUP, [e.id for e in entries]))
                reader.acknowledged([e.id for e in entries])
                stream.trim()
                trained.extend(e.sample["n"] for e in entries)

    deadline = time.monotonic() + 30
    while (not log.exists() or len(log.read_text().split()) < 10) and time.monotonic() < deadline:
        learn(time.monotonic() + 0.1)
    assert first.pid is not None
    os.kill(first.pid, signal.SIGKILL)
    first.join(10)
    confirmed = [int(x) for x in log.read_text().split()]
    # The successor plays new games (numbers of its own): a batch the killed actor added
    # without hearing back is not added again.
    second = ctx.Process(target=_actor_process, args=(redis_url, exp, 10_000, 11_000, str(log)))
    second.start()
    deadline = time.monotonic() + 60
    while second.is_alive() and time.monotonic() < deadline:
        learn(time.monotonic() + 0.1)
    assert not second.is_alive()
    learn(time.monotonic() + 0.5)
    confirmed = [int(x) for x in log.read_text().split()]
    expected = {n + i for n in confirmed for i in range(20)}
    assert len(trained) == len(set(trained)), "a sample was trained twice"
    assert expected <= set(trained), "a confirmed sample was lost"
    extra = set(trained) - expected  # a batch added just before the kill, its reply lost
    assert len(extra) in (0, 20) and (not extra or max(extra) - min(extra) == 19)
    assert stream.pending() == 0
    store.clear()
    stream.reset()


def test_the_acl_users_may_do_what_roles_need(tmp_path: Path) -> None:
    """deploy/redis-users.acl loaded into a private Redis (plain TCP: tests/test_acl.py
    covers TLS): the worker user publishes and fetches weights, adds to and reads the
    stream, and hears the ready channel; the control user reads what `status` reads;
    the submitter creates the stream's group. Nothing of it is denied (ACL LOG)."""
    import hashlib
    import shutil
    import subprocess

    from orchestrator.cluster.local import free_port, spawn, stop_process
    from orchestrator.roles.experience import ExperienceStream as Stream

    from .conftest import REPO, wait_for

    users = ("admin", "worker", "control", "submitter", "flower")
    passwords = {u: f"{u}-{uuid.uuid4().hex[:8]}" for u in users}
    text = (REPO / "deploy" / "redis-users.acl").read_text()
    for user, password in passwords.items():
        text = text.replace(f"#{user.upper()}_PASSWORD_SHA256", "#" + hashlib.sha256(password.encode()).hexdigest())
    acl = tmp_path / "users.acl"
    acl.write_text(text)
    port = free_port()
    exe = shutil.which("redis-server")
    assert exe
    proc: subprocess.Popen[bytes] = spawn([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                                           "--save", "", "--appendonly", "no", "--aclfile", str(acl),
                                           "--logfile", str(tmp_path / "redis.log")], dict(os.environ), tmp_path / "out")

    def as_user(user: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, username=user, password=passwords[user], socket_timeout=5)

    def up() -> bool:
        try:
            return bool(as_user("admin").ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(up, timeout=15, what="the ACL redis-server")
        admin, worker, control, submitter = (as_user(u) for u in ("admin", "worker", "control", "submitter"))
        Stream(submitter, "acl").ensure_group()
        key = "orch:lease:role.acl.learner.0"
        worker.set(key, "tok")
        store = WeightStore(worker, "acl", keep=1, chunk_bytes=1000)
        stream = Stream(worker, "acl", maxlen=100)
        assert stream.add([{"n": 1}, {"n": 2}])
        reader = stream.reader("learner.0")
        entries = reader.read(count=10)
        heard = threading.Thread(target=lambda: store.wait_newer(None, timeout=5))
        heard.start()
        v = store.publish(b"x" * 2500, "tok", key, step=1, acks=(stream.key, GROUP, [e.id for e in entries]))
        heard.join(10)
        stream.trim()
        assert store.fetch(v) is not None and store.mark_best(v, 1.0)
        assert Stream(control, "acl").length() == 0 and Stream(control, "acl").pending() == 0
        assert WeightStore(control, "acl").latest() == v
        denied = admin.acl_log(count=100)
        assert denied == [], denied
    finally:
        stop_process(proc)
