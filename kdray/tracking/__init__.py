"""Tracking in MLflow: the store, runs, a sweep's parent and trial runs, the UI's view, queries.
A side channel of the pipeline: it imports only kdray.core and takes plain values and its own
frozen states (:mod:`kdray.tracking.state`).

One parent run per sweep, one child run per trial, one run per `kdray train`.

The store is a local sqlite file in the kdray working directory unless ``--tracking-uri`` or
``MLFLOW_TRACKING_URI`` names another (an ``mlflow server`` over HTTP on clusters). Every call
goes through an explicit :class:`mlflow.MlflowClient` for that URI, never MLflow's global state,
so trial drivers and Ray Train workers on any node log to the same place.

What a user sees, and what ``kdray best`` / ``kdray export`` rely on:

- experiments are tagged ``mlflow.experimentKind = custom_model_development`` (model training, not
  GenAI); a sweep's experiment has a saved view ``kdray-trials`` (trials ranked by the objective,
  with state, method, searched parameters, val/test accuracy, size, latency) and a description
  linking to it;
- runs: tags ``kdray.kind`` (sweep | trial | train), ``kdray.state`` (running | completed | pruned |
  failed | interrupted; MLflow's status FINISHED / KILLED / FAILED), ``kdray.failure_reason``,
  ``kdray.method``, ``kdray.dataset``, ``kdray.student``, ``kdray.teacher_archs``,
  ``kdray.trial_id``, ``node_ip``; children carry ``mlflow.parentRunId``; a description
  (``mlflow.note.content``) saying how the run ended; a trial is named after its Optuna trial
  (``ekd-3``, :func:`kdray.tracking.trials.name_trial_run`);
- params: the run config (the run's own method's hyperparameters only, one param per branch for
  per-branch ones, floats to 4 significant digits, paths relative to the working directory);
- metrics: everything the training loop reports per epoch (step = epoch) except its bookkeeping
  (:data:`kdray.tracking.tags.BOOKKEEPING`), plus ``latency_ms`` (:data:`kdray.deploy.latency.LATENCY`);
- the data set as a run input (``log_input``); the student as a logged model of the run
  (``ekd-resnet8``, type ``kdray-student``, its metrics linked) and as the run artifact
  ``student/student.pt``; the teachers' manifest ``teachers/manifest.json``;
- a sweep's parent: the space file, resolved base config, plots, and at the end the best trial's
  metrics and params, a description linking to it and ``kdray.best_run_id``.
"""
