"""The method registry: ``@register("name")`` on a :class:`~methods.core.method.Method` subclass."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import DfkdError

if TYPE_CHECKING:
    from .method import Method

M = TypeVar("M", bound="type[Method]")

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[M], M]:
    """Class decorator that makes a method available to ``distill(method=name)`` and the CLI."""

    def decorate(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def method_names() -> list[str]:
    """All registered method names, sorted."""
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The registered method class called ``name``; a one-line error lists the allowed names."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DfkdError(f"unknown method {name!r}; allowed: {', '.join(sorted(_REGISTRY))}") from None


def _load_all() -> None:
    """Import every module of the ``methods`` package so that its decorators run."""
    import importlib
    import pkgutil

    import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_") and info.name != "core":
            importlib.import_module(f"methods.{info.name}")
