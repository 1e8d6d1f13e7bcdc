"""A data-parallel run across hosts for real, and one of its hosts cut off mid-training.

Three worker hosts (network namespaces, each its own hostname) and a hub with Redis and
the control worker (tests/netns.py; test_multihost's cluster on its own names and
subnet). A 2-rank run: one worker per host, so its ranks are on two hosts and gloo meets
across the bridge. The host names resolve nowhere and no interface is named
(GLOO_SOCKET_IFNAME unset): each rank finds the interface its host reaches Redis through
(orchestrator.execution.store.route_interface), publishes that address and a port of its
choosing through the Redis store, and the other rank connects to it.

Then rank 1's host loses its link (its veth on the hub goes down): every rank of that
attempt stops within 15 s (rank 0 when its heartbeat finds rank 1's lease lapsed and its
all-reduce times out; rank 1, cut off, when its all-reduce times out), and the run trains
again, from its checkpoint, on the two other hosts within 30 s of the cut. Its outputs
are written once, by the new attempt; once the link is back, the cut-off rank writes
nothing. Then the same with rank 0's host cut off: the watchdog hands the run on (its
lease lapsed), and the fenced leader, back, writes nothing but its own attempt's log.
Last, roles across the same hosts: the learner's host is cut off and the learner runs
again on the free host within 30 s, from its last version; the cut-off one publishes
nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import keys

from .conftest import REPO, wait_for
from .netns import Host, Network, in_netns
from .test_faults import audit, snapshot
from .test_multihost import DiskWatch, MultiHostCluster, changes, folders, writes_except

pytestmark = [pytest.mark.faults, pytest.mark.integration]

NET = Network(
    hub="orchdp-hub", bridge="orchdpbr0", hub_addr="10.231.0.1",
    hosts={"hosta": Host("orchdp-a", "orchdp-hosta", "orchdp-a0", "10.231.0.11"),
           "hostb": Host("orchdp-b", "orchdp-hostb", "orchdp-b0", "10.231.0.12"),
           "hostc": Host("orchdp-c", "orchdp-hostc", "orchdp-c0", "10.231.0.13")},
    lock=Path("/tmp/orchdp.lock"))
LOSS_TO_STOP = 15.0  # every rank of the attempt stopped within this of the cut (seconds)
RELAUNCH_LIMIT = 30.0  # ... and the run trains again from its checkpoint within this


@pytest.fixture(scope="module")
def dh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostCluster]:
    with NET.owned("multi-host data-parallel test"):
        c = MultiHostCluster(tmp_path_factory.mktemp("dphosts"), NET, ORCH_CHECKPOINT_EVERY="5",
                             ORCH_PRELOAD_TRAINERS="mlp")
        try:
            c.start_redis()
            c.ensure_workers()
            wait_for(lambda: len(list(c.client.scan_iter("orch:worker:*"))) == 4, timeout=30,
                     what="the workers to register")
            yield c
        finally:
            for name in list(c.cut_off):
                c.restore(name)
            for proc in c.workers.values():  # all at once: each hands back what it holds, then exits
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            c.stop()


def experiment(folder: Path, name: str, epochs: int = 30) -> Path:
    """Other epochs: another group_id (audit counts each group's finalizes)."""
    doc = {"experiment": name, "trainer": "mlp", "datasets": ["digits"], "split": {"validation": 0.3},
           "retries": 2, "params": {"epochs": epochs, "batch_size": 32, "hidden": [32]},
           "resources": {"gpus": 0, "ranks": 2}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def gang(c: MultiHostCluster, run_key: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in c.client.hgetall(keys.gang(run_key)).items()}


def ranks(c: MultiHostCluster, run_key: str, attempt: int) -> dict[int, dict[str, Any]]:
    out = {}
    for k in c.client.scan_iter(f"orch:rank:{run_key}:{attempt}:*"):
        if raw := c.client.get(k):
            rec = json.loads(raw)
            out[int(rec["rank"])] = rec
    return out


def the_run_key(c: MultiHostCluster, name: str) -> str:
    def found() -> str | None:
        for k in c.client.scan_iter("orch:gang:*"):
            key = k.decode().split(":", 2)[2]
            if (e := c.active(name).get(key)) and e.get("token"):
                return key
        return None

    return wait_for(found, timeout=90, what=f"{name}'s gang")


def training_past_checkpoint(c: MultiHostCluster, run_key: str) -> dict[int, dict[str, Any]] | None:
    """Both ranks of the run's current attempt, once both are past epoch 7 (a checkpoint at 5)."""
    attempt = int(gang(c, run_key).get("attempt") or 0)
    found = ranks(c, run_key, attempt) if attempt else {}
    return found if len(found) == 2 and all((r.get("step") or 0) >= 7 for r in found.values()) else None


def relaunched(c: MultiHostCluster, run_key: str, first: int) -> dict[int, dict[str, Any]] | None:
    """Both ranks of an attempt after `first`, once its gang is training."""
    g = gang(c, run_key)
    attempt = int(g.get("attempt") or 0)
    found = ranks(c, run_key, attempt) if attempt > first and g.get("state") == "training" else {}
    return found if len(found) == 2 else None


def test_a_host_cut_off_stops_its_attempt_and_the_run_relaunches_on_the_others(
        dh: MultiHostCluster, tmp_path: Path) -> None:
    name = "dphost"
    submitted = time.time()
    dh.submit(experiment(tmp_path, name))
    run_key = the_run_key(dh, name)

    first_ranks = wait_for(lambda: training_past_checkpoint(dh, run_key), timeout=90, what="both ranks past epoch 7 (a checkpoint at 5)",
                           seen=lambda: (gang(dh, run_key), dh.log("control")[-1500:]))
    trained = time.time()
    first = int(gang(dh, run_key)["attempt"])
    hosts = {r: rec["host"] for r, rec in first_ranks.items()}
    assert hosts[0] != hosts[1], hosts  # the rendezvous crossed hosts: gloo over the bridge
    victim = dh.worker_named(first_ranks[1]["worker"])
    assert NET.hosts[victim].hostname == hosts[1]
    found = f"rank 1: gloo over eth0 ({NET.hosts[victim].addr}, the address this host reaches Redis from)"
    assert found in dh.log(victim), dh.log(victim)[-3000:]  # found, not configured
    seen_before = len(dh.log(victim))
    stopped_line = f"rank 1 of {first_ranks[1]['name']} (attempt {first}) stops"

    cut_at = time.time()
    dh.cut(victim)
    try:
        wait_for(lambda: 0 not in ranks(dh, run_key, first), timeout=LOSS_TO_STOP + 10,
                 what="rank 0 of the cut-off attempt to stop", seen=lambda: gang(dh, run_key))
        rank0_stopped = time.time() - cut_at
        # The cut-off rank says so in its worker's log (on the shared filesystem), Redis or not.
        wait_for(lambda: stopped_line in dh.log(victim)[seen_before:], timeout=LOSS_TO_STOP + 10,
                 what="the cut-off rank 1 to stop", seen=lambda: dh.log(victim)[seen_before:][-2000:])
        rank1_stopped = time.time() - cut_at
        said = dh.log(victim)[seen_before:].split(stopped_line, 1)[1].split("\n", 1)[0].strip(": ")

        again_ranks = wait_for(lambda: relaunched(dh, run_key, first), timeout=RELAUNCH_LIMIT + 15, what="the relaunch to train on two hosts",
                               seen=lambda: gang(dh, run_key))
        again = time.time() - cut_at
        second = int(gang(dh, run_key)["attempt"])
        survivors = {NET.hosts[h].hostname for h in NET.hosts if h != victim}
        assert {r["host"] for r in again_ranks.values()} == survivors, (again_ranks, victim)
        st = audit(dh, name, folds=1)  # DONE, committed once, by the attempt recorded, no staging left
        # The cut lasted until the relaunch committed; from here on, nothing may change on disk.
        before, dirs = snapshot(dh.root / name), folders(dh.root / name)
        watch = DiskWatch(dh.root / name)
    finally:
        if victim in dh.cut_off:
            dh.restore(victim)
    back_at = time.time()
    try:
        # Back: its worker registers again (the registry heartbeat reaches Redis) and its
        # cut-off rank task ends (its lease and slot are gone, as they were).
        wait_for(lambda: (rec := dh.client.get(f"orch:worker:{first_ranks[1]['worker']}"))
                 and json.loads(rec)["heartbeat"] > back_at, timeout=40, what="the cut-off worker to be back")
        ended = re.compile(r"Task tasks\.train_rank\[[^\]]+\] succeeded")
        wait_for(lambda: ended.search(dh.log(victim)[seen_before:].split(stopped_line, 1)[-1]),
                 timeout=40, what="the cut-off rank task to end", seen=lambda: dh.log(victim)[seen_before:][-2000:])
        after = snapshot(dh.root / name)
    finally:
        seen = watch.stop()
    assert writes_except(seen, set()) == []
    assert changes(before, after, appended=set()) == []
    assert folders(dh.root / name) == dirs
    assert ranks(dh, run_key, first) == {}  # the cut-off attempt holds no lease
    fold = st["group_details"][0]["folds"][0]
    meta = json.loads(Path(fold["files"]["metadata.json"]).read_text())
    assert meta["attempt"] == second, (meta["attempt"], second)  # written once, by the relaunch
    assert meta["host"] in survivors, meta["host"]
    assert meta["trainer_info"]["ranks"] == 2 and meta["trainer_info"]["resumed_from_epoch"] > 5, meta["trainer_info"]
    assert dh.client.hget(keys.attempts(run_key), "committed") == b"1"
    print(f"\n2 ranks on {hosts[0]} and {hosts[1]}: both past epoch 7 {trained - submitted:.1f} s after submit; "
          f"{hosts[1]} cut off: rank 0 stopped after {rank0_stopped:.1f} s, the cut-off rank 1 after "
          f"{rank1_stopped:.1f} s ({said[:90]}); attempt {second} trained on {sorted(survivors)} after {again:.1f} s, "
          f"resumed from epoch {meta['trainer_info']['resumed_from_epoch']}; committed once, by attempt {second}; "
          f"nothing written after the link came back")
    assert rank0_stopped <= LOSS_TO_STOP and rank1_stopped <= LOSS_TO_STOP, (rank0_stopped, rank1_stopped)
    assert again <= RELAUNCH_LIMIT, again


def test_rank_0s_host_cut_off_its_run_is_handed_on_and_the_fenced_leader_writes_nothing(
        dh: MultiHostCluster, tmp_path: Path) -> None:
    """The leader's host is cut off: rank 1 sees rank 0's lease lapse and stops; the
    cut-off rank 0 stops at its all-reduce's timeout; the watchdog hands the run on (its
    lease lapsed) and it trains again from its checkpoint on the two other hosts. Once
    the link is back, the fenced leader writes nothing but its own attempt's log."""
    name = "dphost0"
    dh.submit(experiment(tmp_path, name, epochs=32))
    run_key = the_run_key(dh, name)

    first_ranks = wait_for(lambda: training_past_checkpoint(dh, run_key), timeout=90, what="both ranks past epoch 7")
    first = int(gang(dh, run_key)["attempt"])
    victim = dh.worker_named(first_ranks[0]["worker"])
    run_name = first_ranks[0]["name"]
    run_log = dh.root / name / "digits/base/seed=0/logs" / f"fold_0.attempt_{first}.log"
    seen_before = len(dh.log(victim))
    stopped_line = f"rank 0 of {run_name} (attempt {first}) stops"

    cut_at = time.time()
    dh.cut(victim)
    try:
        wait_for(lambda: 1 not in ranks(dh, run_key, first), timeout=LOSS_TO_STOP + 10,
                 what="rank 1 of the cut-off attempt to stop", seen=lambda: gang(dh, run_key))
        rank1_stopped = time.time() - cut_at
        wait_for(lambda: run_log.exists() and stopped_line in run_log.read_text(errors="replace"),
                 timeout=LOSS_TO_STOP + 10, what="the cut-off rank 0 to stop",
                 seen=lambda: run_log.read_text(errors="replace")[-2000:] if run_log.exists() else None)
        rank0_stopped = time.time() - cut_at

        again_ranks = wait_for(lambda: relaunched(dh, run_key, first), timeout=RELAUNCH_LIMIT + 15, what="the relaunch to train on two hosts",
                               seen=lambda: (gang(dh, run_key), dh.log("control")[-1500:]))
        again = time.time() - cut_at
        second = int(gang(dh, run_key)["attempt"])
        survivors = {NET.hosts[h].hostname for h in NET.hosts if h != victim}
        assert {r["host"] for r in again_ranks.values()} == survivors, (again_ranks, victim)
        st = audit(dh, name, folds=1)
        before, dirs = snapshot(dh.root / name), folders(dh.root / name)
        watch = DiskWatch(dh.root / name)
    finally:
        if victim in dh.cut_off:
            dh.restore(victim)
    own_log = str(run_log.relative_to(dh.root / name))
    try:
        # Back: the fenced leader's attempt ends without writing (the worker says so).
        wait_for(lambda: "stops without writing" in dh.log(victim)[seen_before:], timeout=60,
                 what="the cut-off leader to give its attempt up", seen=lambda: dh.log(victim)[seen_before:][-2000:])
        after = snapshot(dh.root / name)
    finally:
        seen = watch.stop()
    assert writes_except(seen, {own_log}) == []  # only its own attempt's log may grow
    assert changes(before, after, appended={own_log}) == []
    assert folders(dh.root / name) == dirs
    fold = st["group_details"][0]["folds"][0]
    meta = json.loads(Path(fold["files"]["metadata.json"]).read_text())
    assert meta["attempt"] == second and meta["host"] in survivors, (meta["attempt"], second, meta["host"])
    assert meta["trainer_info"]["resumed_from_epoch"] > 5, meta["trainer_info"]
    assert dh.client.hget(keys.attempts(run_key), "committed") == b"1"
    print(f"\nrank 0's host {first_ranks[0]['host']} cut off: rank 1 stopped after {rank1_stopped:.1f} s, the "
          f"cut-off rank 0 after {rank0_stopped:.1f} s; attempt {second} trained on {sorted(survivors)} after "
          f"{again:.1f} s, resumed from epoch {meta['trainer_info']['resumed_from_epoch']}; committed once, by "
          f"attempt {second}; the fenced leader wrote nothing after the link came back but its own log")
    assert rank0_stopped <= LOSS_TO_STOP and rank1_stopped <= LOSS_TO_STOP, (rank0_stopped, rank1_stopped)
    assert again <= RELAUNCH_LIMIT, again


def test_a_learners_host_cut_off_its_learner_runs_again_elsewhere_and_the_cut_off_one_publishes_nothing(
        dh: MultiHostCluster, tmp_path: Path) -> None:
    """Roles across hosts (docs/roles.md): a learner and an actor on two of the three
    hosts; the learner's host loses its link. Its lease lapses, the watchdog hands the
    role's message on, and the learner runs again on the free host within 30 s, resuming
    from its last version; once the link is back, the cut-off learner publishes nothing
    (fenced) and stops. Then `cancel` stops every role."""
    from orchestrator.roles import rkeys
    from orchestrator.roles.weights import WeightStore

    name = "rolehosts"
    doc = {"experiment": name,
           "roles": {"learner": {"function": "tictactoe.learner",
                                 "settings": {"steps": 1_000_000, "publish_every": 5, "new_per_step": 32}},
                     "actor": {"function": "tictactoe.actor", "settings": {"games": 8}}},
           "weights": {"keep": 3}, "experience": {"maxlen": 3000}}
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    dh.submit(cfg)
    store = WeightStore(dh.client, name)

    def beat(instance: str, after: int = 0, not_on: str | None = None) -> dict[str, Any] | None:
        raw = dh.client.hget(rkeys.beats(name), rkeys.instance_key(name, *instance.split(".")))
        b = json.loads(raw) if raw else None
        ok = b and b.get("state") == "running" and int(b.get("attempt") or 0) > after and b.get("host") != not_on
        return b if ok else None

    def versions_of(attempt: int) -> list[dict[str, Any]]:
        """Every version `attempt` published, from the checkpoint files (Redis keeps 3)."""
        metas = [json.loads(p.read_text()) for p in (dh.root / name / "roles" / "weights").glob("v*.json")]
        return sorted((m for m in metas if m.get("attempt") == attempt), key=lambda m: m["version"])

    before = wait_for(lambda: beat("learner.0"), timeout=90, what="the learner to run")
    wait_for(lambda: beat("actor.0"), timeout=90, what="the actor to run")
    wait_for(lambda: len(versions_of(int(before["attempt"]))) >= 2, timeout=90, what="two versions")
    victim = dh.worker_named(before["worker"])
    seen_before = len(dh.log(victim))
    cut_at = time.time()
    dh.cut(victim)
    try:
        last = store.meta(store.latest() or 0) or {}
        after = wait_for(lambda: beat("learner.0", int(before["attempt"]), before["host"]),
                         timeout=RELAUNCH_LIMIT + 15, what="the learner to run on another host",
                         seen=lambda: dh.client.hgetall(rkeys.beats(name)))
        again = time.time() - cut_at
        first_new = wait_for(lambda: next(iter(versions_of(int(after["attempt"]))), None), timeout=60,
                             what="a version of the new attempt")
    finally:
        dh.restore(victim)
    wait_for(lambda: f"learner.0 attempt {before['attempt']}: " in dh.log(victim)[seen_before:], timeout=60,
             what="the cut-off learner to stop", seen=lambda: dh.log(victim)[seen_before:][-2000:])
    late = [m["version"] for m in versions_of(int(before["attempt"])) if m["published_at"] > cut_at]
    print(f"\nlearner attempt {before['attempt']} on {before['host']} cut off at version {last.get('version')} "
          f"(step {last.get('step')}); attempt {after['attempt']} running on {after['host']} after {again:.1f} s, "
          f"its first version {first_new['version']} at step {first_new['step']}; versions published by the "
          f"cut-off learner after the cut: {late}")
    assert late == []
    assert first_new["step"] == last["step"] + 5  # resumed from its last version
    assert again <= RELAUNCH_LIMIT, again
    latest = store.meta(store.latest() or 0) or {}
    assert latest.get("attempt") == after["attempt"]
    assert subprocess_cancel(dh, name) == 0
    wait_for(lambda: all(json.loads(v).get("state") == "stopped"
                         for v in dh.client.hgetall(rkeys.beats(name)).values()), timeout=60,
             what="every role to stop after cancel", seen=lambda: dh.client.hgetall(rkeys.beats(name)))


def subprocess_cancel(c: MultiHostCluster, name: str) -> int:
    """`orchestrator cancel` from the hub."""
    argv = in_netns(c.net.hub, [sys.executable, "-m", "orchestrator", "cancel", name])
    return subprocess.run(argv, cwd=REPO, env=c.host_env(), capture_output=True, text=True, timeout=120).returncode
