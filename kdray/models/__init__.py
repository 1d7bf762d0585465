"""Model zoo and students: staged classifiers, feature taps, EKD multi-branch students, export."""

from kdray.models.registry import (
    ensure_models_registered,
    register_model,
    registered_builders,
    registered_model,
    registered_models,
    unregister_model,
)
from kdray.models.staged import FeatureTap, StagedModel
from kdray.models.student import (
    MultiBranchStudent,
    Student,
    build_student,
    export_module,
)
from kdray.models.tv import kdray_to_torchvision, torchvision_to_kdray
from kdray.models.zoo import available_models, build_model

__all__ = [
    "build_model",
    "available_models",
    "register_model",
    "unregister_model",
    "registered_model",
    "registered_models",
    "registered_builders",
    "ensure_models_registered",
    "torchvision_to_kdray",
    "kdray_to_torchvision",
    "StagedModel",
    "FeatureTap",
    "MultiBranchStudent",
    "Student",
    "build_student",
    "export_module",
]
