"""The Celery app: `celery -A tasks worker` / `celery -A tasks flower` find `app` here.

Settings come only from `celeryconfig.py` (see its docstring for why).
"""

import sys

from celery import Celery

# The task modules (tasks, worker hooks and bootsteps) are imported by the worker at its
# start, before its bootsteps are built (Celery's `include`), and by whoever imports them;
# not here: `orchestrator submit` needs only the app and the tasks' names, and importing
# them all (numpy, the trainers' registry, finalize...) took half a second of its start.
MODULES = ["tasks.admission", "tasks.deadletters", "tasks.edge", "tasks.fleet", "tasks.idle", "tasks.overhead",
           "tasks.preload", "tasks.ranks", "tasks.respawn", "tasks.roles", "tasks.search", "tasks.training", "tasks.watchdog"]

app = Celery("tasks", include=MODULES)
app.config_from_object("celeryconfig")

if "flower" in sys.argv[1:]:  # `celery -A tasks flower`: see docs/security.md
    from celery.events.receiver import EventReceiver

    # Flower's event capture starts with a heartbeat broadcast to every worker on the
    # remote-control channel (hard-coded wakeup=True). Its Redis user may not publish
    # there, since one that may would also send `shutdown`; workers send heartbeats anyway.
    EventReceiver.wakeup_workers = lambda self, channel=None: None  # type: ignore[method-assign]

__all__ = ["app"]
