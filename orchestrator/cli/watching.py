"""`orchestrator watch`: a live full-screen view of experiments, workers and runs."""

from __future__ import annotations
