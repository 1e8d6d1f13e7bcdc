"""Search: a strategy proposes parameter points (trials), each trial is a set of groups
trained and finalized as any other, and the search advances by idempotent steps on the
control side (orchestrator.search.engine). Nothing here imports Optuna at import time."""
