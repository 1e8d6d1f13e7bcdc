"""The Redis set-up of docs/security.md, for real (issue 22): a private redis-server that
speaks only TLS (a CA and a server certificate made here with openssl) loads
deploy/redis-users.acl (placeholders replaced by test passwords' hashes); a control
worker, a CPU worker, a submitter and Flower each connect as their own user over
rediss://; an experiment runs to DONE; no role was refused anything it needed (ACL LOG);
Flower's user reads but cannot write, and no user can do what its role does not need."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.cluster.local import free_port, spawn, stop_process, stop_processes

from .conftest import REPO, celery_app, cli_env, run_cli, wait_for

pytestmark = pytest.mark.integration

ACL_FILE = REPO / "deploy" / "redis-users.acl"
ROLES = ("admin", "worker", "control", "submitter", "flower")
FLOWER_LOGIN = ("ops", "flower-login-pw")


@dataclass
class AclRedis:
    port: int
    passwords: dict[str, str]
    workdir: Path

    def url(self, user: str, password: str | None = None) -> str:
        """What docs/security.md gives each role: its user, TLS, the CA that signed Redis."""
        return (f"rediss://{user}:{password or self.passwords[user]}@127.0.0.1:{self.port}/0"
                f"?ssl_cert_reqs=required&ssl_ca_certs={self.workdir / 'ca.pem'}")

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user), socket_timeout=5)

    def denials(self) -> list[dict[str, object]]:
        entries = self.client("admin").acl_log(count=1000)
        return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.items()} for e in entries]


def _acl_text(passwords: dict[str, str]) -> str:
    text = ACL_FILE.read_text()
    for role, password in passwords.items():
        text = text.replace(f"#{role.upper()}_PASSWORD_SHA256", "#" + hashlib.sha256(password.encode()).hexdigest())
    return text


def _certificates(workdir: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=orchestrator-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1")
    (workdir / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.cnf")


def _start(workdir: Path, acl: Path) -> tuple[subprocess.Popen[bytes], int]:
    """redis-server speaking TLS only (`--port 0`), clients not asked for certificates."""
    port = free_port()
    argv = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(workdir / "server.pem"), "--tls-key-file", str(workdir / "server.key"),
            "--tls-ca-cert-file", str(workdir / "ca.pem"), "--tls-auth-clients", "no",
            "--dir", str(workdir), "--save", "", "--appendonly", "no", "--aclfile", str(acl),
            "--logfile", str(workdir / "redis.log")]
    return spawn(argv, dict(os.environ), workdir / "redis.out"), port


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    workdir = tmp_path_factory.mktemp("acl-redis")
    passwords = {role: f"{role}-{os.urandom(8).hex()}" for role in ROLES}
    _certificates(workdir)
    acl = workdir / "users.acl"
    acl.write_text(_acl_text(passwords))
    assert "PASSWORD_SHA256" not in acl.read_text()
    proc, port = _start(workdir, acl)
    server = AclRedis(port, passwords, workdir)

    def up() -> bool:
        try:
            return bool(server.client("admin").ping())
        except redis.ConnectionError:
            assert proc.poll() is None, (workdir / "redis.log").read_text()[-2000:]
            return False

    try:
        wait_for(up, timeout=15, what="the ACL redis-server")
        yield server
    finally:
        stop_process(proc)


def test_the_unedited_file_does_not_load(tmp_path: Path) -> None:
    """Placeholders are not hashes: Redis refuses to start rather than run without passwords."""
    _certificates(tmp_path)
    proc, _ = _start(tmp_path, ACL_FILE)
    try:
        assert proc.wait(timeout=15) != 0
    finally:
        stop_process(proc)
    assert "password hash must be exactly 64 characters" in (tmp_path / "redis.log").read_text()


def test_nobody_gets_in_without_a_user_tls_or_the_ca(acl_redis: AclRedis) -> None:
    ca = acl_redis.workdir / "ca.pem"
    once = {"socket_timeout": 2, "retry": Retry(NoBackoff(), 0)}  # no retries of a refusal
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port, ssl=True, ssl_ca_certs=str(ca), **once)
    with pytest.raises(redis.AuthenticationError):  # the default user is off
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(acl_redis.url("worker", "wrong"), **once).ping()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):  # no TLS: no answer
        redis.Redis(host="127.0.0.1", port=acl_redis.port, username="worker", password=acl_redis.passwords["worker"],
                    **once).ping()
    assert time.monotonic() - started < 5
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):  # a server the CA did not sign
        redis.Redis.from_url(acl_redis.url("worker").replace(str(ca), "/etc/ssl/certs/ca-certificates.crt"),
                             **once).ping()


def test_roles_get_only_their_commands(acl_redis: AclRedis) -> None:
    worker, submitter, flower = (acl_redis.client(r) for r in ("worker", "submitter", "flower"))
    for client, command in [
        (worker, ("FLUSHALL",)), (worker, ("CONFIG", "GET", "*")), (worker, ("KEYS", "*")),
        (worker, ("SET", "someone-elses-key", "x")), (worker, ("SCRIPT", "FLUSH")),
        (worker, ("ACL", "LIST")), (worker, ("SWAPDB", "0", "1")), (worker, ("MONITOR",)),
        (submitter, ("BRPOP", "cpu", "1")), (submitter, ("RPOP", "cpu")),  # nor take runs off a queue
        (submitter, ("HINCRBY", "orch:attempts:x", "n", "1")),  # nor touch a run's fencing counter
        (submitter, ("PUBLISH", "/0.celery.pidbox", "x")),  # nor send remote control
        (flower, ("SET", "orch:epoch", "x")), (flower, ("LPUSH", "cpu", "x")), (flower, ("DEL", "cpu")),
        (flower, ("PUBLISH", "some-channel", "x")), (flower, ("GET", "orch:epoch")),
        (flower, ("HGETALL", "orch:active")), (flower, ("SADD", "_kombu.binding.cpu", "x")),
        (flower, ("ZADD", "unacked_index", "1", "x")),
        (flower, ("PUBLISH", "/0.celery.pidbox", "x")),  # no remote control (no `shutdown`)
        (flower, ("EVAL", "return 1", "0")),
    ]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
            pytest.fail(f"{command} was allowed")
    assert flower.llen("cpu") == 0  # what its broker page reads


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class AclWorkers:
    """A control worker and CPU workers, each logged in as its own user; one results root."""

    redis: AclRedis
    root: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]]

    def env(self, role: str, **extra: str) -> dict[str, str]:
        return cli_env(ORCH_BROKER_URL=self.redis.url(role), ORCH_RESULTS_ROOT=str(self.root), **extra)

    def start(self, name: str, argv: list[str], role: str, **extra: str) -> None:
        self.procs[name] = spawn(argv, self.env(role, **extra), self.logs / f"{name}.log")

    def start_worker(self, name: str, *flags: str) -> None:
        """`orchestrator worker FLAGS --name NAME@%h`: the control user with --control, else the worker user."""
        self.start(name, [sys.executable, "-m", "orchestrator", "worker", "--loglevel", "INFO", *flags,
                          "--name", f"{name}@%h"], "control" if "--control" in flags else "worker")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait_registered(self, names: set[str]) -> None:
        admin = self.redis.client("admin")

        def registered() -> bool:
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited:\n" + self.log(name)
            seen = {k.decode().split(":")[-1].split("@")[0] for k in admin.scan_iter("orch:worker:*")}
            return names <= seen

        wait_for(registered, timeout=90, what=f"workers {sorted(names)} to register")

    def stop(self, *names: str) -> None:
        stop_processes([self.procs.pop(n) for n in (names or list(self.procs)) if n in self.procs])


@pytest.fixture(scope="module")
def acl_workers(acl_redis: AclRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclWorkers]:
    """The module's control worker (`aclcontrol`, control user) and CPU worker (`aclcpu`,
    worker user): started once, shared by the tests that run work through them."""
    base = tmp_path_factory.mktemp("acl-workers")
    workers = AclWorkers(acl_redis, base / "results", base / "logs", {})
    workers.logs.mkdir()
    try:
        workers.start_worker("aclcontrol", "--control")
        workers.start_worker("aclcpu", "--cpu")
        workers.wait_registered({"aclcontrol", "aclcpu"})
        yield workers
    finally:
        workers.stop()


def test_an_experiment_runs_to_done_with_one_user_per_role(acl_redis: AclRedis, acl_workers: AclWorkers,
                                                           tmp_path: Path) -> None:
    logs = acl_workers.logs
    admin = acl_redis.client("admin")
    admin.acl_log_reset()
    env = acl_workers.env
    flower_port = free_port()
    acl_workers.start("flower", [sys.executable, "-m", "orchestrator", "flower", "--port", str(flower_port),
                                 "--state-dir", str(tmp_path / "flower"), "--read-only"], "flower",
                      ORCH_FLOWER_USER=FLOWER_LOGIN[0], ORCH_FLOWER_PASSWORD=FLOWER_LOGIN[1])
    try:
        acl_workers.wait_registered({"aclcontrol", "aclcpu"})
        cfg = tmp_path / "acl.yaml"
        cfg.write_text("experiment: acl_exp\ntrainer: prior\ndatasets: [iris]\nfolds: 2\nseeds: [0, 1]\n"
                       "resources: {gpus: 0}\n")
        started = time.monotonic()
        proc = run_cli("submit", str(cfg), "--wait", env=env("submitter"), timeout=180)
        assert proc.returncode == 0, proc.stderr + acl_workers.log("aclcpu")
        submit_s = time.monotonic() - started
        # Pause while the first run trains: the worker parks the others; resume moves them
        # back (the submitter takes them off the parked queue only), and they train.
        slow = tmp_path / "acl_slow.yaml"
        slow.write_text("experiment: acl_slow\ntrainer: slow\ndatasets: [iris]\nfolds: 3\n"
                        "params: {seconds: 4}\nresources: {gpus: 0}\n")  # `pause` must land mid-run
        assert run_cli("submit", str(slow), env=env("submitter")).returncode == 0
        paused = run_cli("pause", "acl_slow", env=env("submitter"))
        assert paused.returncode == 0, paused.stderr
        wait_for(lambda: sum(admin.llen(k) for k in admin.scan_iter("parked.acl_slow*")) >= 1, timeout=60,
                 what="a parked run", seen=lambda: run_cli("status", "acl_slow", env=env("submitter")).stdout)
        resumed = run_cli("resume", "acl_slow", env=env("submitter"))
        assert resumed.returncode == 0 and "waiting runs back on their queues" in resumed.stdout, resumed.stderr

        def slow_runs() -> dict[str, int]:
            return dict(json.loads(run_cli("status", "acl_slow", "--json", env=env("submitter")).stdout)["runs"])

        wait_for(lambda: slow_runs() == {"DONE": 3}, timeout=90, what="the resumed runs to finish")

        # A run that fails, is retried, fails again (retry, failure records, the group's
        # error callback), and a message the worker refuses (the dead letters).
        failing = tmp_path / "acl_fail.yaml"
        failing.write_text("experiment: acl_fail\ntrainer: chatty\ndatasets: [iris]\nfolds: 2\nretries: 1\n"
                           "params: {fail_fold: 0}\nresources: {gpus: 0}\n")
        proc = run_cli("submit", str(failing), "--wait", env=env("submitter"), timeout=180)
        assert proc.returncode == 1 and "chatty failure on fold 0" in proc.stderr, proc.stderr
        forged = celery_app(acl_redis.url("submitter")).send_task("tasks.train_run", args=[{"bogus": 1}],
                                                                   queue="cpu")
        letters = lambda: json.loads(run_cli("deadletters", "--json", env=env("submitter")).stdout)["dead_letters"]  # noqa: E731
        wait_for(lambda: any(d.get("task_id") == forged.id for d in letters()), timeout=60,
                 what="the refused message in the dead letters")
        for args in (["status", "acl_exp", "--json"], ["status", "acl_fail", "--json"], ["workers", "list"],
                     ["watch", "acl_exp", "--once"], ["logs", "acl_fail/iris/base/seed=0/fold=0"],
                     ["pause", "acl_exp", "--now"], ["resume", "acl_exp"], ["cancel", "acl_exp"],
                     ["deadletters", "--purge"]):
            done = run_cli(*args, env=env("submitter"), timeout=60)
            assert done.returncode == 0, (args, done.stderr)
            if args[:2] == ["status", "acl_exp"]:
                status = json.loads(done.stdout)
                assert status["runs"] == {"DONE": 4} and status["groups"] == {"DONE": 2}, status
            if args[:2] == ["status", "acl_fail"]:
                assert json.loads(done.stdout)["runs"] == {"DONE": 1, "FAILED": 1}, done.stdout
            if args[0] == "logs":
                assert "hello from fold 0 on stdout" in done.stdout, done.stdout
        assert letters() == []

        # Flower, with its read-only user, lists both workers (from their events).
        base = f"http://127.0.0.1:{flower_port}"

        def flower_workers(query: str) -> set[str]:  # ?status=true: the workers its events saw
            status, body = _get(base + "/api/workers" + query, auth=FLOWER_LOGIN)
            return {w.split("@")[0] for w in json.loads(body)} if status == 200 else set()

        wait_for(lambda: {"aclcontrol", "aclcpu"} <= flower_workers("?status=true"), timeout=60,
                 what="Flower to list both workers (from their events)")
        assert _get(base + "/api/queues/length", auth=FLOWER_LOGIN)[0] == 200
        assert _get(base + "/api/tasks", auth=FLOWER_LOGIN)[0] == 200
        assert acl_workers.procs["flower"].poll() is None, acl_workers.log("flower")

        # Nobody but Flower was refused anything; Flower only its inspect requests (a reply
        # queue of its own, kombu's restore mutex), which this user does not allow.
        denied = acl_redis.denials()
        others = [d for d in denied if d["username"] != "flower"]
        assert others == [], json.dumps(others, indent=1, default=str)
        flower_denied = {str(d["object"]) for d in denied if d["username"] == "flower"}
        # (and its remote-control requests: `publish` on /0.celery.pidbox is not its to send)
        assert all(o in ("_kombu.binding.reply.celery.pidbox", "unacked_mutex", "set", "brpop",
                         "publish", "/0.celery.pidbox")
                   or o.endswith(".reply.celery.pidbox") for o in flower_denied), flower_denied
        print(f"submit --wait took {submit_s:.1f} s; Flower was refused: {sorted(flower_denied)}")
    finally:
        acl_workers.stop("flower")
        (logs / "acl-log.json").write_text(json.dumps(acl_redis.denials(), indent=1, default=str))


ROLES_EXP = {
    "experiment": "acl_roles",
    "roles": {"learner": {"function": "tictactoe.learner",
                          "settings": {"steps": 20, "publish_every": 5, "batch": 64, "new_per_step": 32}},
              "actor": {"function": "tictactoe.actor", "settings": {"games": 8}},
              "evaluator": {"function": "tictactoe.evaluator", "settings": {"games": 20, "games_best": 10}}},
    "weights": {"keep": 1, "unscored": 2}, "experience": {"maxlen": 1000},
}


def test_a_roles_experiment_runs_to_its_end_with_one_user_per_role(acl_redis: AclRedis, acl_workers: AclWorkers,
                                                                   tmp_path: Path) -> None:
    """The roles example, small (20 learner steps, a version every 5), on CPU workers
    logged in as the worker user, the control worker as the control user, the commands as
    the submitter: weights, streams, heartbeats and cursors all go through the ACL, the
    learner reaches its budget, the evaluator scores every version, every role stops,
    and Redis refused nobody anything (ACL LOG empty)."""
    import yaml

    admin = acl_redis.client("admin")
    admin.acl_log_reset()
    env = acl_workers.env("submitter")
    extra = ("aclcpu2", "aclcpu3")  # a learner, an actor and an evaluator run at once: three CPU slots
    started = time.monotonic()
    try:
        for name in extra:
            acl_workers.start_worker(name, "--cpu")
        acl_workers.wait_registered({"aclcontrol", "aclcpu", *extra})
        ready = time.monotonic()
        cfg = tmp_path / "roles.yaml"
        cfg.write_text(yaml.safe_dump(ROLES_EXP))
        proc = run_cli("submit", str(cfg), env=env)
        assert proc.returncode == 0, proc.stderr
        exp = str(ROLES_EXP["experiment"])
        status = acl_workers.root / exp / "roles" / "status.json"

        def shown() -> dict[str, object]:
            done = run_cli("status", exp, "--json", env=env)
            assert done.returncode == 0, done.stderr
            return dict(json.loads(done.stdout))

        def finished() -> bool:
            data = shown()
            instances = data["instances"]
            assert isinstance(instances, list)
            return (status.exists() and json.loads(status.read_text())["state"] == "DONE"
                    and all(i["state"] == "stopped" for i in instances))

        wait_for(finished, timeout=120, what="the learner's step budget and every role to stop",
                 seen=lambda: [acl_workers.log(n)[-600:] for n in ("aclcpu", *extra)] + [shown()])
        took = time.monotonic() - ready
        data = shown()
        weights, evals = data["weights"], data["evaluations"]
        assert isinstance(weights, dict) and isinstance(evals, list)
        published = int(admin.get(f"orch:w:{exp}:seq") or 0)
        assert [e["version"] for e in evals] == list(range(1, published + 1)) and evals[-1]["step"] == 20, evals
        assert weights["unscored"] == [] and len(weights["kept"]) <= 2  # keep 1, and the best
        assert admin.hgetall(f"orch:roles:{exp}:cursor") == {f"role.{exp}.evaluator.0".encode(): str(published).encode()}
        for args in (["watch", exp, "--once"], ["report", exp]):
            done = run_cli(*args, env=env)
            assert done.returncode == 0 and "learner.0" in done.stdout, (args, done.stdout, done.stderr)
        assert (acl_workers.root / exp / "roles" / "winrate.png").stat().st_size > 1000
        denied = acl_redis.denials()
        assert denied == [], json.dumps(denied, indent=1, default=str)
        print(f"\nroles under the ACL: {len(extra)} more CPU workers up in {ready - started:.1f} s; "
              f"submit to every role stopped in {took:.1f} s; {published} versions, each scored once; "
              f"ACL LOG: {len(denied)} entries")
    finally:
        acl_workers.stop(*extra)
        (acl_workers.logs / "acl-log-roles.json").write_text(json.dumps(acl_redis.denials(), indent=1, default=str))


def test_the_control_user_may_read_what_the_watchdog_reads(acl_redis: AclRedis, tmp_path: Path) -> None:
    """The watchdog's rarer reads, which an experiment that runs smoothly never makes: the
    worker registry (is a message's taker alive), the lists queued anywhere and the open
    experiments (the stall guard). Nothing of it is refused to the control user."""
    from orchestrator.cluster import registry
    from orchestrator.cluster.stall import StallGuard
    from orchestrator.cluster.watchdog import OrphanRule
    from orchestrator.execution.leases import Leases
    from orchestrator.paths import Layout

    acl_redis.client("admin").acl_log_reset()
    control = acl_redis.client("control")
    registry.register(control, registry.WorkerRecord("acl-ctl@h", "h", 1, None, "control", ["control"], "idle",
                                                     0.0, 0.0), ttl=30)
    assert OrphanRule(control, 10)(11.0, ["gone@h", 7]) is True
    assert OrphanRule(control, 10)(11.0, ["acl-ctl@h", 1]) is False
    control.hset("orch:exp:acl_open:runs", "r1", json.dumps({"status": "PENDING", "t": 0}))
    asked: list[str] = []
    guard = StallGuard(Leases(control, ttl=10), Layout(tmp_path), lambda: set(),
                       lambda name: asked.append(name) or {})
    guard.seconds = 0.0  # judge at once
    guard()
    assert asked == ["acl_open"]
    list(control.scan_iter(count=100, _type="list"))
    assert acl_redis.denials() == []
