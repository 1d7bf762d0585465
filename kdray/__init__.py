"""kdray: ensemble knowledge distillation for image classifiers, searched at scale."""

__version__ = "0.1.0"
