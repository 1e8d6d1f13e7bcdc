"""Submitting a roles experiment: its manifest (so `pause`, `resume`, `cancel` and
`status` find it), its state in Redis, the experience stream's consumer group, and one
role task per instance, the learner first. Plain Python: `send(spec_dict, queue)`
publishes a task (tasks.roles.send_role)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from ..dispatch.manifest import write_manifest_of
from ..paths import Layout
from . import rkeys
from .config import RolesExperiment
from .experience import ExperienceStream
from .files import RolesFiles
from .spec import specs_of

Send = Callable[[dict[str, Any], str], str]


def submit_roles(exp: RolesExperiment, layout: Layout, client: redis.Redis, send: Send) -> list[str]:
    """Start every role instance of `exp`; returns the task ids. Submitting the same
    experiment again starts what is not running (a running instance's lease turns the
    new message away) and lifts an earlier end: the learner resumes from its last
    version (and ends again at once if its step budget is reached)."""
    now = time.time()
    specs = specs_of(exp, now)
    write_manifest_of(layout, exp.name, exp.file, "roles", [], extra={
        "kind": "roles", "roles": [s.to_dict() for s in specs]})
    pipe = client.pipeline(transaction=True)
    pipe.hdel(rkeys.state(exp.name), "ended", "ended_at")
    pipe.hset(rkeys.state(exp.name), "submitted_at", repr(now))
    pipe.execute()
    ExperienceStream(client, exp.name, maxlen=exp.maxlen).ensure_group()
    RolesFiles(layout, exp.name).write_status({"experiment": exp.name, "state": "RUNNING", "submitted_at": now})
    return [send(s.to_dict(), s.queue) for s in specs]
