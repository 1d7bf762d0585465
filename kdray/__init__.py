"""kdray: ensemble knowledge distillation for image classifiers, searched at scale.

The Python API (``kdray.api``; imported on first use, so ``import kdray`` stays light)::

    kdray.train(config, **keys) -> StudentResult      # one student
    kdray.train_seeds(config, seeds=[0, 1, 2]) -> SeedGroupResult   # repeats of one configuration
    kdray.sweep(space, **options) -> SweepResult      # a Ray Tune + Optuna sweep (warm_start=...)
    kdray.compare(experiments, baseline=...) -> Comparison   # mean ± std over seeds, gaps
    kdray.load_student(path_or_run_id) -> StudentResult
    kdray.register_model(name)(builder)               # a custom architecture (kdray.models)
"""

from kdray._version import __version__

_API = ("train", "train_seeds", "sweep", "compare", "load_student", "make_config", "StudentResult", "SweepResult")
__all__ = ["__version__", *_API, "register_model"]


def __getattr__(name: str):
    if name in _API:
        from kdray import api

        return getattr(api, name)
    if name == "register_model":
        from kdray.models import register_model

        return register_model
    raise AttributeError(f"module 'kdray' has no attribute {name!r}")
