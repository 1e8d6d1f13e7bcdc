"""Roles (seed 003): long-lived role tasks (actors, a learner, evaluators) of one
experiment, with versioned weights and experience streams in Redis (docs/roles.md).

- `config`: the `roles:` block of an experiment YAML, validated (exit 2).
- `registry`: role functions, an entry-point group as trainers are.
- `weights`: the versioned weight store (chunked, checksummed, pointer flipped last
  under the learner's lease token).
- `experience`: the experience stream (Redis Streams, one consumer group, bounded).
- `instance`: one role instance's attempt: lease, heartbeat, pause/cancel/end.
- `submit`: writes the manifest and sends one task per role instance.
- `view`: what `status`/`watch`/`report` show of a roles experiment.
- `tictactoe`: the built-in example (self-play tic-tac-toe, a small value network).
"""
