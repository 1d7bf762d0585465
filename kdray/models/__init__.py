"""Model zoo and students: staged classifiers, feature taps, EKD multi-branch students, export."""

from .registry import available_models, build_model
from .staged import FeatureTap, StagedModel
from .student import MultiBranchStudent, Student, build_student, export_module

__all__ = [
    "build_model",
    "available_models",
    "StagedModel",
    "FeatureTap",
    "MultiBranchStudent",
    "Student",
    "build_student",
    "export_module",
]
