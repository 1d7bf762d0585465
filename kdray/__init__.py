"""kdray: ensemble knowledge distillation for image classifiers, searched at scale.

The Python API (``kdray.api``; imported on first use, so ``import kdray`` stays light)::

    kdray.train(config, **keys) -> StudentResult      # one student
    kdray.sweep(space, **options) -> SweepResult      # a Ray Tune + Optuna sweep
    kdray.load_student(path_or_run_id) -> StudentResult
    kdray.register_model(name)(builder)               # a custom architecture (kdray.models)
"""

from kdray._version import __version__

_API = ("train", "sweep", "load_student", "make_config", "StudentResult", "SweepResult")
__all__ = ["__version__", *_API, "register_model"]


def __getattr__(name: str):
    if name in _API:
        from kdray import api

        return getattr(api, name)
    if name == "register_model":
        from kdray.models import register_model

        return register_model
    raise AttributeError(f"module 'kdray' has no attribute {name!r}")
