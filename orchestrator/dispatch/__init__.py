"""Sending and steering the work: the Celery canvas of each group, the experiment's manifest, pause, resume and cancel."""
