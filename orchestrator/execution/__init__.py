"""One attempt at a run on a worker: its decisions, its lease and fence, training and the commit of its outputs, GPU admission, returned outputs, logs, refused messages."""
