"""The base class every DFKD method derives from, and hyperparameter resolution.

A method declares, as class attributes: its hyperparameters (a dataclass with the paper's
defaults), its Optuna search space, which collected-data budgets it accepts, named recipe
profiles, a family and a citation.  ``run(ctx)`` trains; the harness owns everything else.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from optuna.distributions import BaseDistribution

from .errors import DfkdError

if TYPE_CHECKING:
    from .context import DistillContext


class CollectedUse(str, enum.Enum):
    """Which collected-data budgets a method accepts."""

    NONE = "none"  # purely data-free: collected must be 0
    OPTIONAL = "optional"  # collected >= 0
    REQUIRED = "required"  # collected > 0


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric hyperparameter: ``ge``/``gt`` below, ``le``/``lt`` above.

    Float values must also be finite.  For a tuple field the range applies to every element.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        parts = []
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        return " and ".join(parts) or "a finite number"

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )


def hp(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None) -> Any:
    """A hyperparameter field with its allowed range, declared next to its default.

    ``lr: float = hp(0.01, gt=0)``.  :func:`validate_hparams` checks every field centrally for every
    method (CLI ``--set``, grid ``overrides``, tuning samples): NaN, infinities and out-of-range
    values are one-line errors before any work starts.
    """
    return field(default=default, metadata={"range": Range(ge, gt, le, lt)})


def validate_hparams(hparams: Any, method: str = "") -> None:
    """Refuse a hyperparameter outside its declared :class:`Range` (floats must be finite anyway)."""
    for f in dataclasses.fields(hparams):
        value = getattr(hparams, f.name)
        allowed: Range = f.metadata.get("range", Range())
        values = value if isinstance(value, tuple) else (value,)
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not allowed.admits(item):
                raise DfkdError(
                    f"bad value {value!r} for hyperparameter {f.name!r} of method {method!r}; "
                    f"allowed: {allowed.describe()}"
                )


@dataclass
class CommonHparams:
    """Hyperparameters every method has.  Budget.iterations / batch_size override the first two.

    ``iterations`` counts outer-loop iterations exactly as the method's update order (spec §1.2).
    ``eval_every`` is in iterations; validation accuracy is computed at each multiple (spec §1.5).
    Subclasses that redefine these fields keep the ranges by using :func:`hp` (``hp(2000, ge=1)``).
    """

    iterations: int = hp(1000, ge=1)
    batch_size: int = hp(128, ge=1)
    eval_every: int = hp(100, ge=1)


# profile name -> dataset name (or "*" for any) -> hyperparameter overrides
Profiles = Mapping[str, Mapping[str, Mapping[str, Any]]]


class Method:
    """Base class of a registered DFKD method (register with ``@register("name")``)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    notes: ClassVar[str] = ""
    # The predictor whose accuracy the method reports (spec §2.1 "What is deployed").
    deployed: ClassVar[str] = "the bare student"
    Hparams: ClassVar[type[CommonHparams]] = CommonHparams
    collected_use: ClassVar[CollectedUse] = CollectedUse.NONE
    uses_labelled_train: ClassVar[bool] = False
    search_space: ClassVar[Mapping[str, BaseDistribution]] = {}
    profiles: ClassVar[Profiles] = {"quick": {"*": {}}, "paper": {"*": {}}}
    # True for methods whose losses match the teacher's BatchNorm statistics (spec §2.5): a teacher
    # without BatchNorm layers is refused with a one-line error instead of running with the term at 0.
    needs_teacher_bn: ClassVar[bool] = False
    # dataset -> (teacher arch, student arch) this method prefers when a grid names no pair,
    # e.g. {"mnist": ("lenet5-bn", "lenet5-half")} for a method whose losses need teacher BN.
    default_pairs: ClassVar[Mapping[str, tuple[str, str]]] = {}

    def __init__(self, hparams: CommonHparams) -> None:
        self.hp = hparams

    def run(self, ctx: DistillContext) -> None:
        """Train ``ctx.student``; call ``ctx.watch(predictor)`` first and ``ctx.end_iteration`` per iteration."""
        raise NotImplementedError

    # ----------------------------------------------------------------- declarations
    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        """The paper defaults of every hyperparameter, as a plain dict."""
        return dataclasses.asdict(cls.Hparams())

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``dfkd-bench methods`` shows: family, budgets, defaults, search space, profiles, notes."""
        return {
            "name": cls.name,
            "family": cls.family,
            "collected": cls.collected_use.value,
            "uses_labelled_train": cls.uses_labelled_train,
            "needs_teacher_bn": cls.needs_teacher_bn,
            "hparams": cls.hparam_defaults(),
            "search_space": {k: describe_distribution(d) for k, d in cls.search_space.items()},
            "profiles": {p: sorted(v) for p, v in cls.profiles.items()},
            "citation": cls.citation,
            "deployed": cls.deployed,
            "notes": cls.notes,
        }

    @classmethod
    def profile_overrides(cls, profile: str, dataset: str) -> dict[str, Any]:
        """The overrides that ``profile`` applies on ``dataset`` (the ``"*"`` entry when not specific)."""
        if profile not in cls.profiles:
            raise DfkdError(
                f"unknown profile {profile!r} for method {cls.name!r}; allowed: {', '.join(cls.profiles)}"
            )
        per_dataset = cls.profiles[profile]
        if dataset in per_dataset:
            return dict(per_dataset[dataset])
        if "*" in per_dataset:
            return dict(per_dataset["*"])
        raise DfkdError(
            f"profile {profile!r} of method {cls.name!r} has no recipe for dataset {dataset!r}; "
            f"it covers: {', '.join(per_dataset)}"
        )

    @classmethod
    def resolve_hparams(
        cls,
        profile: str,
        dataset: str,
        overrides: Mapping[str, Any] | None = None,
    ) -> CommonHparams:
        """Defaults, then the profile's recipe for ``dataset``, then user overrides (typed and checked)."""
        values = cls.profile_overrides(profile, dataset)
        values.update(coerce_overrides(cls.Hparams, overrides or {}, cls.name))
        hparams = cls.Hparams(**values)
        validate_hparams(hparams, cls.name)
        return hparams


def describe_distribution(dist: BaseDistribution) -> str:
    """A short text for an Optuna distribution, e.g. ``log[0.01, 1]`` or ``{1, 2, 5}``."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(map(str, dist.choices)) + "}"
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return f"{'log' if dist.log else ''}[{dist.low:g}, {dist.high:g}]"
    return repr(dist)


def _field_types(hparams_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(hparams_cls)


def coerce_overrides(hparams_cls: type, overrides: Mapping[str, Any], method: str = "") -> dict[str, Any]:
    """Check override names against the dataclass and convert string values to the field's type.

    Raises :class:`DfkdError` naming the key and the allowed keys, or the value and the expected type.
    """
    types_ = _field_types(hparams_cls)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in types_:
            raise DfkdError(
                f"unknown hyperparameter {key!r} for method {method!r}; allowed: {', '.join(sorted(types_))}"
            )
        out[key] = coerce_value(key, value, types_[key])
    return out


def coerce_value(key: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a CLI string) to ``annotation``; a one-line error when it does not fit."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last_error: DfkdError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(key, value, arg)
            except DfkdError as error:
                last_error = error
        assert last_error is not None
        raise last_error
    if origin is Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise DfkdError(f"bad value {value!r} for {key!r}; allowed: {', '.join(map(str, args))}")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            items = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise DfkdError(f"bad value {value!r} for {key!r}; expected a comma-separated list")
        inner = args[0] if args else str
        return tuple(coerce_value(key, item, inner) for item in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise DfkdError(f"bad value {value!r} for {key!r}; expected a boolean (true/false)")
    if annotation is int:
        if isinstance(value, bool):
            raise DfkdError(f"bad value {value!r} for {key!r}; expected an integer")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(value, str) and not value.strip().lstrip("+-").replace("_", "").isdigit():
                if not (float(number).is_integer() and "e" in value.lower()):
                    raise ValueError
            if float(number) != int(float(number)):
                raise ValueError
            return int(float(number))
        except (TypeError, ValueError):
            raise DfkdError(f"bad value {value!r} for {key!r}; expected an integer") from None
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise DfkdError(f"bad value {value!r} for {key!r}; expected a number") from None
    if annotation is str:
        return str(value)
    return value
