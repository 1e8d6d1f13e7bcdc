"""Roles (seed 003): long-lived role tasks (actors, a learner, evaluators) of one
experiment, with versioned weights and experience streams in Redis (docs/roles.md).

- `config`: the `roles:` block of an experiment YAML, validated (exit 2).
- `registry`: role functions, an entry-point group as trainers are.
- `weights`: the versioned weight store (chunked, checksummed, pointer flipped last
  under the learner's lease token).
- `wire`: big values on a pooled connection without redis-py's copies.
- `experience`: the experience stream (Redis Streams, one consumer group, bounded).
- `instance`: one role instance's attempt: lease, heartbeat, pause/cancel/end.
- `spec`: RoleSpec, what a role task's message carries, validated whole.
- `files`: the experiment's files under the results root (status, checkpoints, scores).
- `submit`: writes the manifest and sends one task per role instance.
- `tictactoe`, `ttt_game`: the built-in example (self-play tic-tac-toe, a value network).
(What `status`/`watch`/`report` show: orchestrator.views.roles.)
"""
