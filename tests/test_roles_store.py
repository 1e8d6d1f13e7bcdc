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


# -- evaluators: every version, in order, once ------------------------------------------

def _ttt_version(seed: int) -> bytes:
    from orchestrator.roles import ttt_game as game

    return game.to_bytes(game.init_params(seed))


def _evaluator_spec(exp: str, games: int, unscored: int = 8) -> dict[str, object]:
    from orchestrator.roles.spec import RoleSpec

    return RoleSpec(experiment=exp, role="evaluator", function="tictactoe.evaluator", kind="evaluator", index=0,
                    count=1, gpus=0.0, settings={"games": games, "games_best": 4}, keep=1,
                    unscored=unscored).to_dict()


def _records(client: redis.Redis, exp: str) -> list[dict[str, object]]:
    from orchestrator.roles.instance import evaluations

    got = evaluations(client, exp)
    return [got[v] for v in sorted(got)]


def test_the_evaluator_scores_every_version_in_order(client: redis.Redis, lease: tuple[str, str],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Five versions published while the evaluator is held back (not started) all stay
    in Redis (keep 1: they are pinned until scored); the evaluator (the example's, as a
    worker runs it, without Celery) then scores all five in order, each once; two more
    published just before the experiment ends are scored before it stops."""
    from orchestrator.paths import Layout
    from orchestrator.roles import rkeys
    from orchestrator.roles import tictactoe as ttt
    from orchestrator.roles.evaluation import Scoreboard
    from orchestrator.roles.instance import Done, run_instance

    exp = f"evals{uuid.uuid4().hex[:6]}"
    store = WeightStore(client, exp, keep=1, chunk_bytes=MiB, unscored=8)
    key, token = lease
    published = [store.publish(_ttt_version(i), token, key, step=10 * i) for i in range(5)]
    assert store.versions() == published and store.unscored() == published  # none pruned: none scored
    matches: list[int] = []
    real_match = ttt.game.match
    monkeypatch.setattr(ttt.game, "match", lambda *a, **k: matches.append(1) or real_match(*a, **k))
    outcome: list[object] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: outcome.append(run_instance(
        client, Layout(tmp_path), _evaluator_spec(exp, games=20), "evaltest@h", "cpu", "task-1")))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while len(_records(client, exp)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - started
        published += [store.publish(_ttt_version(i), token, key, step=10 * i) for i in (5, 6)]
        client.hset(rkeys.state(exp), "ended", "the learner reached its step budget")  # ends: it scores what it owes
        worker.join(60)
    finally:
        client.hset(rkeys.state(exp), "ended", "test over")
        worker.join(60)
    assert outcome and isinstance(outcome[0], Done) and outcome[0].result["status"] == "STOPPED", outcome
    rows = _records(client, exp)
    assert [r["version"] for r in rows] == published  # every version, none twice (a hash per version) ...
    assert [r["step"] for r in rows] == [10 * i for i in range(7)]
    at = [float(str(r["evaluated_at"])) for r in rows]
    assert at == sorted(at)  # ... in order
    assert all(r["attempt"] == 1 for r in rows)
    assert "win_best" not in rows[0] and all("win_best" in r for r in rows[1:])  # against the best before it
    assert len(matches) == 2 * len(published) - 1  # each scored once: vs random, vs the best (not the first)
    assert Scoreboard(client, exp).cursors() == {f"role.{exp}.evaluator.0": published[-1]}
    assert store.unscored() == []
    best = store.best()
    assert best is not None and set(store.versions()) == {published[-1], best[0]}  # keep 1 + the best
    csv_rows = (tmp_path / exp / "roles" / "evaluations.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(published)
    print(f"\n5 held-back versions scored in {took:.1f} s; 7 records in order {published}; "
          f"{len(matches)} matches; best {best}")
    store.clear()


def test_a_zombie_evaluator_records_nothing(client: redis.Redis, lease: tuple[str, str]) -> None:
    """The record script is fenced by the evaluator's lease and by its cursor: a zombie
    records nothing, moves no cursor and releases no pin; no version is recorded twice."""
    from orchestrator.roles.evaluation import Scoreboard

    exp = f"evz{uuid.uuid4().hex[:6]}"
    store = WeightStore(client, exp, keep=1, chunk_bytes=MiB, unscored=4)
    key, token = lease
    v1, v2 = (store.publish(b"v" * 10, token, key, step=i) for i in (1, 2))
    board, ev_key = Scoreboard(client, exp), f"orch:lease:role.{exp}.evaluator.0"
    client.set(ev_key, "first")
    assert board.record(store, "e0", ev_key, "first", v1, {"step": 1}, 0.5) is True
    client.set(ev_key, "second")  # the instance was handed on
    with pytest.raises(Fenced):
        board.record(store, "e0", ev_key, "first", v2, {"step": 2}, 0.9)
    assert board.cursor("e0") == v1 and store.unscored() == [v2] and store.best() == (v1, 0.5)
    with pytest.raises(ValueError, match="recorded already"):
        board.record(store, "e0", ev_key, "second", v1, {"step": 1}, 0.5)
    assert board.record(store, "e0", ev_key, "second", v2, {"step": 2}, 0.4) is False  # not better than v1
    assert board.cursor("e0") == v2 and store.unscored() == [] and store.best() == (v1, 0.5)
    client.delete(ev_key)
    store.clear()


def test_the_learner_waits_while_versions_are_unscored(client: redis.Redis, lease: tuple[str, str]) -> None:
    """At most `unscored` versions wait for an evaluator: the store says there is no room
    for one more until one is scored, and the pinned ones outlive `keep`."""
    from orchestrator.roles.evaluation import Scoreboard

    exp = f"evw{uuid.uuid4().hex[:6]}"
    store = WeightStore(client, exp, keep=1, chunk_bytes=MiB, unscored=3)
    key, token = lease
    vs = [store.publish(b"w" * 10, token, key, step=i) for i in range(3)]
    assert not store.room_for_one() and store.versions() == vs
    client.set(f"orch:lease:role.{exp}.evaluator.0", "ev")
    Scoreboard(client, exp).record(store, "e0", f"orch:lease:role.{exp}.evaluator.0", "ev", vs[0], {}, None)
    store.prune()
    assert store.room_for_one() and store.versions() == vs[1:]
    assert WeightStore(client, exp).room_for_one()  # without evaluators: never waits
    client.delete(f"orch:lease:role.{exp}.evaluator.0")
    store.clear()


def _evaluator_process(url: str, root: str, spec: dict[str, object], log: str) -> None:
    """A worker's pool process running one evaluator attempt (no Celery); every scoring
    is a line of its log (the example's own log line)."""
    import logging

    from orchestrator.paths import Layout
    from orchestrator.roles.instance import run_instance

    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter(f"{os.getpid()} %(message)s"))
    logging.getLogger("orchestrator.roles.tictactoe").addHandler(handler)
    logging.getLogger("orchestrator.roles.tictactoe").setLevel(logging.INFO)
    run_instance(redis.Redis.from_url(url), Layout(Path(root)), spec, f"ev{os.getpid()}@h", "cpu", "task-1")


def test_an_evaluator_killed_mid_way_goes_on_from_its_cursor(redis_url: str, client: redis.Redis,
                                                             lease: tuple[str, str], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten versions wait; the evaluator process is SIGKILLed after three records, and a
    new attempt (once the lease lapsed) goes on from the durable cursor: ten records, in
    order, each once; what the first attempt recorded is not scored again, and at most
    the one version it was scoring at the kill is scored by both."""
    import re

    from orchestrator import keys
    from orchestrator.roles import rkeys

    monkeypatch.setenv("ORCH_LEASE_SECONDS", "1")  # the spawned attempts' leases lapse fast
    exp = f"evk{uuid.uuid4().hex[:6]}"
    store = WeightStore(client, exp, keep=1, chunk_bytes=MiB, unscored=10)
    key, token = lease
    published = [store.publish(_ttt_version(i), token, key, step=i) for i in range(10)]
    spec, log = _evaluator_spec(exp, games=150, unscored=10), tmp_path / "scored.log"
    ctx = mp.get_context("spawn")
    first = ctx.Process(target=_evaluator_process, args=(redis_url, str(tmp_path), spec, str(log)))
    started = time.monotonic()
    first.start()
    try:
        deadline = time.monotonic() + 60
        while len(_records(client, exp)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        first.join(10)
        before = [int(str(r["version"])) for r in _records(client, exp)]
        lease_key = keys.lease(rkeys.instance_key(exp, "evaluator", 0))
        deadline = time.monotonic() + 10
        while client.exists(lease_key) and time.monotonic() < deadline:  # the watchdog's hand-on, here the lapse
            time.sleep(0.05)
        second = ctx.Process(target=_evaluator_process, args=(redis_url, str(tmp_path), spec, str(log)))
        second.start()
        deadline = time.monotonic() + 90
        while len(_records(client, exp)) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        client.hset(rkeys.state(exp), "ended", "test over")
    second.join(30)
    rows = _records(client, exp)
    assert [r["version"] for r in rows] == published, rows
    at = [float(str(r["evaluated_at"])) for r in rows]
    assert at == sorted(at)
    by_attempt = {a: [int(str(r["version"])) for r in rows if r["attempt"] == a] for a in (1, 2)}
    assert by_attempt[1] == before and by_attempt[1] + by_attempt[2] == published and 3 <= len(before) < 10
    assert second.pid is not None
    scored: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        m = re.match(r"(\d+) version (\d+) ", line)
        if m:
            scored.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    first_scored, second_scored = scored.get(first.pid or 0, []), scored[second.pid]
    assert second_scored == by_attempt[2]  # from the cursor on, in order, each once
    assert first_scored[:len(before)] == before and len(first_scored) - len(before) <= 1  # the one in flight
    assert store.unscored() == []
    print(f"\nevaluator killed after {len(before)} records (versions {before}); the next attempt scored "
          f"{by_attempt[2]}; {took:.1f} s in all; scored twice: {sorted(set(first_scored) & set(second_scored))}")
    store.clear()


def test_a_role_that_gives_up_ends_its_experiment_failed(client: redis.Redis, tmp_path: Path) -> None:
    """An evaluator whose function failed for good ends the experiment FAILED with why:
    a learner waiting for it to score (the `unscored` bound) stops instead of waiting for
    ever, and any later delivery of a role ends at once. The first reason stays."""
    from orchestrator.paths import Layout
    from orchestrator.roles.files import RolesFiles
    from orchestrator.roles.instance import ended, give_up, run_instance

    exp = f"evf{uuid.uuid4().hex[:6]}"
    spec, layout = _evaluator_spec(exp, games=4), Layout(tmp_path)
    why = give_up(client, layout, spec, ValueError("bad board"), attempts=4)
    assert why == f"{exp}/evaluator.0 failed 4 times, last: ValueError: bad board"
    assert ended(client, exp) == f"failed: {why}"
    status = RolesFiles(layout, exp).status() or {}
    assert status["state"] == "FAILED" and status["why"] == why
    give_up(client, layout, spec, RuntimeError("later"), attempts=4)
    assert ended(client, exp) == f"failed: {why}" and (RolesFiles(layout, exp).status() or {})["why"] == why
    later = run_instance(client, layout, spec, "w@h", "cpu", "task-2")
    assert getattr(later, "result", {}).get("status") == "ENDED", later


@pytest.mark.parametrize("flipped", [False, True])
def test_a_flip_without_an_answer_keeps_the_checkpoint_only_of_a_version_that_became_current(
        client: redis.Redis, lease: tuple[str, str], flipped: bool) -> None:
    """The flip's answer is lost (Redis restarting, the host cut off): once Redis answers,
    the publisher asks whether its version became current; the checkpoint file of one
    that did not is removed (a cut-off learner leaves none), that of one that did stays."""
    exp = f"evn{uuid.uuid4().hex[:6]}"
    store = WeightStore(client, exp, keep=1, chunk_bytes=MiB)
    key, token = lease
    real, undone = store._flip, []

    def lost_answer(**kw: object) -> object:
        if flipped:
            real(**kw)  # done in Redis; the answer never arrives
        raise redis.ConnectionError("Connection reset by peer")

    store._flip = lost_answer  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        store.publish(b"w" * 10, token, key, step=5, checkpoint=lambda v, m: lambda: undone.append(v))
    assert undone == ([] if flipped else [1])
    assert (store.latest() == 1) is flipped
    store.clear()
