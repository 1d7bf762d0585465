"""Tracking in MLflow: the store, runs, a sweep's parent and trial runs, the UI's view, queries.
A side channel of the pipeline: it imports only kdray.core and takes plain values and its own
frozen states (:mod:`kdray.tracking.state`)."""
