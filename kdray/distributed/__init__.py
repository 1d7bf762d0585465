"""Training on Ray: a run as Ray Train workers, and the local Ray kdray starts (loopback only, ended
with its driver by a watchdog)."""
