"""Celery's configuration: `orchestrator`, `celery -A tasks worker` and `celery -A tasks
flower` all read this module (design invariant 6, docs/reliability.md).

Every value that can be overridden by an ORCH_* environment variable is declared, with
its rule, in orchestrator/settings.py, and read from there; a bad value ends even a
plain `celery` command before it starts (exit 2, the variable and what is valid).
Why this matters: kombu's Redis transport keeps one global `unacked` hash, and ANY
consumer of the broker (a worker, Flower, `celery inspect`) restores "expired"
messages using ITS OWN visibility timeout. A tool started with a shorter timeout would
redeliver everyone's running training runs (celery#7651, #5935). So no process of
this project configures Celery anywhere else.
"""

from __future__ import annotations

import os

from orchestrator import settings
from orchestrator.execution.transfer import results_transfer, return_max_bytes
from orchestrator.keys import celery_url

settings.refuse_and_exit()  # a plain `celery -A tasks ...` checks them here, before anything
_env = settings.value

# --- where things are ------------------------------------------------------------
# (A Unix socket: unix:///path for the project's clients, redis+socket:// for Celery's.)
broker_url = celery_url(_env("ORCH_BROKER_URL"))
# Chords need a backend that counts parts atomically: Redis, here the same server.
result_backend = celery_url(_env("ORCH_RESULT_BACKEND") or _env("ORCH_BROKER_URL"))
# Results root: every run's files go below it (a shared filesystem across hosts).
orch_results_root = os.path.abspath(_env("ORCH_RESULTS_ROOT"))
# Live state (run/group states for progress bars): Redis, by default the backend's.
orch_state_url = _env("ORCH_STATE_URL") or _env("ORCH_RESULT_BACKEND") or _env("ORCH_BROKER_URL")


def _tls_options(url: str) -> dict[str, object] | None:
    """A rediss:// URL's TLS options (ssl_cert_reqs, ssl_ca_certs, ssl_certfile,
    ssl_keyfile in its query), as Celery's broker_use_ssl: kombu and redis-py read them
    from the URL itself, but Flower's broker page (queue lengths) reads only this
    setting, and answers 500 without it (docs/security.md: TLS)."""
    import ssl
    from urllib.parse import parse_qsl, urlsplit

    if not url.startswith("rediss://"):
        return None
    query = dict(parse_qsl(urlsplit(url).query))
    options: dict[str, object] = {k: query[k] for k in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
                                  if k in query}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    options["ssl_cert_reqs"] = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
                                "none": ssl.CERT_NONE}.get(reqs, ssl.CERT_REQUIRED)
    return options


broker_use_ssl = _tls_options(broker_url)

# --- hosts without the shared results root (orchestrator.execution.transfer, .returns) ----------
# ORCH_RESULTS_TRANSFER: `shared` (default), a worker writes a run's files under the
# results root itself; `return` (`orchestrator worker --return-results`), it trains into
# a private scratch folder and hands the files back through Redis, and the control
# worker (which must see the root) writes them there when it finalizes the group.
orch_results_transfer = results_transfer()
# ORCH_RETURN_MAX_MB (MiB, default 32): the largest compressed archive of one fold a
# worker may return. Each one waits in Redis as one value until its group finalizes:
# with `noeviction` (deploy/redis.conf) a full Redis refuses every write, chords and
# leases included, so a few hundred waiting folds must fit next to everything else; and
# Redis copies a value in its single thread, so tens of MB stall every client for
# milliseconds. Predictions of tabular folds are KB to a few MB compressed; beyond 32 MiB
# a shared filesystem is the right tool. An archive lives at most ORCH_RESULT_EXPIRES
# (the chord's own lifetime) and is deleted as soon as its files are written. The
# control worker refuses larger archives too, and anything that inflates past 8 times it.
orch_return_max_bytes = return_max_bytes()
# ORCH_SCRATCH_DIR: where a return-mode worker trains (a fresh folder per run, always
# removed afterwards); default the system's temporary folder (TMPDIR).
orch_scratch_dir = _env("ORCH_SCRATCH_DIR")

# --- only JSON crosses the broker (design invariant 3, docs/reliability.md) ---------
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# --- delivery: a run is acknowledged only after it finished ------------------------
# Late acks: a worker that dies mid-run leaves its message unacknowledged, so Redis
# gives it to another worker instead of losing it.
task_acks_late = True
# One message at a time per process: the visibility clock starts when a message is
# FETCHED, so a prefetched second run would age while the first one trains.
worker_prefetch_multiplier = 1
# A run that raised or hit its time limit is finished (its FAILED state is recorded,
# retries are explicit): acknowledge it instead of redelivering it forever. (5.7 splits
# the older task_acks_on_failure_or_timeout into these two.)
task_acks_on_failure = True
task_acks_on_timeout = True
# True can requeue a run that kills its process in an endless loop (celery#9082).
task_reject_on_worker_lost = False
# A pool process killed mid-run (segfault, OOM kill) sends the run again at once, same
# task id and chord; train_run counts such lost attempts in Redis and gives up after
# max(retries, 2) of them, so a run that always kills its process cannot loop.
task_retry_on_worker_lost = True
# A redelivered message whose task already succeeded is not executed again, as its stored
# result says (finalize). train_run stores no success: a run delivered again runs
# train_run, which finds the run's DONE record and reports it without training.
worker_deduplicate_successful_tasks = True
# Redis connection lost mid-run: kombu requeues unacked messages on reconnect, so a
# still-running run would get a parallel duplicate unless the running one is cancelled.
worker_cancel_long_running_tasks_on_connection_loss = True

# --- broker transport ---------------------------------------------------------------
# Visibility timeout: a message not acknowledged after this long is handed out AGAIN,
# even if its run is still training. It must exceed the longest run, so 12 hours
# (ORCH_VISIBILITY_TIMEOUT, seconds). The price: a run of a worker that died silently
# is only restored after this timeout (plus kombu's sweep); reassigning faster needs
# leases and a watchdog, not a shorter timeout.
visibility_timeout = _env("ORCH_VISIBILITY_TIMEOUT")
broker_transport_options = {
    "visibility_timeout": visibility_timeout,
    # Ten priority levels, so `priority: 0..9` in the YAML is honoured (0 is served
    # first by kombu's Redis transport; canvas.py maps 9 (highest) to 0).
    "priority_steps": list(range(10)),
    "sep": ":",
    # Queues are served in the order a worker lists them: pinned queue first.
    "queue_order_strategy": "priority",
    "socket_timeout": 30,
    "socket_connect_timeout": 10,
    "retry_on_timeout": True,
    "health_check_interval": 25,
}
if not broker_url.startswith("redis+socket://"):  # (TCP only: a Unix socket refuses the option)
    broker_transport_options["socket_keepalive"] = True
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # keep retrying: a Redis restart must not kill workers

# --- results and chords -------------------------------------------------------------
# A chord's part counter lives in the result backend with this TTL. If it expires
# before the last fold finishes, the chord body silently never runs (celery PR #3573),
# so it must be far longer than queue wait plus training: 7 days (ORCH_RESULT_EXPIRES).
result_expires = _env("ORCH_RESULT_EXPIRES")
result_chord_expires = result_expires
result_extended = True  # task name, args and worker stored with each result
# A lost write of a chord part's result leaves the chord hung forever (celery#3363).
result_backend_always_retry = True
result_backend_max_retries = 20
redis_socket_timeout = 30
redis_socket_connect_timeout = 10
redis_retry_on_timeout = True
redis_socket_keepalive = not result_backend.startswith("redis+socket://")
redis_backend_health_check_interval = 25

# --- queues -------------------------------------------------------------------------
# Anything not explicitly routed (chord bodies, error callbacks) goes to `control`,
# which only the control worker consumes: training queues stay training-only.
task_default_queue = "control"
task_create_missing_queues = True

# --- visibility for Flower and `orchestrator watch` --------------------------------
# Not tracked in the result backend: a run's start is recorded where it is read, in the
# live state (IN_PROGRESS with its worker and attempt, written with its lease claim:
# `orchestrator status/watch`, progress bars), and Flower sees it from the task-started
# event. The backend's STARTED record (a GET, a SET and a PUBLISH per run, the SET
# holding the whole spec with result_extended) cost ~0.7 ms of worker CPU per run
# (about 6% of the CPU of dispatch.py's B) and no code here reads it. AsyncResult.state
# of a run shows PENDING while it trains (and after: tasks.train_run stores no success).
task_track_started = False
worker_send_task_events = True
task_send_sent_event = True
# A worker publishes its task events in batches at most this old (seconds,
# ORCH_EVENT_FLUSH_INTERVAL; 0 = Celery's own cadence, a publish after nearly every
# event, ~0.4 ms of worker CPU each, three a task). Flower shows a change that much later.
# tasks/overhead.py has the figures.
orch_event_flush_interval = _env("ORCH_EVENT_FLUSH_INTERVAL")

# --- worker processes ---------------------------------------------------------------
# CUDA is only ever initialised in the pool child that trains (design invariant 5,
# docs/reliability.md).
worker_pool_start_method = _env("ORCH_POOL_START_METHOD")
worker_hijack_root_logger = False
