"""Sweeps: a search space searched by Optuna through Ray Tune, each trial a training run, tracked in
MLflow (:func:`kdray.tune.run.run_sweep` is the outline)."""
