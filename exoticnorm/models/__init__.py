"""Reference models for studies."""

from .lenet import LeNet

__all__ = ["LeNet"]
