"""The Celery app: `celery -A tasks worker` / `celery -A tasks flower` find `app` here.

Settings come only from `celeryconfig.py` (see its docstring for why).
"""

from celery import Celery

# The task modules (tasks, worker hooks and bootsteps) are imported by the worker at its
# start, before its bootsteps are built (Celery's `include`), and by whoever imports them;
# not here: `orchestrator submit` needs only the app and the tasks' names, and importing
# them all (numpy, the trainers' registry, finalize...) took half a second of its start.
MODULES = ["tasks.admission", "tasks.edge", "tasks.fleet", "tasks.overhead", "tasks.respawn",
           "tasks.training", "tasks.watchdog"]

app = Celery("tasks", include=MODULES)
app.config_from_object("celeryconfig")

__all__ = ["app"]
