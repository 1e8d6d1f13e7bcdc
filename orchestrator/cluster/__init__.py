"""The processes: the worker registry, the supervisor of `workers up`, local mode, GPUs, the watchdog, Flower's settings."""
