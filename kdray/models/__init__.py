"""Model zoo and students: staged classifiers, feature taps, EKD multi-branch students, export."""

from .staged import FeatureTap, StagedModel
from .student import MultiBranchStudent, Student, build_student, export_module
from .zoo import available_models, build_model

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
