"""The networks: staged classifiers (CIFAR ResNets, WRNs, torchvision families, registered ones), the
students built from them (single or EKD multi-branch) and how they are measured."""

from kdray.models.registry import (
    ensure_models_registered,
    register_model,
    registered_builders,
    registered_model,
    registered_models,
    unregister_model,
)
from kdray.models.staged import StagedModel
from kdray.models.student import (
    MultiBranchStudent,
    Student,
    build_student,
    export_module,
)
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
    "StagedModel",
    "MultiBranchStudent",
    "Student",
    "build_student",
    "export_module",
]
