"""Commands about this host's GPUs and the cluster's workers: gpus, workers up/down/list."""

from __future__ import annotations
