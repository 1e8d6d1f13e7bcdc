"""Every Redis key this project writes (besides Celery's and kombu's own), and the one
function that makes Redis clients.

Keys, all under `orch:` (a run is keyed by RunSpec.run_key: its content and where its
outputs go; see orchestrator.execution.leases for the lease protocol):

    orch:lease:<run_key>               the token of the attempt holding the run (PX ttl)
    orch:attempts:<run_key>            hash: n (the fencing counter), lost, failed, committed, oom
    orch:active                        hash run_key -> JSON of the attempt holding the run
    orch:waiting                       hash task_id -> time: duplicates waiting on a live lease
    orch:epoch                         vanishes only when Redis lost its data
    orch:cancel:<experiment>           unix time of the last `orchestrator cancel`
    orch:paused:<experiment>           present while the experiment is paused
    parked.<experiment>                the queue (a kombu list) of a paused experiment's runs
    orch:parked                        hash experiment -> time a run of it was last parked
    orch:exp:<experiment>:runs|groups  live states (hash) for progress bars and `watch`
    orch:progress                      hash run_key -> the run's latest trainer report
    orch:rungs:<experiment>            hash "<run_id>:<epoch>" -> a run's report at an ASHA rung
    orch:group:<exp>:<group_id>:finalized   finalizes that wrote a group (audits: 1)
    orch:group:<exp>:<group_id>:finalizing  the lock a finalize holds while it writes
    orch:log:<run_key>:<attempt>       the tail of an attempt's log, for other hosts
    orch:fold:<run_key>                return mode: the fold's status record
    orch:return:<run_key>              return mode: the fold's packed files
    orch:gpushare:<host>:<index>       GPU admission: shares taken on one GPU
    orch:gpuwait:<worker>              GPU admission: a worker waiting for room
    orch:worker:<name>                 the worker registry (`workers list`)
    orch:watchdog:lock                 one watchdog acts at a time
    orch:deadletters                   refused messages, with their reasons
    orch:evaluation:<run_key>          `Client.evaluate` published the run (unix time): another
                                       client evaluating the same run waits on it instead
    orch:slot:<worker>                 a data-parallel gang's reservation of a worker (PX ttl)
    orch:gang:<run_key>                hash: the gang's attempt, world, state, why it waits
    orch:rank:<run_key>:<attempt>:<r>  a rank's lease and heartbeat (JSON, PX ttl)
    orch:ddp:<run_key>:<attempt>:*     the torch.distributed store of one attempt
    rank.<worker>                      the queue only that worker takes: a gang's rank tasks
    orch:roles:* orch:w:* orch:xp:*    roles experiments: state, weights, experience
                                       (orchestrator.roles.rkeys lists them)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # redis is imported where a client is made: `validate` and `plan` need none
    import redis

PREFIX = "orch"
ACTIVE = f"{PREFIX}:active"
WAITING = f"{PREFIX}:waiting"
PARKED = f"{PREFIX}:parked"
EPOCH = f"{PREFIX}:epoch"
PROGRESS = f"{PREFIX}:progress"
WATCHDOG_LOCK = f"{PREFIX}:watchdog:lock"
DEADLETTERS = f"{PREFIX}:deadletters"
WORKER_PREFIX = f"{PREFIX}:worker:"
UNUSED = f"{PREFIX}:none"  # a script's optional key, when the caller has none


def lease(run_key: str) -> str:
    return f"{PREFIX}:lease:{run_key}"


def attempts(run_key: str) -> str:
    return f"{PREFIX}:attempts:{run_key}"


def cancel(experiment: str) -> str:
    return f"{PREFIX}:cancel:{experiment}"


def paused(experiment: str) -> str:
    return f"{PREFIX}:paused:{experiment}"


def parked_queue(experiment: str) -> str:
    """Where the runs of a paused experiment wait: a queue no worker consumes."""
    return f"parked.{experiment}"


def exp_runs(experiment: str) -> str:
    return f"{PREFIX}:exp:{experiment}:runs"


def exp_groups(experiment: str) -> str:
    return f"{PREFIX}:exp:{experiment}:groups"


def rungs(experiment: str) -> str:
    return f"{PREFIX}:rungs:{experiment}"


def group_finalized(experiment: str, group_id: str) -> str:
    """How many finalizes wrote a group (an audit). Per experiment: a group_id is the
    content of its runs, which two experiments may share (each in its own folder)."""
    return f"{PREFIX}:group:{experiment}:{group_id}:finalized"


def group_finalizing(experiment: str, group_id: str) -> str:
    """The lock one finalize of a group holds while it writes (livestate.finalizing)."""
    return f"{PREFIX}:group:{experiment}:{group_id}:finalizing"


def log(run_key: str, attempt: int) -> str:
    return f"{PREFIX}:log:{run_key}:{attempt}"


def logs_of(run_key: str) -> str:
    """A SCAN pattern: every attempt's log tail of the run."""
    return f"{PREFIX}:log:{run_key}:*"


def fold_record(run_key: str) -> str:
    return f"{PREFIX}:fold:{run_key}"


def return_payload(run_key: str) -> str:
    return f"{PREFIX}:return:{run_key}"


def gpu_share(host: str, index: int) -> str:
    return f"{PREFIX}:gpushare:{host}:{index}"


def gpu_wait(worker: str) -> str:
    return f"{PREFIX}:gpuwait:{worker}"


def evaluation(run_key: str) -> str:
    return f"{PREFIX}:evaluation:{run_key}"
def slot(worker: str) -> str:
    return f"{PREFIX}:slot:{worker}"


def gang(run_key: str) -> str:
    return f"{PREFIX}:gang:{run_key}"


def rank(run_key: str, attempt: int, rank: int) -> str:
    return f"{PREFIX}:rank:{run_key}:{attempt}:{rank}"


def ddp_prefix(run_key: str, attempt: int) -> str:
    """A fresh torch.distributed store per attempt: an old attempt's keys never meet a new one."""
    return f"{PREFIX}:ddp:{run_key}:{attempt}:"


def rank_queue(worker: str) -> str:
    """The queue only `worker` consumes (first): the rank tasks of gangs it joins."""
    return f"rank.{worker}"


def worker(name: str) -> str:
    return f"{WORKER_PREFIX}{name}"


# The two ways this project talks to Redis, with timeouts chosen once:
# - "service": workers, the watchdog, `submit --wait`: long-lived, must ride out a Redis
#   restart or a slow moment (an AOF rewrite, a large value copied). A call may block
#   up to 10 s before it is retried (retry_on_timeout); connecting gives up after 5 s
#   (the caller retries with backoff); an idle connection is checked every 25 s, below
#   the idle timeouts of Redis and of the firewalls between hosts, so a half-open
#   connection is found before it is used.
# - "command": a person waits on it (`status`, `watch`, `logs`, `flower`'s check): a
#   Redis that cannot answer is reported within seconds instead of retried.
Kind = Literal["service", "command"]
_TIMEOUTS: dict[str, dict[str, object]] = {
    "service": {"socket_timeout": 10, "socket_connect_timeout": 5, "health_check_interval": 25,
                "retry_on_timeout": True},
    "command": {"socket_timeout": 5, "socket_connect_timeout": 3, "health_check_interval": 25},
}


def celery_url(url: str) -> str:
    """`url` as kombu and Celery's Redis result backend spell it. redis-py (every client
    this project makes) reads a Unix socket as unix:///path?db=N; kombu and Celery know
    only redis+socket:///path?virtual_host=N (kombu: "No such transport: unix")."""
    if not url.startswith("unix://"):
        return url
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = urlsplit(url)
    query = urlencode([("virtual_host" if k == "db" else k, v) for k, v in parse_qsl(parts.query)])
    return f"redis+socket://{parts.path}" + (f"?{query}" if query else "")


def client(url: str, kind: Kind = "service") -> redis.Redis:
    """A Redis client for `url` (redis://, rediss:// with TLS, unix://), `kind` as above."""
    import redis

    return redis.Redis.from_url(url, **_TIMEOUTS[kind])  # type: ignore[arg-type]
