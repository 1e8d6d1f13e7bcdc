"""Hostile messages straight to the broker (issues 15 and 22): more than 1,000 malformed
or hostile messages, mutated from genuine `tasks.train_run`, `tasks.finalize` and
`tasks.group_failed` messages or pushed as raw items onto the queue lists, against a
real Redis, a real CPU worker and a real control worker.

Afterwards: both workers are the processes they were (alive, never restarted) and
serve a genuine experiment to DONE; every message the broker edge (tasks/edge.py) must
refuse is in the dead letters exactly once with its reason; every other hostile message
was refused by its task (a dead letter or a FAILURE result); no queue or unacknowledged
message is left (no livelock); a finished run's files are byte-identical; nothing was
written outside the results root.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator.cluster.local import spawn, start_redis, stop_process, stop_processes
from orchestrator.execution.deadletters import DeadLetters

from .conftest import celery_app, cli_env, run_cli, wait_for

pytestmark = pytest.mark.integration

MARK = "hostile-"
DEEP = 600  # the issue's crash: a list nested ~600 deep (1.7 KB) in a run's params
TEMPLATES = "hostile.templates"  # a queue no worker consumes: genuine messages to mutate


def deep(n: int, leaf: Any = 0) -> Any:
    value = leaf
    for _ in range(n):
        value = [value]
    return value


@dataclass
class HostileCluster:
    base: Path
    url: str
    redis_proc: subprocess.Popen[bytes]
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base / "results"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    def env(self) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.url, ORCH_RESULTS_ROOT=str(self.root))

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def hostile_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileCluster]:
    """A private Redis, one CPU worker and one control worker (`orchestrator worker`)."""
    base = tmp_path_factory.mktemp("hostile")
    proc, url = start_redis(base / "redis")
    cluster = HostileCluster(base, url, proc)
    cluster.logs.mkdir()
    worker = [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO"]
    try:
        for name, extra in {"cpu": ["--cpu", "--name", "cpu1@%h"], "control": ["--control"]}.items():
            cluster.workers[name] = spawn([*worker, *extra], cluster.env(), cluster.logs / f"{name}.log")
        wait_for(lambda: all(cluster.log(n).count("ready.") == 1 for n in cluster.workers), timeout=90,
                 what="the CPU and control workers to be ready")
        yield cluster
    finally:
        stop_processes(cluster.workers.values())
        stop_process(proc)


# --- building the flood ----------------------------------------------------------------

@dataclass
class Hostile:
    marker: str  # unique: the task id, or a text in the message's first bytes
    item: bytes  # what is pushed onto the queue list (b"": sent with app.send_task)
    queue: str
    what: str  # its class, for a failing assertion
    edge: bool  # must be refused by the broker edge (else by the edge or by its task)
    why: str | None = None  # what the edge's reason must say


class Flood:
    def __init__(self) -> None:
        self.messages: list[Hostile] = []
        self.sent: list[tuple[str, str, str, list[Any], dict[str, Any]]] = []  # send_task ones
        self.extra: list[tuple[str, str, list[Any], dict[str, Any]]] = []  # sent, not counted

    def marker(self) -> str:
        """The next message's marker (the same until a message is added)."""
        return f"{MARK}{len(self.messages):05d}"

    def raw(self, item: bytes, queue: str, what: str, why: str | None = None, edge: bool = True) -> None:
        self.messages.append(Hostile(self.marker(), item, queue, what, edge, why))

    def envelope(self, env: Any, queue: str, what: str, why: str | None = None, edge: bool = True) -> None:
        """A mutated envelope, with its own task id or else the marker first (headers and
        their `argsrepr` first, so it is in the dead letter's raw prefix)."""
        marker = self.marker()
        if isinstance(env, dict) and isinstance(env.get("headers"), dict):
            headers = dict(env["headers"])
            if isinstance(headers.get("id"), str) and headers["id"].startswith("genuine"):
                headers = {"id": marker, **headers}
                headers["id"] = marker
            else:  # the id is what is wrong: the marker goes first
                headers = {"argsrepr": marker, **{k: v for k, v in headers.items() if k != "argsrepr"}}
            env = {"headers": headers, **{k: v for k, v in env.items() if k != "headers"}}
        elif isinstance(env, dict):
            env = {"x-marker": marker, **env}
        self.raw(json.dumps(env).encode(), queue, what, why, edge)

    def task(self, name: str, queue: str, args: list[Any], kwargs: dict[str, Any], what: str,
             why: str | None = None) -> None:
        """A message sent with app.send_task: refused by the edge if `why` is given (what
        its reason must say), else by the edge or by the task."""
        self.sent.append((self.marker(), name, queue, args, kwargs))
        self.messages.append(Hostile(self.marker(), b"", queue, what, edge=why is not None, why=why))


def body_of(env: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(env["body"]))


def with_body(env: dict[str, Any], body: Any, raw: bytes | None = None) -> dict[str, Any]:
    env = copy.deepcopy(env)
    data = raw if raw is not None else json.dumps(body).encode()
    env["body"] = base64.b64encode(data).decode()
    return env


def edit(env: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    env = copy.deepcopy(env)
    change(env)
    return env


HOSTILE_VALUES: list[Any] = [None, "", 0, -1, 2**70, 1e308, True, [], {}, "x" * 5000, deep(DEEP),
                             "../../etc/passwd", [None, None, None]]


def edge_classes(flood: Flood, name: str, env: dict[str, Any], queue: str, other: str) -> None:
    """Messages the edge must refuse, each a mutation of the genuine envelope `env` of
    task `name` (which belongs on `queue`; `other` is a queue it may not come from),
    with what its reason must say."""
    e = flood.envelope
    # Not an envelope at all.
    flood.raw(f"{flood.marker()} is not JSON {{[".encode(), queue, "item not JSON", "not UTF-8 JSON")
    flood.raw(b"\xff\xfe" + flood.marker().encode(), queue, "item not UTF-8", "not UTF-8 JSON")
    e([flood.marker()], queue, "envelope a list", "expected kombu's envelope")
    e(flood.marker(), queue, "envelope a string", "expected kombu's envelope")
    flood.raw(b'["' + flood.marker().encode() + b'", ' + b"[" * 100_000 + b"]" * 100_000 + b"]", queue,
              "envelope nested 100,000 deep", "nested deeper")
    e({"headers": env["headers"], "padding": "x" * (5 * 1024 * 1024)}, queue, "item over 4 MB", "bytes: at most")
    e(edit(env, lambda m: m.pop("headers")), queue, "no headers", "headers are null")
    e(edit(env, lambda m: m.update(headers=f"{flood.marker()} headers")), queue, "headers a string", "headers are")
    e(edit(env, lambda m: m.update(headers=[flood.marker()])), queue, "headers a list", "headers are")
    e(edit(env, lambda m: m["headers"].update(stamps={"a": deep(DEEP)})), queue, "headers nested 600 deep",
      "nested deeper")
    e(edit(env, lambda m: m.update(extra=1)), queue, "envelope with an unknown key", "envelope keys")
    e(edit(env, lambda m: m.pop("properties")), queue, "no properties", "envelope keys")
    e(edit(env, lambda m: m.update(properties="p")), queue, "properties a string", "properties are")
    # Headers: ids, names and types.
    for key, value in [("id", None), ("id", 12345), ("id", "../../etc/passwd"), ("id", "a" * 300),
                       ("id", "x/y"), ("task", None), ("task", ["tasks.train_run"]), ("task", 7),
                       ("lang", "js"), ("retries", "1"), ("retries", -1), ("retries", True),
                       ("timelimit", "x"), ("timelimit", [-1, None]), ("timelimit", [1, 2, 3]),
                       ("timelimit", [None, float("inf")]), ("eta", "tomorrow"),
                       ("eta", "2999-01-01T00:00:00+00:00"), ("expires", 5), ("group", 7),
                       ("group", "../x"), ("root_id", ["a"]), ("parent_id", "a b"), ("shadow", 1),
                       ("ignore_result", "yes"), ("stamped_headers", [1]), ("stamps", "s"),
                       ("group_index", -3), ("hostname", "evil@host"), ("args", [1]), ("chord", {}),
                       ("delivery_info", {})]:
        def change(m: dict[str, Any], key: str = key, value: Any = value) -> None:
            if value is None:
                m["headers"].pop(key, None)
            else:
                m["headers"][key] = value
        e(edit(env, change), queue, f"header {key}={str(value)[:30]}", "header")
    # Tasks that are not this project's, or not from this queue.
    for task in ["celery.chord", "celery.chunks", "celery.accumulate", "celery.backend_cleanup",
                 "celery.group", "celery.map", "celery.starmap", "celery.chain", "celery.chord_unlock"]:
        e(edit(env, lambda m, task=task: m["headers"].update(task=task)), queue, f"task {task!r}", "built-in")
    for task in ["os.system", "__import__", "../x", "tasks.nope", "tasks.train_run\x00", "tasks/train_run"]:
        e(edit(env, lambda m, task=task: m["headers"].update(task=task)), queue, f"task {task!r}", "unknown task")
    e(edit(env, lambda m: m["properties"]["delivery_info"].update(routing_key=other)), other,
      f"{name} from the {other} queue", "never runs from the 'control'" if other == "control" else
      "runs only from the 'control' queue")
    # Properties.
    for key, value in [("delivery_tag", None), ("delivery_tag", 17), ("delivery_tag", ""),
                       ("delivery_tag", "../x"), ("delivery_info", None), ("delivery_info", "cpu"),
                       ("body_encoding", None), ("body_encoding", "plain"), ("priority", "high"),
                       ("priority", 1000), ("priority", -1), ("correlation_id", 5), ("reply_to", [])]:
        def change_p(m: dict[str, Any], key: str = key, value: Any = value) -> None:
            if value is None:
                m["properties"].pop(key, None)
            else:
                m["properties"][key] = value
        e(edit(env, change_p), queue, f"property {key}={str(value)[:30]}", key)
    for key, value in [("routing_key", "gpu"), ("routing_key", None), ("exchange", 3), ("evil", 1)]:
        def change_i(m: dict[str, Any], key: str = key, value: Any = value) -> None:
            info = m["properties"]["delivery_info"]
            if value is None:
                info.pop(key, None)
            else:
                info[key] = value
        e(edit(env, change_i), queue, f"delivery_info {key}={value}", "delivery_info")
    # Content types and encodings Celery could be made to decode.
    for ctype in ["application/x-python-serialize", "application/x-yaml", "application/x-msgpack",
                  "text/plain", None]:
        e(edit(env, lambda m, c=ctype: m.update({"content-type": c})), queue, f"content type {ctype}",
          "disallowed")
    e(edit(env, lambda m: m.update({"content-encoding": "binary"})), queue, "content encoding binary",
      "content encoding")
    # Bodies.
    args, kwargs, embed = body_of(env)
    e(edit(env, lambda m: m.pop("body")), queue, "no body", "envelope keys")
    e(edit(env, lambda m: m.update(body="")), queue, "empty body", "body is not UTF-8 JSON")
    e(edit(env, lambda m: m.update(body="!!! not base64 !!!")), queue, "body not base64", "not base64")
    e(edit(env, lambda m: m.update(body=17)), queue, "body a number", "body is an integer")
    for what, raw, why in [("empty", b"", "not UTF-8 JSON"), ("{\"a\":1}", b'{"a":1}', "body is an object"),
                           ("[1]", b"[1]", "body is a list of 1"),
                           ("a 1 MB JSON string", json.dumps("x" * 1_000_000).encode(), "body is a string"),
                           ("not UTF-8", b"\xff\xfe[]", "not UTF-8 JSON"), ("not JSON", b"[[], {}, ", "JSON"),
                           ("nested 600", json.dumps(deep(DEEP)).encode(), "nested deeper"),
                           ("nested 100,000", b"[" * 100_000 + b"]" * 100_000, "nested deeper")]:
        e(with_body(env, None, raw), queue, f"body {what}", why)
    params = {**(args[0] if args and isinstance(args[0], dict) else {}), "params": {"smoothing": deep(DEEP)}}
    for what, body, why in [("args nested 600", [deep(DEEP), kwargs, embed], "nested deeper"),
                            ("params nested 600", [[params, *args[1:]], kwargs, embed], "nested deeper"),
                            ("kwargs nested 600", [args, {**kwargs, "deep": deep(DEEP)}, embed], "nested deeper"),
                            ("[[], {}, \"x\"]", [[], {}, "x"], "body is ["), ("[args, kwargs]", [args, kwargs], "body"),
                            ("args an object", [{"a": 1}, kwargs, embed], "body is ["),
                            ("kwargs a list", [args, [], embed], "body is ["),
                            ("too many arguments", [[*args, 1, 2, 3], kwargs, embed], "arguments do not fit"),
                            ("no arguments", [[], {}, embed], "arguments do not fit"),
                            ("unknown keyword", [args, {**kwargs, "nope": 1}, embed], "arguments do not fit"),
                            ("embed callbacks a string", [args, kwargs, {"callbacks": "x"}], "embed"),
                            ("embed chain [1]", [args, kwargs, {"chain": [1]}], "embed"),
                            ("embed chord a list", [args, kwargs, {"chord": []}], "embed"),
                            ("embed unknown key", [args, kwargs, {"evil": []}], "embed")]:
        e(with_body(env, body), queue, f"body {what}", why)


def fuzz_classes(flood: Flood, env: dict[str, Any], queue: str) -> None:
    """Each header and property replaced by each hostile value, or removed: refused by
    the edge or, where the edge lets it through, by the task (the templates' specs are
    refused by every task: a trainer that is not registered)."""
    for part in ("headers", "properties"):
        for key in sorted(env[part]):
            if key in ("id",):
                continue
            for value in [*HOSTILE_VALUES, "<removed>"]:
                def change(m: dict[str, Any], part: str = part, key: str = key, value: Any = value) -> None:
                    if value == "<removed>":
                        m[part].pop(key)
                    else:
                        m[part][key] = value
                flood.envelope(edit(env, change), queue, f"{part}.{key}={str(value)[:20]}", edge=False)


def task_classes(flood: Flood, spec: dict[str, Any], outside: Path) -> None:
    """Well-formed messages (app.send_task) whose arguments are hostile: refused by the
    task (issue 22's classes: unknown trainers, wrong folds, path tricks, huge values)."""
    bad: list[tuple[str, Any]] = [
        ("trainer", "os.system"), ("trainer", "../x"), ("trainer", "__import__"), ("trainer", ""),
        ("trainer", None), ("trainer", "tests.plugins:_killed"), ("fold", -1), ("fold", 99), ("fold", "0"),
        ("fold", 1.5), ("fold", None), ("k", 0), ("k", 1), ("k", 10**9), ("k", "2"),
        ("experiment", "../../escape"), ("experiment", str(outside / "abs")), ("experiment", "a/b"),
        ("experiment", ""), ("experiment", "x" * 10_000), ("output", "../outside"),
        ("output", str(outside / "out")), ("output", "a/../../b"),
        ("dataset", {"name": "secret", "source": "csv", "path": "/etc/passwd", "target": "y", "sha256": ""}),
        ("dataset", {"name": "../../d", "source": "csv", "path": str(outside / "d.csv"), "target": "y",
                     "sha256": "0" * 64}),
        ("dataset", "iris"), ("dataset", None), ("params", {"smoothing": -1}), ("params", {"smoothing": "x"}),
        ("params", {"nope": 1}), ("params", {"smoothing": deep(40)}), ("params", {"smoothing": "x" * 100_000}),
        ("params", []), ("holdout", 1e308), ("holdout", -0.5), ("seed", "0"), ("seed", 2**70),
        ("retries", 10**6), ("retries", -1), ("timeout", -5), ("priority", 99), ("resources", {"gpus": 3.5}),
        ("resources", {"gpus": 5e-324}), ("resources", "all"), ("validation", 0.2), ("overrides", {"cuda": {"x": 1}}),
        ("trainer_version", "999"), ("unexpected", 1)]
    for key, value in bad:
        flood.task("tasks.train_run", "cpu", [{**spec, key: value}], {}, f"spec {key}={str(value)[:30]}")
    # Allowed (a point's name is hashed into a safe folder name): sent, not counted; the
    # checks on the disk still hold for it.
    flood.extra.append(("tasks.train_run", "cpu", [{**spec, "point": "../../p", "seed": 77}], {}))
    for key in ("trainer", "fold", "dataset", "params", "output"):
        flood.task("tasks.train_run", "cpu", [{k: v for k, v in spec.items() if k != key}], {}, f"spec without {key}")
    for value in [float("nan"), float("-inf"), True, "x", [1]]:
        flood.task("tasks.train_run", "cpu", [spec], {"submitted_at": value}, f"submitted_at {value}")
    # Issue 22's crash: a 1.7 KB message with params nested 600 deep killed the CPU worker
    # while pickling for its pool process, a finalize with such an argument the control
    # worker; then again after every restart.
    flood.task("tasks.train_run", "cpu", [{**spec, "params": {"smoothing": deep(DEEP)}}], {},
               "params nested 600 (app.send_task)", "nested deeper")
    flood.task("tasks.finalize", "control", [deep(DEEP), [spec]], {"folds": [0, 1]},
               "finalize results nested 600 (app.send_task)", "nested deeper")
    flood.task("tasks.group_failed", "control", ["tid", [spec]], {"folds": deep(DEEP)},
               "group_failed folds nested 600 (app.send_task)", "nested deeper")
    flood.task("tasks.train_run", "control", [spec], {}, "a valid train_run on control (app.send_task)",
               "never runs from the 'control'")
    flood.task("celery.backend_cleanup", "cpu", [], {}, "celery.backend_cleanup (app.send_task)", "built-in")
    flood.task("celery.accumulate", "cpu", [1], {}, "celery.accumulate (app.send_task)", "built-in")
    for value in [None, [], "spec", 7, [spec], {"a": deep(50)}]:
        flood.task("tasks.train_run", "cpu", [value], {}, f"spec {str(value)[:20]}")
    group = [{**spec, "trainer": "os.system"}]
    for what, args, kwargs in [
            ("unregistered trainer", [[{}], group], {"folds": [0, 1]}),
            ("specs empty", [[], []], {"folds": [0, 1]}), ("specs a string", [[], "s"], {}),
            ("wrong folds", [[], [spec]], {"folds": [99, -1]}), ("folds a string", [[], [spec]], {"folds": "01"}),
            ("path trick", [[], [{**spec, "output": "../outside"}]], {"folds": [0, 1]}),
            ("two groups", [[], [spec, {**spec, "seed": 5}]], {}), ("results deep", [deep(50), group], {})]:
        flood.task("tasks.finalize", "control", args, kwargs, f"finalize {what}")
    for what, args, kwargs in [
            ("unregistered trainer", ["tid", group], {"folds": [0, 1]}), ("specs empty", ["tid", []], {}),
            ("task id a list", [["x"], group], {}), ("path trick", ["tid", [{**spec, "experiment": "../../e"}]], {}),
            ("wrong folds", ["tid", [spec]], {"folds": [7]})]:
        flood.task("tasks.group_failed", "control", args, kwargs, f"group_failed {what}")


# --- what the flood left ------------------------------------------------------------------

def tree(base: Path, skip: Path) -> set[str]:
    """Every path under `base` except below `skip` (the results root)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        if Path(dirpath) == skip:
            dirnames[:] = []
            continue
        for n in dirnames + filenames:
            found.add(str(Path(dirpath, n).relative_to(base)))
    return found


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def queued(client: redis.Redis) -> dict[str, int]:
    lengths = {}
    for key in client.scan_iter(match="*", count=1000):
        name = key.decode()
        if name.split(":")[0] in ("cpu", "control") and client.type(key) == b"list":
            lengths[name] = int(client.llen(key))
    lengths["unacked"] = int(client.hlen("unacked"))
    return {k: v for k, v in lengths.items() if v}


def failed_ids(client: redis.Redis, ids: list[str]) -> set[str]:
    with client.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.get(f"celery-task-meta-{i}")
        metas = pipe.execute()
    return {i for i, meta in zip(ids, metas, strict=True) if meta and json.loads(meta).get("status") == "FAILURE"}


def test_a_flood_of_hostile_messages(hostile_cluster: HostileCluster, write_experiment) -> None:
    cluster, client = hostile_cluster, redis.Redis.from_url(hostile_cluster.url)
    app = celery_app(cluster.url)
    pids = {n: p.pid for n, p in cluster.workers.items()}

    # A finished experiment whose files must not change.
    cfg = write_experiment("before", trainer="prior", datasets=["iris"], folds=2, resources={"gpus": 0})
    done = run_cli("submit", str(cfg), "--wait", env=cluster.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    finished = files(cluster.root)
    assert any(p.endswith("fold_0.json") for p in finished) and any("/logs/" in f"/{p}" for p in finished), finished
    outside = cluster.base / "outside"
    before = tree(cluster.base, cluster.root)
    around = {p.name for p in cluster.base.parent.iterdir()}  # "../../escape" from the root

    # Genuine messages to mutate: sent with app.send_task onto a queue nobody consumes.
    from orchestrator.experiment.config import load_experiments
    from orchestrator.experiment.expand import expand

    spec = expand(load_experiments([str(cfg)])[0])[0].to_dict()  # the DONE run's own spec
    refused_spec = {**spec, "trainer": "not-registered"}
    for name, args, kwargs in [("tasks.train_run", [refused_spec], {"submitted_at": time.time()}),
                               ("tasks.finalize", [[{}], [refused_spec]], {"folds": [0, 1]}),
                               ("tasks.group_failed", ["tid", [refused_spec]], {"folds": [0, 1]})]:
        app.send_task(name, args=args, kwargs=kwargs, queue=TEMPLATES, task_id=f"genuine-{name}")
    templates = {}
    for _ in range(3):
        env = json.loads(client.rpop(TEMPLATES))
        templates[env["headers"]["task"]] = env

    flood = Flood()
    for name, env in templates.items():
        queue, other = ("cpu", "control") if name == "tasks.train_run" else ("control", "cpu")
        env["properties"]["delivery_info"] = {"exchange": "", "routing_key": queue}  # as if sent there
        edge_classes(flood, name, env, queue, other)
        fuzz_classes(flood, env, queue)
    # Issue 22's point 3: the DONE run's own message, refused (unknown trainer, invalid
    # params) or a duplicate; and messages that name no task at all.
    for change in ({"trainer": "os.system"}, {"params": {"smoothing": -1}}):
        flood.task("tasks.train_run", "cpu", [{**spec, **change}], {}, f"the DONE run with {change}")
    task_classes(flood, spec, outside)
    literal = [b"", b"{}", b"[]", b"null", b"0"]  # no room for a marker: counted by their text
    assert len(flood.messages) + len(literal) * 2 >= 1000, len(flood.messages)

    start = time.monotonic()
    with client.pipeline(transaction=False) as pipe:
        for m in flood.messages:
            if m.item:
                pipe.lpush(m.queue, m.item)
        for item in literal:
            pipe.lpush("cpu", item)
            pipe.lpush("control", item)
        pipe.execute()
    with app.producer_or_acquire() as producer:
        for marker, name, queue, args, kwargs in flood.sent:
            app.send_task(name, args=args, kwargs=kwargs, queue=queue, task_id=marker, producer=producer)
        for _ in range(2):  # exact duplicates of the DONE run's genuine message: nothing retrained
            app.send_task("tasks.train_run", args=[spec], queue="cpu", producer=producer)
        for name, queue, args, kwargs in flood.extra:
            app.send_task(name, args=args, kwargs=kwargs, queue=queue, producer=producer)

    letters = DeadLetters.from_url(cluster.url)
    expected = {m.marker: m for m in flood.messages}

    def accounted() -> tuple[dict[str, int], set[str]]:
        seen: dict[str, int] = {}
        for entry in letters.list(limit=20_000):
            found = {entry.get("task_id")} | set(re.findall(rf"{MARK}\d{{5}}", str(entry.get("raw") or "")[:200]))
            for marker in found & expected.keys():
                seen[marker] = seen.get(marker, 0) + 1
        rest = [k for k in expected if k not in seen]
        return seen, seen.keys() | failed_ids(client, rest)

    deadline = time.monotonic() + 120
    while queued(client) or len(accounted()[1]) < len(expected):
        if time.monotonic() > deadline:
            left = [m.what for m in flood.messages if m.marker not in accounted()[1]]
            pytest.fail(f"still queued: {queued(client)}; {len(left)} messages neither refused nor "
                        f"failed: {left[:40]}")
        time.sleep(0.5)
    elapsed = time.monotonic() - start
    seen, done_ids = accounted()

    # Both workers are the processes they were, never restarted.
    for name, proc in cluster.workers.items():
        assert proc.poll() is None and proc.pid == pids[name], f"the {name} worker died:\n{cluster.log(name)[-3000:]}"
        log = cluster.log(name)
        assert log.count("ready.") == 1 and "Unrecoverable error" not in log, log[-3000:]
    # Every message the edge must refuse is a dead letter exactly once, with its reason.
    missing = [m.what for m in flood.messages if m.edge and m.marker not in seen]
    assert not missing, f"not in the dead letters: {missing}"
    reasons = {}
    for entry in letters.list(limit=20_000):
        for marker in ({entry.get("task_id")} | set(re.findall(rf"{MARK}\d{{5}}", str(entry.get("raw"))[:200]))):
            reasons[marker] = str(entry.get("reason"))
    wrong = {m.what: reasons[m.marker] for m in flood.messages if m.why and m.why not in reasons[m.marker]}
    assert not wrong, f"refused for another reason than expected: {wrong}"
    twice = {m.what: seen[m.marker] for m in flood.messages if seen.get(m.marker, 0) > 1}
    assert not twice, f"recorded more than once: {twice}"
    entries = letters.list(limit=20_000)
    assert all(e.get("reason") and e.get("time") for e in entries)
    for item in literal:
        assert sum(1 for e in entries if e.get("raw") == item.decode() and e.get("task_id") is None) == 2, item
    # Every other one was refused by its task: a dead letter or a FAILURE result.
    assert len(done_ids) == len(expected)
    # No livelock: nothing queued, nothing unacknowledged, and nothing more comes.
    count = letters.count()
    time.sleep(1.0)
    assert letters.count() == count and not queued(client)
    # The finished run's records are untouched; nothing was written outside the root.
    assert files(cluster.root).items() >= finished.items(), "a finished run's files changed"
    changed = {p for p in finished if (cluster.root / p).read_bytes() != finished[p]}
    assert not changed, changed
    assert tree(cluster.base, cluster.root) == before, tree(cluster.base, cluster.root) ^ before
    assert not outside.exists() and {p.name for p in cluster.base.parent.iterdir()} == around

    # And the workers serve: a genuine experiment runs to DONE.
    cfg2 = write_experiment("after", trainer="pid", datasets=["wine"], folds=2, resources={"gpus": 0})
    after = run_cli("submit", str(cfg2), "--wait", env=cluster.env(), timeout=120)
    assert after.returncode == 0, after.stderr
    status = json.loads(run_cli("status", "after", "--json", env=cluster.env()).stdout)
    assert status["runs"] == {"DONE": 2}, status
    for name, proc in cluster.workers.items():
        assert proc.poll() is None and proc.pid == pids[name] and cluster.log(name).count("ready.") == 1
    print(f"{len(flood.messages) + 2 * len(literal)} hostile messages "
          f"({sum(m.edge for m in flood.messages) + 2 * len(literal)} for the edge) settled in {elapsed:.1f} s; "
          f"{count} dead letters")


def test_deadletters_command(hostile_cluster: HostileCluster) -> None:
    letters = DeadLetters.from_url(hostile_cluster.url)
    letters.add("a reason", task_id="t-1", task="tasks.train_run", queue="cpu", raw=b"\xff raw")
    proc = run_cli("deadletters", "--json", "--limit", "3", env=hostile_cluster.env())
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["count"] == letters.count() and len(shown["dead_letters"]) == min(3, shown["count"])
    assert shown["dead_letters"][0]["reason"] == "a reason" and shown["dead_letters"][0]["raw"] == "\\xff raw"
    table = run_cli("deadletters", "--limit", "1", env=hostile_cluster.env())
    assert table.returncode == 0 and "a reason" in table.stdout and "t-1" in table.stdout, table.stdout
    total = letters.count()
    purged = run_cli("deadletters", "--purge", env=hostile_cluster.env())
    assert purged.returncode == 0 and f"purged {total} dead letter" in purged.stdout, purged.stdout
    assert letters.count() == 0
    assert "no dead letters" in run_cli("deadletters", env=hostile_cluster.env()).stdout
    bad = run_cli("deadletters", "--limit", "0", env=hostile_cluster.env())
    assert bad.returncode == 2 and "--limit" in bad.stderr


def test_dead_letters_take_anything(hostile_cluster: HostileCluster) -> None:
    """What is recorded is hostile: any type, size or encoding, bounded when stored."""
    letters = DeadLetters.from_url(hostile_cluster.url)
    client = redis.Redis.from_url(hostile_cluster.url)
    letters.purge()

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    odd: list[Any] = [b"\xff" * 10_000, "\ud800 lone surrogate", "x" * 1_000_000, None, 5, deep(50), Hostile()]
    for raw in odd:
        letters.add(raw, task_id=raw, task=raw, queue=raw, raw=raw)  # type: ignore[arg-type]
    client.lpush("orch:deadletters", b"not json", b"[1]")  # anyone can write to Redis
    entries = letters.list(limit=100)
    assert len(entries) == len(odd) + 2 and letters.count() == len(odd) + 2
    assert entries[0]["reason"] == entries[1]["reason"] == "unreadable dead-letter entry"
    assert all(len(json.dumps(e)) < 12_000 for e in entries), [len(json.dumps(e)) for e in entries]
    assert entries[-1]["size"] == 10_000 and entries[-1]["raw"].startswith("\\xff")
    assert letters.purge() == len(odd) + 2 and letters.list() == []


def test_nesting_is_measured_without_recursion() -> None:
    from orchestrator.execution.edge import nesting

    assert [nesting(v, 8) for v in (1, [], {"a": [1, {"b": []}]}, deep(8))] == [0, 1, 4, 8]
    assert nesting(deep(9), 8) is None and nesting(deep(200_000), 64) is None


def test_a_worker_without_its_edge_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edge replaces kombu 5.7.0's `Channel._brpop_read`: if kombu's channel is not
    that one any more, the worker must not start unguarded."""
    from kombu.transport import redis as kombu_redis

    from tasks import edge

    monkeypatch.delattr(kombu_redis.Channel, "_flush_brpop_reauth")
    with pytest.raises(SystemExit, match="worker not started: kombu's Redis channel lacks _flush_brpop_reauth"):
        edge._in_worker()
    assert kombu_redis.Channel._brpop_read is not edge._brpop_read


def test_a_message_celery_raises_on_leaves_the_unacknowledged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A message past the checks that still makes Celery raise (a case nobody foresaw) is
    taken out of kombu's unacknowledged messages and recorded, instead of ending the
    worker (and, restored at shutdown, the next one); a lost connection still goes up to
    kombu, which reconnects and restores the message."""
    from tasks import edge

    recorded: list[tuple[str, str | None]] = []
    monkeypatch.setattr(edge, "record", lambda reason, queue, raw, task_id=None, task=None:
                        recorded.append((reason, task_id)))

    class Connection:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def _deliver(self, message: Any, queue: str) -> None:
            raise self.exc

    class Qos:
        rejected: list[tuple[str, bool]] = []

        def reject(self, tag: str, requeue: bool = False) -> None:
            self.rejected.append((tag, requeue))

    class Channel:
        connection_errors = (ConnectionError,)

        def __init__(self, exc: BaseException) -> None:
            self.connection, self.qos = Connection(exc), Qos()

    message = {"headers": {"id": "t-1", "task": "tasks.train_run"}, "properties": {"delivery_tag": "tag-1"}}
    edge._deliver(Channel(KeyError("celery")), message, "cpu", b"raw")
    assert Qos.rejected == [("tag-1", False)]
    assert recorded == [("the worker failed on it: KeyError: 'celery'", "t-1")]
    with pytest.raises(ConnectionError):
        edge._deliver(Channel(ConnectionError("down")), message, "cpu", b"raw")
    assert len(Qos.rejected) == 1 and len(recorded) == 1
