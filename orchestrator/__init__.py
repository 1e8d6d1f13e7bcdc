"""Distributed experiment runner for GPU training on Celery and Redis.

Kept import-light on purpose: Celery workers import `orchestrator.experiment.spec`, `.paths` and
`.status` from here, and must not pull in the CLI, torch or CUDA.
"""

__version__ = "0.1.0"
