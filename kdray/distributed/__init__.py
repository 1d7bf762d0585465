"""Training on Ray: a run as Ray Train workers, the local Ray kdray starts (loopback only, ended
with its driver by a watchdog), and a teacher store's missing rows computed by Ray tasks."""
