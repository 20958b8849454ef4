"""Published reference results (spec §5): the packaged ``references.yaml``, loaded and validated.

Every entry is one published cell: the row, column and pair as the source names them, the
dfkd-bench names they map to (``None`` where dfkd-bench has no such method, dataset or arch), the
value and its ± spread in %, the source's teacher accuracy and the source itself.  Teachers differ
between sources and nearly all values are best-on-test, so compare *gaps to the teacher* (spec §5).
Methods whose papers' tables could not be read (HiDFD, CGDD, CPSC-DFKD, spec §5.7) are listed as
``unavailable``, with a reason and never a number.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from methods.core.errors import DfkdError
from methods.core.registry import method_names

from . import zoo
from .data import dataset_names

# Without a published ± the verdict allows this many points either side (issue 15).
DEFAULT_TOLERANCE = 0.5
VERDICTS = ("within", "below", "above")
ENTRY_KEYS = ("paper_method", "method", "paper_dataset", "dataset", "paper_pair", "teacher", "student", "value",
              "spread", "teacher_value", "source", "primary", "notes")
REQUIRED_KEYS = ("paper_method", "method", "paper_dataset", "dataset", "paper_pair", "teacher", "student", "value",
                 "spread", "teacher_value", "source")
UNAVAILABLE_KEYS = ("method", "paper_method", "reason")


class ReferencesError(DfkdError):
    """A references file that does not parse or validate (names the file, the entry and the key)."""


@dataclass(frozen=True)
class Reference:
    """One published accuracy (%) with its source and its teacher (spec §5.1–5.6)."""

    paper_method: str
    method: str | None
    paper_dataset: str
    dataset: str | None
    paper_pair: str
    teacher: str | None
    student: str | None
    value: float | None
    spread: float | None
    teacher_value: float | None
    source: str
    primary: bool = False
    notes: str = ""

    @property
    def pair(self) -> str | None:
        """The dfkd-bench pair ``teacher->student``, or ``None`` when an arch is not in the zoo."""
        return f"{self.teacher}->{self.student}" if self.teacher and self.student else None

    @property
    def teacher_gap(self) -> float | None:
        """The source's teacher minus its value, in points (what spec §5 says to compare)."""
        if self.value is None or self.teacher_value is None:
            return None
        return self.teacher_value - self.value

    @property
    def runnable(self) -> bool:
        """Whether dfkd-bench can run this cell: method, dataset and both archs map to ours."""
        return None not in (self.method, self.dataset, self.teacher, self.student)

    def describe_value(self) -> str:
        """``98.30 ± 0.20`` (or ``98.20``, or ``no number``)."""
        if self.value is None:
            return "no number"
        return f"{self.value:.2f}" + ("" if self.spread is None else f" ± {self.spread:.2f}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pair": self.pair, "teacher_gap": self.teacher_gap}


@dataclass(frozen=True)
class Unavailable:
    """A method with no verified published number (spec §5.7)."""

    method: str
    paper_method: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class References:
    """All references of one file, in file order."""

    entries: tuple[Reference, ...]
    unavailable: tuple[Unavailable, ...]
    source: str = "<references>"

    def for_cell(self, method: str, dataset: str) -> list[Reference]:
        """Every runnable entry for ``method`` on ``dataset``, the primary first, then in file order."""
        found = [e for e in self.entries if e.method == method and e.dataset == dataset and e.runnable]
        return sorted(found, key=lambda e: not e.primary)

    def primary(self, method: str, dataset: str) -> Reference | None:
        """The entry ``reproduce`` compares with (the method's own paper where it has one)."""
        return next((e for e in self.entries if e.primary and e.method == method and e.dataset == dataset), None)

    def unavailable_for(self, method: str) -> Unavailable | None:
        return next((u for u in self.unavailable if u.method == method), None)

    def known(self) -> list[str]:
        """``method dataset`` of every primary entry, for error messages."""
        return [f"{e.method} {e.dataset}" for e in self.entries if e.primary]


def verdict(ours: float, value: float, spread: float | None) -> str:
    """``within`` when |ours − value| ≤ spread (±0.5 points without one), else ``below`` or ``above``.

    Accuracies in %; a tiny slack absorbs the rounding of fractions converted to %.
    """
    tolerance = DEFAULT_TOLERANCE if spread is None else spread
    diff = ours - value
    if abs(diff) <= tolerance + 1e-9:
        return "within"
    return "below" if diff < 0 else "above"


def packaged_path() -> Path:
    return Path(str(resources.files("benchmark") / "references.yaml"))


@functools.lru_cache(maxsize=1)
def _packaged() -> References:
    return load_references(packaged_path())


def load_references(path: str | Path | None = None) -> References:
    """The references of ``path`` (default: the packaged ``benchmark/references.yaml``), validated."""
    if path is None:
        return _packaged()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ReferencesError(f"references {path}: cannot read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ReferencesError(f"references {path}: not valid YAML ({' '.join(str(error).split())})") from None
    return parse_references(data, str(path))


def parse_references(data: Any, source: str = "<references>") -> References:
    """Validate a loaded document; every error is one line naming the entry and the key."""
    where = f"references {source}"
    if not isinstance(data, Mapping) or not isinstance(data.get("references"), list):
        raise ReferencesError(f"{where}: expected a mapping with a 'references' list (and 'unavailable')")
    for key in data:
        if key not in ("version", "references", "unavailable"):
            raise ReferencesError(f"{where}: unknown key {key!r}; allowed: version, references, unavailable")
    entries = tuple(_entry(item, f"{where}: references[{i}]") for i, item in enumerate(data["references"]))
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries):
        if entry.primary:
            key = (str(entry.method), str(entry.dataset))
            if key in seen:
                raise ReferencesError(f"{where}: references[{i}]: a second primary entry for {key[0]} {key[1]} "
                                      f"(the first is references[{seen[key]}]); allowed: one per method × dataset")
            seen[key] = i
    raw = data.get("unavailable") or []
    if not isinstance(raw, list):
        raise ReferencesError(f"{where}: unavailable: expected a list of {{method, paper_method, reason}}")
    unavailable = tuple(_unavailable(item, f"{where}: unavailable[{i}]") for i, item in enumerate(raw))
    for i, u in enumerate(unavailable):
        numbered = [e for e in entries if e.method == u.method]
        if numbered:
            raise ReferencesError(f"{where}: unavailable[{i}]: method {u.method!r} also has numbered entries "
                                  f"({numbered[0].source}); a method is either referenced or unavailable")
    return References(entries, unavailable, source)


def _entry(item: Any, at: str) -> Reference:
    if not isinstance(item, Mapping):
        raise ReferencesError(f"{at}: expected a mapping with keys {', '.join(ENTRY_KEYS)}")
    for key in item:
        if key not in ENTRY_KEYS:
            raise ReferencesError(f"{at}: unknown key {key!r}; allowed: {', '.join(ENTRY_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in item:
            raise ReferencesError(f"{at}: missing key {key!r} (null where it does not apply)")
    label = f"{at} ({item.get('paper_method')} {item.get('paper_dataset')})"
    method = _name(item["method"], method_names(), f"{label}.method")
    dataset = _name(item["dataset"], dataset_names(), f"{label}.dataset")
    teacher = _name(item["teacher"], zoo.arch_names(), f"{label}.teacher")
    student = _name(item["student"], zoo.arch_names(), f"{label}.student")
    if (teacher is None) != (student is None):
        raise ReferencesError(f"{label}: give both teacher and student archs, or neither (null)")
    value = _percent(item["value"], f"{label}.value")
    spread = _percent(item["spread"], f"{label}.spread")
    teacher_value = _percent(item["teacher_value"], f"{label}.teacher_value")
    notes = item.get("notes") or ""
    if not isinstance(notes, str):
        raise ReferencesError(f"{label}.notes: expected a string; got {notes!r}")
    if value is None and not notes:
        raise ReferencesError(f"{label}: value is null; say why in 'notes' (e.g. the source reports 'failed')")
    if value is None and spread is not None:
        raise ReferencesError(f"{label}: a spread without a value")
    primary = item.get("primary", False)
    if not isinstance(primary, bool):
        raise ReferencesError(f"{label}.primary: expected true or false; got {primary!r}")
    entry = Reference(
        paper_method=_text(item["paper_method"], f"{label}.paper_method"), method=method,
        paper_dataset=_text(item["paper_dataset"], f"{label}.paper_dataset"), dataset=dataset,
        paper_pair=_text(item["paper_pair"], f"{label}.paper_pair"), teacher=teacher, student=student,
        value=value, spread=spread, teacher_value=teacher_value, source=_text(item["source"], f"{label}.source"),
        primary=primary, notes=notes,
    )
    if primary and (not entry.runnable or value is None):
        raise ReferencesError(f"{label}: a primary entry needs a method, dataset, both archs and a value")
    return entry


def _unavailable(item: Any, at: str) -> Unavailable:
    if not isinstance(item, Mapping) or set(item) != set(UNAVAILABLE_KEYS):
        raise ReferencesError(f"{at}: expected a mapping with exactly the keys {', '.join(UNAVAILABLE_KEYS)}")
    method = _name(item["method"], method_names(), f"{at}.method")
    if method is None:
        raise ReferencesError(f"{at}.method: expected a registered method; got null")
    return Unavailable(method, _text(item["paper_method"], f"{at}.paper_method"), _text(item["reason"], f"{at}.reason"))


def _name(value: Any, allowed: list[str], at: str) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise ReferencesError(f"{at}: unknown name {value!r}; allowed: null, {', '.join(allowed)}")
    return str(value)


def _text(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ReferencesError(f"{at}: expected a non-empty string; got {value!r}")
    return value


def _percent(value: Any, at: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise ReferencesError(f"{at}: bad value {value!r}; allowed: a number in [0, 100] (%), or null")
    return float(value)
