"""The Redis keys of a roles experiment (all under `orch:` like orchestrator.keys):

    orch:role:<exp>:<role>.<i>          the lease key of a role instance is orchestrator.keys.lease
                                        of its instance key `role.<exp>.<role>.<i>`
    orch:roles:<exp>:state              hash: ended (why), ended_at, submitted_at
    orch:roles:<exp>:beat               hash instance key -> JSON heartbeat (host, state, rates)
    orch:roles:<exp>:evals              hash version -> JSON scores of the evaluators
    orch:roles:<exp>:cursor             hash evaluator instance key -> last version it recorded
    orch:w:<exp>:seq                    version counter (INCR: a version number is never reused)
    orch:w:<exp>:ptr                    the current version (flipped last, under the learner's token)
    orch:w:<exp>:versions               zset of the published versions
    orch:w:<exp>:best                   JSON {version, score}: kept whatever K says
    orch:w:<exp>:published              set of every version that became current (never pruned)
    orch:w:<exp>:unscored               zset of the versions no evaluator scored yet: kept until
                                        scored, at most `weights.unscored` of them
    orch:w:<exp>:v:<n>:meta             JSON: size, chunks, checksums, step, attempt
    orch:w:<exp>:v:<n>:c:<i>            chunk i of version n (staged with a TTL, persisted at the flip)
    orch:w:<exp>:ready                  pub/sub channel: "a version is ready" (a hint only)
    orch:xp:<exp>                       the experience stream; consumer group `learner`
"""

from __future__ import annotations

from ..keys import PREFIX


def instance_key(experiment: str, role: str, index: int) -> str:
    """The run key of a role instance in orchestrator.execution.leases."""
    return f"role.{experiment}.{role}.{index}"


def state(experiment: str) -> str:
    return f"{PREFIX}:roles:{experiment}:state"


def beats(experiment: str) -> str:
    return f"{PREFIX}:roles:{experiment}:beat"


def evals(experiment: str) -> str:
    return f"{PREFIX}:roles:{experiment}:evals"


def cursors(experiment: str) -> str:
    return f"{PREFIX}:roles:{experiment}:cursor"


def weights(experiment: str) -> str:
    """The prefix of every weight key of the experiment."""
    return f"{PREFIX}:w:{experiment}"


def stream(experiment: str) -> str:
    return f"{PREFIX}:xp:{experiment}"
