"""Distillation methods, one small file each, behind one registry."""

from kdray.distill import avg_kd, ce, ekd, feed, kd, sfeed  # noqa: F401  (registration)
from kdray.distill.base import (
           METHODS,
           RESERVED_NAMES,
           Generation,
           Method,
           TeacherInfo,
           check_teacher_count,
           ensure_registered,
           get_method,
           methods_defined_outside_kdray,
           register,
           unregister,
)
from kdray.distill.hparams import HPARAMS, HParam

__all__ = ["HPARAMS", "METHODS", "RESERVED_NAMES", "Generation", "HParam", "Method", "TeacherInfo",
           "check_teacher_count", "ensure_registered", "get_method", "methods_defined_outside_kdray", "register",
           "unregister"]
