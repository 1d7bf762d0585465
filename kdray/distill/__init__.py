"""Distillation methods, one small file each, behind one registry."""

from . import avg_kd, ce, ekd, feed, kd, sfeed  # noqa: F401  (registration)
from .base import METHODS, Generation, Method, TeacherInfo, check_teacher_count, get_method, register

__all__ = ["METHODS", "Generation", "Method", "TeacherInfo", "check_teacher_count", "get_method", "register"]
