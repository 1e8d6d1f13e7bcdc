"""The broker edge: every message a worker pops from a task queue is checked here before
anything recursive touches it (kombu's JSON decoding, Celery's Request, the pickling of
the request into the pool process), and refused into the dead letters if it fails.

Why here: whoever can write to Redis can push any bytes onto a queue list. Celery and
kombu trust them (celery#1113, #4308): a list nested ~600 deep in a task's arguments
(1.7 KB) ends the worker with a RecursionError while pickling for the pool, and since
the message is restored at shutdown, the restarted worker dies on it again; a body that
is empty, `[1]`, a JSON string or not base64, headers that are a string, an envelope
`[]` or an item that is not JSON end it too; headers without an `id` loop it (taken,
put back, taken again); an envelope without a delivery tag vanishes without a word.

The seam is kombu's Redis `Channel._brpop_read` (the one way a worker's consumer takes
messages, with or without an event loop), replaced by a copy of kombu 5.7.0's with
`admit` between the pop and the delivery. The item has been popped from the list and
is not yet in kombu's `unacked` hash: a refused message is simply not delivered (so
never restored, never delivered again) and recorded once in the dead letters
(orchestrator.execution.deadletters, `orchestrator deadletters`) with its reason. Nothing of a
refused message reaches Celery.

What `admit` requires (each refusal names what was wrong and what is valid):
- at most MAX_MESSAGE_BYTES of UTF-8 JSON nested at most MAX_ENVELOPE_DEPTH (envelope
  and headers) and MAX_BODY_DEPTH (the body) levels: decoded by a parser that cannot
  crash on depth (`_json`) and measured level by level, without recursion, before
  anything recursive (Celery, pickle) sees it;
- the envelope kombu writes: `body` (base64 text), `content-type` application/json,
  `content-encoding` utf-8, `headers` and `properties` objects; a delivery tag; a
  `delivery_info` whose routing key is the queue the message came from;
- Celery's protocol 2 headers with their types (`id` and `task` strings, ids of safe
  characters, time limits as numbers, an ETA at most MAX_ETA_AHEAD ahead) and no others
  (Celery copies every header onto the task's request context);
- a task of this project (`tasks.*`, registered in this worker; none of Celery's
  built-ins) from a queue it may come from: training tasks never from `control`, every
  other task only from `control`;
- a body `[args, kwargs, embed]` whose arguments fit the task's signature.

A message that passes and still makes Celery refuse it (a case these checks do not
foresee) is recorded too, from Celery's `task_rejected` and `task_unknown` signals; one
that makes Celery raise is taken out of the unacknowledged messages and recorded
(`_deliver`), so that it cannot end the worker and, restored, the next one. Pidbox reply queues
(`<id>.reply.celery.pidbox`: answers to `celery inspect`/`control`) are not task queues
and pass as kombu handles them.

Cost, on every message: 30-35 us for a genuine 3.4 KB `train_run` message, of which 9 us
is the envelope's decoding that kombu would do anyway (it gets the decoded envelope);
a worker spends ~3 ms of CPU per task beside the run (tasks/overhead.py). Hence the exact
type checks, orjson where it is safe, and no depth walk where the brackets are too few
to reach the limit.
"""

from __future__ import annotations

import binascii
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # genuine: 3-4 KB a run, ~100 KB a finalize of 100 folds
MAX_ENVELOPE_DEPTH = 8  # genuine: 3 (properties.delivery_info, headers.timelimit)
# Genuine: 10 (a run's chord body with its error callback and spec). Deep enough for any
# parameter, far from what breaks Celery (a RecursionError while pickling at ~600).
MAX_BODY_DEPTH = 64
MAX_ETA_AHEAD = 24 * 3600.0  # seconds; retries wait at most 300 s (orchestrator.execution.attempt)
ORJSON_MAX_BRACKETS = 1024  # text with more brackets is decoded by Python's JSON module
CONTROL_QUEUE = "control"
# Every other task of ours is a control task. A rank of a data-parallel run comes from
# `rank.<worker>` (orchestrator.execution.gang). A role instance (orchestrator.roles) runs
# like a run, from cpu or gpu.
TRAINING_TASKS = frozenset({"tasks.train_run", "tasks.train_rank", "tasks.role_run"})

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")  # uuids, and room for other ids

_CONTAINERS = frozenset({dict, list})  # exact types: what the JSON decoder makes
_ENVELOPE_KEYS = frozenset({"body", "content-encoding", "content-type", "headers", "properties"})
_EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})
_NONE = type(None)
# Celery 5.7's protocol 2 headers (app.amqp.as_task_v2), plus kombu's `redelivered`
# (set when it restores a message). `None`-able unless required (`id`, `task`).
_HEADERS: dict[str, tuple[type, ...]] = {
    "lang": (str,), "task": (str,), "id": (str,), "shadow": (str, _NONE), "eta": (str, _NONE),
    "expires": (str, _NONE), "group": (str, _NONE), "group_index": (int, _NONE),
    "retries": (int, _NONE), "timelimit": (list, _NONE), "root_id": (str, _NONE),
    "parent_id": (str, _NONE), "argsrepr": (str, _NONE), "kwargsrepr": (str, _NONE),
    "origin": (str, _NONE), "ignore_result": (bool, _NONE), "replaced_task_nesting": (int, _NONE),
    "stamped_headers": (list, _NONE), "stamps": (dict, _NONE), "redelivered": (bool, _NONE),
}
_ID_HEADERS = ("id", "group", "root_id", "parent_id")
_PROPERTIES: dict[str, tuple[type, ...]] = {
    "correlation_id": (str, _NONE), "reply_to": (str, _NONE), "delivery_mode": (int, _NONE),
    "priority": (int, _NONE), "delivery_info": (dict,), "body_encoding": (str,), "delivery_tag": (str,),
}


class Refused(Exception):
    """A message that may not be delivered: the reason, and what it said it was."""

    def __init__(self, reason: str, task_id: str | None = None, task: str | None = None):
        super().__init__(reason)
        self.task_id, self.task = task_id, task



def nesting(value: Any, limit: int) -> int | None:
    """Levels of lists and objects in the decoded JSON `value` (a scalar: 0), or None
    when deeper than `limit`; level by level, without recursion."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return None
        level = [child for node in level for child in (node.values() if type(node) is dict else node)
                 if type(child) in _CONTAINERS]
    return depth


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
               float: "a float", _NONE: "null"}


def _type_name(value: Any) -> str:
    """What a decoded JSON value is, in JSON's words."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    # Exact types, as the JSON decoder makes them: a boolean is never a number here.
    return type(value) in types


def _decode(raw: bytes, brackets: int) -> Any:
    if brackets <= ORJSON_MAX_BRACKETS:
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(raw)
    return json.loads(raw.decode("utf-8"))


def _json(raw: bytes, limit: int, what: str) -> Any:
    """`raw` decoded, at most `limit` levels deep (measured without recursion), as kombu
    would decode it (Python's JSON decoder) but faster where that is safe: orjson takes
    a third of the time, yet crashes the process on text nested a few hundred thousand
    deep (3.8: a segmentation fault at 500,000 `[`), so only text with few brackets goes
    to it, and what it refuses (NaN, a lone surrogate) Python's decoder decides, which
    guards its own recursion (a RecursionError, never a crash)."""
    brackets = raw.count(b"[") + raw.count(b"{")  # an upper bound of the depth
    try:
        value = _decode(raw, brackets)
    except RecursionError:
        raise Refused(f"{what} is nested deeper than {limit} levels") from None
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise Refused(f"{what} is not UTF-8 JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if brackets > limit and nesting(value, limit) is None:
        raise Refused(f"{what} is nested deeper than {limit} levels", *_named(value))
    return value


def _named(envelope: Any) -> tuple[str | None, str | None]:
    """The task id and name an envelope gives, where they are strings (for the record)."""
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    if not isinstance(headers, dict):
        return None, None
    task_id, task = headers.get("id"), headers.get("task")
    return (task_id if isinstance(task_id, str) else None, task if isinstance(task, str) else None)


def _check_headers(headers: dict[str, Any]) -> tuple[str, str]:
    task_id, task = headers.get("id"), headers.get("task")
    named = _named({"headers": headers})
    if not isinstance(task_id, str) or not isinstance(task, str):
        raise Refused("headers need `id` and `task` as strings (Celery's task protocol 2), got "
                      f"id {_type_name(task_id)} and task {_type_name(task)}", *named)
    unknown = sorted(set(headers) - set(_HEADERS))
    if unknown:
        raise Refused(f"unknown headers {', '.join(map(repr, unknown[:5]))}: only Celery's protocol 2 "
                      f"headers are accepted ({', '.join(sorted(_HEADERS))})", *named)
    for key, value in headers.items():
        if not _is(value, _HEADERS[key]):
            raise Refused(f"header {key!r} is {_type_name(value)}, expected {_names(_HEADERS[key])}", *named)
    for key in _ID_HEADERS:
        value = headers.get(key)
        if value is not None and not _ID.fullmatch(value):
            raise Refused(f"header {key!r} {value[:80]!r} is not an id (letters, digits and . _ : @ + -, "
                          "at most 128, like a uuid)", *named)
    if headers.get("lang", "py") != "py":
        raise Refused(f"header 'lang' is {headers['lang'][:20]!r}, expected 'py'", *named)
    for key in ("retries", "group_index", "replaced_task_nesting"):
        if (headers.get(key) or 0) < 0:
            raise Refused(f"header {key!r} is negative", *named)
    limits = headers.get("timelimit")  # [hard, soft], each seconds or null
    if limits is not None and (len(limits) != 2 or not all(
            x is None or (_is(x, (int, float)) and math.isfinite(x) and x >= 0) for x in limits)):
        raise Refused("header 'timelimit' must be [hard, soft]: seconds >= 0 or null", *named)
    stamped = headers.get("stamped_headers")
    if stamped is not None and not all(isinstance(x, str) for x in stamped):
        raise Refused("header 'stamped_headers' must be a list of strings", *named)
    for key in ("eta", "expires"):
        if headers.get(key) is not None:
            _check_time(headers[key], key, named)
    return task_id, task


def _check_time(value: str, key: str, named: tuple[str | None, str | None]) -> None:
    try:
        when = datetime.fromisoformat(value)
        # Naive times are UTC to Celery here (enable_utc); year 1 at +14:00 has no timestamp.
        ahead = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - time.time()
    except (ValueError, OverflowError):
        raise Refused(f"header {key!r} {value[:40]!r} is not an ISO 8601 time", *named) from None
    if key == "eta" and ahead > MAX_ETA_AHEAD:
        raise Refused(f"header 'eta' is {ahead / 3600:.0f} h ahead: at most {MAX_ETA_AHEAD / 3600:.0f} h "
                      "(a retry waits at most minutes)", *named)


def policy(task: str, queue: str, registered: Mapping[str, Any]) -> str | None:
    """Why `task` may not run from `queue` on this worker, or None if it may."""
    if task not in registered:
        ours = ", ".join(sorted(registered))
        if task.startswith("celery."):
            return f"{task[:80]!r} is a Celery built-in task: workers run only this project's tasks ({ours})"
        return f"unknown task {task[:80]!r}: workers run only this project's tasks ({ours})"
    if task in TRAINING_TASKS and queue == CONTROL_QUEUE:
        return (f"{task} is a training task and never runs from the {CONTROL_QUEUE!r} queue "
                "(runs go to cpu, gpu or gpu.<host>.<index>)")
    if task not in TRAINING_TASKS and queue != CONTROL_QUEUE:
        return f"{task} runs only from the {CONTROL_QUEUE!r} queue, not from {queue[:80]!r}"
    return None


def _check_properties(props: dict[str, Any], queue: str, named: tuple[str, str]) -> None:
    for key in ("delivery_tag", "delivery_info", "body_encoding"):
        if key not in props:
            raise Refused(f"properties lack {key!r} (kombu's envelope always has it)", *named)
    for key, types in _PROPERTIES.items():
        if key in props and not _is(props[key], types):
            raise Refused(f"property {key!r} is {_type_name(props[key])}, expected {_names(types)}", *named)
    if props["body_encoding"] != "base64":
        raise Refused(f"body_encoding {props['body_encoding'][:20]!r}: only base64 is accepted", *named)
    if not _ID.fullmatch(props["delivery_tag"]):
        raise Refused(f"delivery_tag {props['delivery_tag'][:80]!r} is not a tag (like a uuid)", *named)
    priority = props.get("priority")
    if priority is not None and not 0 <= priority <= 255:
        raise Refused(f"priority {priority} is out of 0..255", *named)
    info = props["delivery_info"]
    if set(info) - {"exchange", "routing_key", "redelivered"} or not isinstance(info.get("exchange"), str):
        raise Refused("delivery_info must be {exchange, routing_key[, redelivered]} with exchange a string", *named)
    if info.get("routing_key") != queue:
        raise Refused(f"delivery_info routing_key {str(info.get('routing_key'))[:80]!r} is not the queue "
                      f"the message came from ({queue!r})", *named)


def _check_body(body: Any, task: str, registered: Mapping[str, Any], named: tuple[str, str]) -> None:
    if not isinstance(body, str):
        raise Refused(f"body is {_type_name(body)}, expected base64 text", *named)
    try:
        data = binascii.a2b_base64(body, strict_mode=True)
    except (binascii.Error, ValueError):
        raise Refused("body is not base64", *named) from None
    try:
        decoded = _json(data, MAX_BODY_DEPTH, "body")
    except Refused as exc:
        raise Refused(str(exc), *named) from None
    if not (isinstance(decoded, list) and len(decoded) == 3):
        raise Refused(f"body is {_type_name(decoded)}{' of ' + str(len(decoded)) if isinstance(decoded, list) else ''}"
                      ", expected [args, kwargs, embed] (Celery's task protocol 2)", *named)
    args, kwargs, embed = decoded
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(embed, dict | _NONE):
        raise Refused(f"body is [{_type_name(args)}, {_type_name(kwargs)}, {_type_name(embed)}], expected "
                      "[a list, an object, an object or null]", *named)
    for key, value in (embed or {}).items():
        want: tuple[type, ...] = (dict, _NONE) if key == "chord" else (list, _NONE)
        if key not in _EMBED_KEYS or not isinstance(value, want) or (
                isinstance(value, list) and not all(isinstance(s, dict) for s in value)):
            raise Refused(f"body's embed {key[:40]!r} is not one of callbacks, errbacks, chain (lists of "
                          "signatures) or chord (a signature)", *named)
    header = getattr(registered[task], "__header__", None)
    if header is not None:
        try:
            header(*args, **kwargs)
        except TypeError as exc:
            raise Refused(f"arguments do not fit {task}: {str(exc)[:200]}", *named) from None


def check(raw: bytes, queue: str, registered: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope of `raw` (a queue item of kombu's Redis transport) if it may be
    delivered from `queue` to one of the `registered` tasks; Refused otherwise."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Refused(f"message of {len(raw)} bytes: at most {MAX_MESSAGE_BYTES} are accepted")
    envelope = _json(raw, MAX_ENVELOPE_DEPTH, "the message")
    if not isinstance(envelope, dict):
        raise Refused(f"the message is {_type_name(envelope)}, expected kombu's envelope (an object "
                      f"with {', '.join(sorted(_ENVELOPE_KEYS))})")
    headers = envelope.get("headers")
    if not isinstance(headers, dict):
        raise Refused(f"headers are {_type_name(headers)}, expected an object")
    named = _check_headers(headers)
    if set(envelope) != _ENVELOPE_KEYS:
        odd = sorted(set(envelope) ^ _ENVELOPE_KEYS)
        raise Refused(f"envelope keys {', '.join(repr(k[:40]) for k in odd[:5])} missing or unknown: "
                      f"expected exactly {', '.join(sorted(_ENVELOPE_KEYS))}", *named)
    if (why := policy(named[1], queue, registered)) is not None:
        raise Refused(why, *named)
    if envelope["content-type"] != "application/json":
        raise Refused(f"content type {str(envelope['content-type'])[:60]!r} is disallowed: only "
                      "application/json is accepted (never pickle, YAML or msgpack)", *named)
    if envelope["content-encoding"] != "utf-8":
        raise Refused(f"content encoding {str(envelope['content-encoding'])[:40]!r}: only utf-8", *named)
    props = envelope["properties"]
    if not isinstance(props, dict):
        raise Refused(f"properties are {_type_name(props)}, expected an object", *named)
    _check_properties(props, queue, named)
    _check_body(envelope["body"], named[1], registered, named)
    return envelope
