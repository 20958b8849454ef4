"""Grid files: methods × datasets (teacher → student pairs) × collected budgets × seeds, as cells.

A grid is a YAML file (read with ``yaml.safe_load``) such as::

    name: mnist-budgets            # the MLflow experiment; letters, digits, . _ -
    profile: quick                 # recipe profile of every method (default quick)
    iterations: 500                # optional: overrides every method's iterations
    seeds: [0, 1, 2]
    budgets: [0, 100, 1000]        # collected examples; or {collected: 100, source: mnist:train, balanced: false}
    datasets:
      - mnist                      # pair: the method's default_pairs, else the built-in pair
      - name: fashion-mnist
        pairs: ["lenet5->lenet5-half", {teacher: lenet5-bn, student: lenet5-half}]
    expected_seconds: {dfad: 276, kd-collected: 23}   # optional: wall per cell, for the queue order
    methods:
      - all                        # every registered method not listed below
      - name: kd-collected
        profile: quick
        overrides: {lr: 0.02}      # hyperparameters, checked against the method's dataclass
        iterations: 200
        budgets: [100]
        pairs: {mnist: "lenet5-bn->lenet5-half"}
      - name: hidfd
        sweep: {lambda_d: [0.01, 1], collected: [500, 5000]}   # one at a time from the base
                                                               # (sensitivity figures)

A method's ``sweep`` (``{lambda_d: [0.01, 1], collected: [500, 5000]}``) adds, for sensitivity
figures, one variant per listed value with that value alone changed from the base (the
method's overrides and the grid's first budget): one-at-a-time, not a Cartesian product.

``expected_seconds`` (method → seconds per cell, e.g. measured on the machine the grid is sized for) sets
only the order in which cells are queued: longest first, cells of unlisted methods before all listed
ones (they may be long), ties in plan order.  With several workers that shortens the tail where one
worker runs a long cell alone (longest-processing-time-first scheduling); it changes no result.

Expanding a grid gives the cells to run and the cells skipped with their reason (a budget the
method does not accept, a dataset its profile does not cover); nothing is dropped silently.  A
cell's id is a hash of its resolved configuration (every hyperparameter after defaults, profile,
overrides and budget), so the same grid maps to the same ids on every machine and every re-run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from methods.core.api import Budget
from methods.core.errors import BudgetError, DfkdError, PairError
from methods.core.method import coerce_overrides, validate_hparams
from methods.core.registry import get_method, method_names

from . import zoo
from .data import dataset_names
from .experiment import RunSpec, check

DEFAULT_GRID = "default"
# dataset -> (teacher, student) when neither the grid nor the method names a pair (spec §2.1, §3).
BUILTIN_PAIRS: dict[str, tuple[str, str]] = {
    "mnist": ("lenet5", "lenet5-half"),
    "fashion-mnist": ("lenet5", "lenet5-half"),
    "cifar10": ("resnet34", "resnet18"),
    "cifar100": ("resnet34", "resnet18"),
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
TOP_KEYS = ("name", "description", "profile", "amp", "iterations", "batch_size", "seeds", "budgets", "datasets",
            "methods", "expected_seconds")
METHOD_KEYS = ("name", "profile", "overrides", "iterations", "batch_size", "budgets", "seeds", "pairs", "sweep")
DATASET_KEYS = ("name", "teacher", "student", "pairs")
BUDGET_KEYS = ("collected", "source", "balanced")
AMP_CHOICES = ("auto", "bf16", "off")


class GridError(DfkdError):
    """A grid file that does not parse or validate (names the file, the key and what is allowed)."""


# ----------------------------------------------------------------------------- parsed grid
@dataclass(frozen=True)
class BudgetEntry:
    collected: int = 0
    source: str | None = None
    balanced: bool = True


@dataclass(frozen=True)
class MethodEntry:
    """One ``methods`` item; ``None`` fields fall back to the grid-level value."""

    name: str
    profile: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    iterations: int | None = None
    batch_size: int | None = None
    budgets: tuple[BudgetEntry, ...] | None = None
    seeds: tuple[int, ...] | None = None
    pairs: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # dataset -> pairs
    # one-at-a-time sweep: hyperparameter (or "collected") -> values, each varied alone from the base
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def variants(self, budgets: tuple[BudgetEntry, ...]) -> list[tuple[tuple[tuple[str, Any], ...],
                                                                         tuple[BudgetEntry, ...]]]:
        """(overrides, budgets) of every run: the base, then each swept value alone (sensitivity figures)."""
        out = [(self.overrides, budgets)]
        for name, values in self.sweep:
            for value in values:
                if name == "collected":
                    first = budgets[0]
                    out.append((self.overrides, (BudgetEntry(int(value), first.source, first.balanced),)))
                else:
                    out.append((tuple({**dict(self.overrides), name: value}.items()), budgets))
        return out

    def pairs_for(self, dataset: str) -> tuple[tuple[str, str], ...] | None:
        return dict(self.pairs).get(dataset)


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    pairs: tuple[tuple[str, str], ...] = ()  # empty: the method's default pair, else the built-in one


@dataclass(frozen=True)
class Grid:
    """A validated grid file.  ``all_methods``: ``methods: all`` (or an ``all`` item) was given."""

    name: str
    methods: tuple[MethodEntry, ...]
    datasets: tuple[DatasetEntry, ...]
    budgets: tuple[BudgetEntry, ...] = (BudgetEntry(0),)
    seeds: tuple[int, ...] = (0,)
    profile: str = "quick"
    amp: str = "auto"
    iterations: int | None = None
    batch_size: int | None = None
    all_methods: bool = False
    description: str = ""
    source: str = "<built-in>"
    expected_seconds: tuple[tuple[str, float], ...] = ()  # method -> wall per cell, for the queue order only

    def with_iterations(self, iterations: int) -> Grid:
        """The grid with every method's iterations overridden (``run --iterations``)."""
        methods = tuple(dataclasses.replace(m, iterations=None) for m in self.methods)
        return dataclasses.replace(self, iterations=iterations, methods=methods)


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One run of the grid: a :class:`RunSpec` plus its resolved hyperparameters and stable id."""

    spec: RunSpec
    hparams: dict[str, Any] = field(hash=False, compare=False)
    cell_id: str = ""

    @property
    def pair(self) -> str:
        return f"{self.spec.teacher}->{self.spec.student}"

    @property
    def label(self) -> str:
        s = self.spec
        return f"{s.method} {s.dataset} {self.pair} c{s.budget.collected} s{s.seed}"

    @property
    def source(self) -> str:
        """The collected pool actually used (the teacher's own train-core unless the budget names one)."""
        return self.spec.budget.source or f"{self.spec.dataset}:train"

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe description (``cell.yaml``, the work queue), enough to rebuild the cell."""
        s = self.spec
        return {
            "cell_id": self.cell_id,
            **s.identity(),
            "budget": _jsonable(dataclasses.asdict(s.budget)),
            "overrides": _jsonable(dict(s.overrides)),
            "hparams": _jsonable(self.hparams),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cell:
        spec = RunSpec(
            method=data["method"],
            dataset=data["dataset"],
            teacher=data["teacher"],
            student=data["student"],
            budget=Budget(**data["budget"]),
            profile=data["profile"],
            seed=int(data["seed"]),
            overrides=tuple(data["overrides"].items()),
            amp=data["amp"],
        )
        return make_cell(spec)


@dataclass
class Skipped:
    """A cell the grid names but the method does not accept, and why."""

    method: str
    dataset: str
    pair: str
    collected: int
    seed: int
    reason: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.dataset} {self.pair} c{self.collected} s{self.seed}"


@dataclass
class Plan:
    """A grid expanded: the cells to run (in order) and the skipped ones."""

    grid: Grid
    cells: list[Cell]
    skipped: list[Skipped]

    @property
    def teachers(self) -> list[tuple[str, str]]:
        """Distinct (dataset, teacher arch) pairs the cells need, in first-use order."""
        return list(dict.fromkeys((c.spec.dataset, c.spec.teacher) for c in self.cells))

    def queue_order(self) -> list[Cell]:
        """The cells longest expected first (``grid.expected_seconds``; unlisted methods first, ties in plan order)."""
        expected = dict(self.grid.expected_seconds)
        return sorted(self.cells, key=lambda c: -expected.get(c.spec.method, float("inf")))

    @property
    def digest(self) -> str:
        """A hash of the set of cell ids: the work-queue name of this exact grid."""
        return hashlib.sha256("\n".join(sorted(c.cell_id for c in self.cells)).encode()).hexdigest()[:10]


def resolved_hparams(spec: RunSpec) -> dict[str, Any]:
    """Every hyperparameter after defaults, profile, overrides and the budget (as ``distill`` resolves them)."""
    hparams = get_method(spec.method).resolve_hparams(spec.profile, spec.dataset, spec.overrides_dict)
    if spec.budget.iterations is not None:
        hparams = dataclasses.replace(hparams, iterations=spec.budget.iterations)
    if spec.budget.batch_size is not None:
        hparams = dataclasses.replace(hparams, batch_size=spec.budget.batch_size)
    return dataclasses.asdict(hparams)


def make_cell(spec: RunSpec) -> Cell:
    """Resolve ``spec`` and hash it: the id covers everything that changes what the run computes."""
    hparams = resolved_hparams(spec)
    key = {
        "method": spec.method,
        "dataset": spec.dataset,
        "teacher": spec.teacher,
        "student": spec.student,
        "profile": spec.profile,
        "seed": spec.seed,
        "amp": spec.amp,
        "collected": spec.budget.collected,
        "source": spec.budget.source,
        "balanced": spec.budget.balanced,
        "hparams": _jsonable(hparams),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return Cell(spec, hparams, digest)


def expand(grid: Grid) -> Plan:
    """All cells of ``grid`` in order dataset → method → pair → budget → seed, and the skipped ones.

    Raises :class:`GridError` for a bad override (naming the method entry); a budget a method does
    not accept and a dataset its profile does not cover are *skipped* with the reason.
    """
    cells: list[Cell] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    for dataset in grid.datasets:
        for index, entry in enumerate(grid.methods):
            cls = get_method(entry.name)
            profile = entry.profile or grid.profile
            pairs = entry.pairs_for(dataset.name) or dataset.pairs or _default_pairs(cls, dataset.name)
            budgets = entry.budgets if entry.budgets is not None else grid.budgets
            seeds = entry.seeds if entry.seeds is not None else grid.seeds
            iterations = entry.iterations if entry.iterations is not None else grid.iterations
            batch_size = entry.batch_size if entry.batch_size is not None else grid.batch_size
            coverage = _profile_gap(cls, profile, dataset.name)
            for overrides, variant_budgets in entry.variants(budgets):
                for teacher, student in pairs:
                    for b in variant_budgets:
                        for seed in seeds:
                            spec = RunSpec(
                                method=entry.name,
                                dataset=dataset.name,
                                teacher=teacher,
                                student=student,
                                budget=Budget(b.collected, b.source, b.balanced, iterations, batch_size),
                                profile=profile,
                                seed=seed,
                                overrides=overrides,
                                amp=grid.amp,
                            )
                            pair = f"{teacher}->{student}"
                            if coverage:
                                skipped.append(Skipped(entry.name, dataset.name, pair, b.collected, seed, coverage))
                                continue
                            try:
                                check(spec)
                            except (BudgetError, PairError) as error:
                                skipped.append(Skipped(entry.name, dataset.name, pair, b.collected, seed, str(error)))
                                continue
                            except DfkdError as error:
                                raise GridError(f"grid {grid.source}: methods[{index}] ({entry.name}): {error}") from None
                            cell = make_cell(spec)
                            if cell.cell_id in seen:
                                continue  # the same resolved cell named twice (e.g. a pair listed twice) runs once
                            seen.add(cell.cell_id)
                            cells.append(cell)
    return Plan(grid, cells, skipped)


def _default_pairs(cls: type, dataset: str) -> tuple[tuple[str, str], ...]:
    """The method's declared preference for ``dataset``, else the built-in pair."""
    preferred = dict(getattr(cls, "default_pairs", {}) or {})
    if dataset in preferred:
        return (tuple(preferred[dataset]),)  # type: ignore[return-value]
    return (BUILTIN_PAIRS[dataset],)


def _profile_gap(cls: type, profile: str, dataset: str) -> str:
    """Why ``profile`` of the method cannot run on ``dataset`` ('' when it can)."""
    per_dataset = cls.profiles[profile]  # type: ignore[attr-defined]
    if dataset in per_dataset or "*" in per_dataset:
        return ""
    return f"profile {profile!r} of method {cls.name!r} has no recipe for dataset {dataset!r} (covers: {', '.join(per_dataset)})"  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- loading
def packaged_grids() -> dict[str, Path]:
    """Grid files shipped in ``benchmark/grids`` by name (file stem)."""
    folder = resources.files("benchmark") / "grids"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_grid(ref: str | Path | None = None) -> Grid:
    """A grid from a file path, a packaged grid's name (``default``, ...), or the default grid."""
    if ref is None:
        ref = DEFAULT_GRID
    path = Path(ref)
    if not path.is_file():
        shipped = packaged_grids()
        if str(ref) in shipped:
            path = shipped[str(ref)]
        else:
            raise GridError(
                f"grid file {str(ref)!r} not found; give a YAML file or one of the packaged grids: {', '.join(sorted(shipped))}"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise GridError(f"grid {path}: not valid YAML ({' '.join(str(error).split())})") from None
    return parse_grid(data, source=str(path))


def parse_grid(data: Any, source: str = "<grid>") -> Grid:
    """Validate a loaded YAML document; every error names the key and the allowed values."""
    where = f"grid {source}"
    if not isinstance(data, Mapping):
        raise GridError(f"{where}: expected a mapping with keys {', '.join(TOP_KEYS)}; got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, where, "top level")
    if "name" not in data:
        raise GridError(f"{where}: missing key 'name' (the MLflow experiment: letters, digits, '.', '_', '-')")
    name = data["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise GridError(f"{where}: bad name {name!r}; allowed: letters, digits, '.', '_', '-' (not starting with . _ -)")
    profile = _str(data.get("profile", "quick"), f"{where}: profile")
    amp = data.get("amp", "auto")
    if amp not in AMP_CHOICES:
        raise GridError(f"{where}: bad amp {amp!r}; allowed: {', '.join(AMP_CHOICES)}")
    iterations = _opt_positive(data.get("iterations"), f"{where}: iterations")
    batch_size = _opt_positive(data.get("batch_size"), f"{where}: batch_size")
    seeds = _seeds(data.get("seeds", [0]), f"{where}: seeds")
    budgets = _budgets(data.get("budgets", [0]), f"{where}: budgets")
    if "datasets" not in data:
        raise GridError(f"{where}: missing key 'datasets'; allowed datasets: {', '.join(dataset_names())}")
    datasets = _datasets(data["datasets"], where)
    if "methods" not in data:
        raise GridError(f"{where}: missing key 'methods'; give 'all' or a list of: {', '.join(method_names())}")
    methods, all_methods = _methods(data["methods"], where, profile)
    expected_seconds = _expected_seconds(data.get("expected_seconds", {}), f"{where}: expected_seconds")
    return Grid(
        name=name,
        methods=methods,
        datasets=datasets,
        budgets=budgets,
        seeds=seeds,
        profile=profile,
        amp=amp,
        iterations=iterations,
        batch_size=batch_size,
        all_methods=all_methods,
        description=str(data.get("description", "") or ""),
        source=source,
        expected_seconds=expected_seconds,
    )


def _expected_seconds(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    """``{method: seconds}``: registered method names, numbers >= 0."""
    if not isinstance(value, Mapping):
        raise GridError(f"{where}: expected a mapping of method name to seconds per cell; got {value!r}")
    out: list[tuple[str, float]] = []
    for method, seconds in value.items():
        if method not in method_names():
            raise GridError(f"{where}: unknown method {method!r}; allowed: {', '.join(method_names())}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise GridError(f"{where}.{method}: bad value {seconds!r}; allowed: a number of seconds >= 0")
        out.append((method, float(seconds)))
    return tuple(out)


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str, what: str) -> None:
    for key in data:
        if key not in allowed:
            raise GridError(f"{where}: unknown key {key!r} at {what}; allowed: {', '.join(allowed)}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise GridError(f"{where}: expected a non-empty string; got {value!r}")
    return value


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GridError(f"{where}: expected an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise GridError(f"{where}: bad value {value}; allowed: an integer >= {minimum}")
    return value


def _opt_positive(value: Any, where: str) -> int | None:
    return None if value is None else _int(value, where, 1)


def _list(value: Any, where: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if not value:
            raise GridError(f"{where}: empty list; give at least one item")
        return list(value)
    return [value]


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    seeds = tuple(_int(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))
    return tuple(dict.fromkeys(seeds))


def _budgets(value: Any, where: str) -> tuple[BudgetEntry, ...]:
    out: list[BudgetEntry] = []
    for i, item in enumerate(_list(value, where)):
        at = f"{where}[{i}]"
        if isinstance(item, Mapping):
            _check_keys(item, BUDGET_KEYS, at, "a budget")
            if "collected" not in item:
                raise GridError(f"{at}: missing key 'collected' (an integer >= 0)")
            source = item.get("source")
            if source is not None:
                source = _str(source, f"{at}.source")
                dataset = source.split(":", 1)[0]
                if dataset not in dataset_names():
                    raise GridError(f"{at}.source: bad source {source!r}; allowed: <dataset>:train with dataset one of "
                                    f"{', '.join(dataset_names())}")
            balanced = item.get("balanced", True)
            if not isinstance(balanced, bool):
                raise GridError(f"{at}.balanced: expected true or false; got {balanced!r}")
            out.append(BudgetEntry(_int(item["collected"], f"{at}.collected", 0), source, balanced))
        else:
            out.append(BudgetEntry(_int(item, at, 0)))
    return tuple(dict.fromkeys(out))


def _pair(value: Any, where: str) -> tuple[str, str]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split("->")]
        if len(parts) != 2 or not all(parts):
            raise GridError(f"{where}: bad pair {value!r}; expected 'teacher->student', e.g. 'lenet5->lenet5-half'")
        teacher, student = parts
    elif isinstance(value, Mapping):
        _check_keys(value, ("teacher", "student"), where, "a pair")
        if "teacher" not in value or "student" not in value:
            raise GridError(f"{where}: a pair needs both 'teacher' and 'student'")
        teacher, student = _str(value["teacher"], f"{where}.teacher"), _str(value["student"], f"{where}.student")
    else:
        raise GridError(f"{where}: bad pair {value!r}; expected 'teacher->student' or {{teacher: ..., student: ...}}")
    for role, arch in (("teacher", teacher), ("student", student)):
        if arch not in zoo.arch_names():
            raise GridError(f"{where}: unknown {role} arch {arch!r}; allowed: {', '.join(zoo.arch_names())}")
    return teacher, student


def _pairs(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise GridError(f"{where}: empty list; give at least one pair")
    return tuple(dict.fromkeys(_pair(v, f"{where}[{i}]" if isinstance(value, (list, tuple)) else where)
                               for i, v in enumerate(items)))


def _dataset_name(value: Any, where: str) -> str:
    if value not in dataset_names():
        raise GridError(f"{where}: unknown dataset {value!r}; allowed: {', '.join(dataset_names())}")
    return str(value)


def _datasets(value: Any, where: str) -> tuple[DatasetEntry, ...]:
    out: list[DatasetEntry] = []
    for i, item in enumerate(_list(value, f"{where}: datasets")):
        at = f"{where}: datasets[{i}]"
        if isinstance(item, str):
            out.append(DatasetEntry(_dataset_name(item, at)))
            continue
        if not isinstance(item, Mapping):
            raise GridError(f"{at}: expected a dataset name or a mapping with keys {', '.join(DATASET_KEYS)}")
        _check_keys(item, DATASET_KEYS, at, "a dataset")
        if "name" not in item:
            raise GridError(f"{at}: missing key 'name'; allowed datasets: {', '.join(dataset_names())}")
        name = _dataset_name(item["name"], f"{at}.name")
        pairs: tuple[tuple[str, str], ...] = ()
        if "teacher" in item or "student" in item:
            if "pairs" in item:
                raise GridError(f"{at}: give either 'teacher' and 'student' or 'pairs', not both")
            pairs = (_pair({k: item.get(k) for k in ("teacher", "student") if k in item}, at),)
        elif "pairs" in item:
            pairs = _pairs(item["pairs"], f"{at}.pairs")
        if name not in BUILTIN_PAIRS and not pairs:
            raise GridError(f"{at}: dataset {name!r} has no built-in pair; give 'pairs'")
        out.append(DatasetEntry(name, pairs))
    names = [d.name for d in out]
    for name in names:
        if names.count(name) > 1:
            raise GridError(f"{where}: dataset {name!r} listed twice; list its pairs under one entry")
    return tuple(out)


def _methods(value: Any, where: str, grid_profile: str) -> tuple[tuple[MethodEntry, ...], bool]:
    registered = method_names()
    entries: list[MethodEntry] = []
    all_methods = False
    items = [value] if value == "all" else _list(value, f"{where}: methods")
    for i, item in enumerate(items):
        at = f"{where}: methods[{i}]"
        if item == "all":
            all_methods = True
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping):
            raise GridError(f"{at}: expected 'all', a method name, or a mapping with keys {', '.join(METHOD_KEYS)}")
        _check_keys(item, METHOD_KEYS, at, "a method")
        if "name" not in item:
            raise GridError(f"{at}: missing key 'name'; allowed: all, {', '.join(registered)}")
        name = item["name"]
        if name not in registered:
            raise GridError(f"{at}.name: unknown method {name!r}; allowed: all, {', '.join(registered)}")
        cls = get_method(name)
        profile = item.get("profile")
        checked_profile = _str(profile, f"{at}.profile") if profile is not None else grid_profile
        if checked_profile not in cls.profiles:
            key = f"{at}.profile" if profile is not None else f"{where}: profile"
            raise GridError(f"{key}: unknown profile {checked_profile!r} for method {name!r}; allowed: "
                            f"{', '.join(cls.profiles)}")
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise GridError(f"{at}.overrides: expected a mapping of hyperparameter: value")
        coerced = _checked_overrides(cls, overrides, f"{at}.overrides")
        pairs: list[tuple[str, tuple[tuple[str, str], ...]]] = []
        raw_pairs = item.get("pairs") or {}
        if not isinstance(raw_pairs, Mapping):
            raise GridError(f"{at}.pairs: expected a mapping dataset: 'teacher->student' (or a list of pairs)")
        for dataset, pair_value in raw_pairs.items():
            pairs.append((_dataset_name(dataset, f"{at}.pairs"), _pairs(pair_value, f"{at}.pairs.{dataset}")))
        entries.append(MethodEntry(
            name=name,
            profile=profile,
            overrides=tuple(coerced.items()),
            iterations=_opt_positive(item.get("iterations"), f"{at}.iterations"),
            batch_size=_opt_positive(item.get("batch_size"), f"{at}.batch_size"),
            budgets=_budgets(item["budgets"], f"{at}.budgets") if "budgets" in item else None,
            seeds=_seeds(item["seeds"], f"{at}.seeds") if "seeds" in item else None,
            pairs=tuple(pairs),
            sweep=_sweep(item.get("sweep"), cls, f"{at}.sweep"),
        ))
    names = [e.name for e in entries]
    for name in names:
        if names.count(name) > 1:
            raise GridError(f"{where}: method {name!r} listed twice; one entry per method")
    if all_methods:
        for name in registered:
            if name not in names:
                cls = get_method(name)
                if grid_profile not in cls.profiles:
                    raise GridError(f"{where}: profile: unknown profile {grid_profile!r} for method {name!r} "
                                    f"(included by 'all'); allowed: {', '.join(cls.profiles)}")
                entries.append(MethodEntry(name))
        entries.sort(key=lambda e: registered.index(e.name))
    if not entries:
        raise GridError(f"{where}: methods: no method selected; give 'all' or a list of: {', '.join(registered)}")
    return tuple(entries), all_methods


def _checked_overrides(cls: Any, overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Overrides typed against the method's dataclass and checked against the ranges declared with ``hp()``.

    The same check ``--set`` and tuning samples get (:func:`~methods.core.method.validate_hparams`), here
    at parse time so that the error names the grid entry.
    """
    try:
        coerced = coerce_overrides(cls.Hparams, overrides, cls.name)
        validate_hparams(dataclasses.replace(cls.Hparams(), **coerced), cls.name)
    except DfkdError as error:
        raise GridError(f"{where}: {error}") from None
    return coerced


def _sweep(value: Any, cls: Any, where: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``sweep: {lambda_d: [0.1, 1, 10], collected: [100, 1000]}``: values checked like overrides."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise GridError(f"{where}: expected a mapping of hyperparameter (or collected): [values]")
    out = []
    for name, values in value.items():
        items = values if isinstance(values, (list, tuple)) else [values]
        if not items:
            raise GridError(f"{where}.{name}: empty list; give at least one value")
        if name == "collected":
            checked = tuple(b.collected for b in _budgets(list(items), f"{where}.collected"))
        else:
            checked = tuple(_checked_overrides(cls, {name: v}, where)[name] for v in items)
        out.append((str(name), checked))
    return tuple(out)


def _jsonable(value: Any) -> Any:
    """Tuples → lists, recursively (YAML/JSON safe)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def describe_grid(plan: Plan) -> dict[str, Any]:
    """A JSON-safe description of an expanded grid (``run --dry-run --json``)."""
    return {
        "name": plan.grid.name,
        "source": plan.grid.source,
        "cells": [c.to_dict() for c in plan.cells],
        "skipped": [dataclasses.asdict(s) for s in plan.skipped],
        "teachers": [f"{d}/{a}" for d, a in plan.teachers],
    }
