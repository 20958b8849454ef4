"""dfkd-bench methods: a registry of data-free KD algorithms behind one ``distill`` API.

A method is one module in this package holding one :class:`Method` subclass decorated with
``@register("name")``; every module here is imported when the registry is first used.
"""
from .core.api import Budget, DistillResult, TaskData, distill, resolve_device
from .core.context import BaseCallback, Callback, DistillContext
from .core.errors import BudgetError, DfkdError, NonFiniteLossError
from .core.images import Augment, ImageSet
from .core.method import CollectedUse, CommonHparams, Method
from .core.registry import get_method, method_names, register

__all__ = [
    "Augment",
    "BaseCallback",
    "Budget",
    "BudgetError",
    "Callback",
    "CollectedUse",
    "CommonHparams",
    "DfkdError",
    "DistillContext",
    "DistillResult",
    "ImageSet",
    "Method",
    "NonFiniteLossError",
    "TaskData",
    "distill",
    "get_method",
    "method_names",
    "register",
    "resolve_device",
]
